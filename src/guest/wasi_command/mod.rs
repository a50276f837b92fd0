//! WASI command guests: a preview 1 program run once per datagram, in a fresh
//! instance (from the engine's pool), the datagram on stdin and the reply read
//! from stdout. It has no host calls.

use std::net::SocketAddr;

use bytes::Bytes;
use wasmtime::{InstancePre, Store, TypedFunc};

pub(crate) mod host;

use self::host::WasiHost;
use crate::guest::abi::{self, GuestKind};
use crate::guest::env::Env;
use crate::guest::host::Calls;
use crate::guest::kind::{Call, Instance, Kind};
use crate::guest::outcome::Rejection;
use crate::verdict::{DropReason, MAX_DATAGRAM};

/// A WASI command linked with wasmtime-wasi's preview 1.
pub(super) struct WasiCommand(pub(super) InstancePre<WasiHost>);

impl Kind for WasiCommand {
    fn kind(&self) -> GuestKind {
        GuestKind::WasiCommand
    }

    fn instance_per_call(&self) -> bool {
        true
    }

    /// Not an instance yet: each call makes its own.
    fn instantiate(&self, _: &Env) -> wasmtime::Result<Box<dyn Instance>> {
        Ok(Box::new(Runs {
            pre: self.0.clone(),
            reply: Bytes::new(),
        }))
    }

    fn try_out(&self, env: &Env) -> wasmtime::Result<()> {
        host::warm_up();
        instantiate(&self.0, env, &[], None).map(drop)
    }
}

/// Runs of one command, a fresh instance each.
struct Runs {
    pre: InstancePre<WasiHost>,
    /// The last reply, which outlives its instance.
    reply: Bytes,
}

impl Instance for Runs {
    /// Exit status 0 sends what the program wrote to stdout, any other status
    /// sends nothing.
    fn call(&mut self, call: &Call<'_>, env: &Env) -> Result<bool, Rejection> {
        self.reply = Bytes::new();
        let (mut store, start) = instantiate(&self.pre, env, call.datagram, Some(call.peer))?;
        let status = host::exit_status(start.call(&mut store, ()));
        let (stdout, stderr) = (store.data().stdout(), store.data().stderr());
        if !stderr.is_empty() {
            log_stderr(env, &stderr, call.peer, status.as_ref().ok().copied());
        }
        match status {
            Ok(0) => {
                abi::check_reply_len(stdout.len(), call.datagram.len(), call.max_ratio)?;
                self.reply = stdout;
                Ok(true)
            }
            Ok(_) => Err(DropReason::NoReply.into()),
            // A program whose stdout is full may fail on its next write; what it
            // did wrong first is writing more than a datagram.
            Err(_) if stdout.len() > MAX_DATAGRAM => Err(DropReason::Oversize.into()),
            Err(e) => Err(e.into()),
        }
    }

    fn reply(&self) -> &[u8] {
        &self.reply
    }

    fn calls(&self) -> Option<&Calls> {
        None
    }

    fn calls_mut(&mut self) -> Option<&mut Calls> {
        None
    }
}

fn instantiate(
    pre: &InstancePre<WasiHost>,
    env: &Env,
    datagram: &[u8],
    peer: Option<SocketAddr>,
) -> wasmtime::Result<(Store<WasiHost>, TypedFunc<(), ()>)> {
    let mut store = Store::new(
        &env.runtime.engine,
        WasiHost::new(env.instance_limits(), datagram, peer),
    );
    store.limiter(|h| &mut h.limits);
    env.arm(&mut store);
    let instance = pre.instantiate(&mut store)?;
    let start = instance.get_typed_func(&mut store, "_start")?;
    Ok((store, start))
}

fn log_stderr(env: &Env, stderr: &[u8], peer: SocketAddr, status: Option<i32>) {
    if !tracing::enabled!(target: "wasmgate::guest", tracing::Level::INFO) {
        return;
    }
    let Some(suppressed) = env.runtime.log_limit.allow() else {
        return;
    };
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim_end();
    // The exit status, or "trap" when the program did not exit.
    let status = status.map_or_else(|| "trap".to_string(), |s| s.to_string());
    tracing::info!(target: "wasmgate::guest", %peer, %status, suppressed, "stderr: {text}");
}
