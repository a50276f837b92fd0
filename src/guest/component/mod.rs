//! WebAssembly components as handlers: the `wasmgate:handler` worlds of
//! `wit/handler.wit`, for languages that compile only to components (Python with
//! componentize-py, JavaScript with componentize-js) and for anyone who wants
//! typed bindings.
//!
//! A component is held to what an ABI v1 module is: one instance per worker,
//! reused and replaced after a trap, the epoch deadline, the store's limits, and
//! the reply checks. WASI 0.2 imports (0.2.0 to 0.2.12) are answered by a
//! deny-all context: no directories, no network, no environment, stdin empty,
//! stdout and stderr to the log, and no call that could block the worker outside
//! wasm, where the time budget cannot interrupt it (waiting on a pollable traps).

use std::net::SocketAddr;

use wasmtime::{Store, StoreLimitsBuilder};

pub(crate) mod host;
mod log_pipe;
mod world;

pub(crate) use host::{ComponentHost, ComponentPre, Exports};
pub use host::{HANDLE, HANDLER_WIT, ON_REPLY};
pub(crate) use world::{check, describe};

use crate::engine::{COMPONENT_MAX_INSTANCES, COMPONENT_MAX_MEMORIES, COMPONENT_MAX_TABLES, COMPONENT_TABLE_ELEMENTS};
use crate::guest::abi::GuestKind;
use crate::guest::env::Env;
use crate::guest::host::{Calls, CallsView};
use crate::guest::instance_limits::InstanceLimits;
use crate::guest::kind::{Call, Entry, Instance, Kind};
use crate::guest::outcome::Rejection;
use crate::verdict::{DropReason, MAX_DATAGRAM};

/// A component linked with the handler world.
pub(super) struct ComponentGuest(pub(super) ComponentPre);

impl Kind for ComponentGuest {
    fn kind(&self) -> GuestKind {
        GuestKind::Component
    }

    /// A component is made of several core instances, memories and tables (a
    /// Python one of a handful of each); the caps bound how many, and
    /// `--max-memory` what they hold together.
    fn instantiate(&self, env: &Env) -> wasmtime::Result<Box<dyn Instance>> {
        let counts = StoreLimitsBuilder::new()
            .memory_size(env.limits.max_memory)
            .table_elements(COMPONENT_TABLE_ELEMENTS)
            .tables(COMPONENT_MAX_TABLES)
            .memories(COMPONENT_MAX_MEMORIES)
            .instances(COMPONENT_MAX_INSTANCES)
            .trap_on_grow_failure(true)
            .build();
        let limits = InstanceLimits::new(counts, env.limits.max_memory);
        let mut store = Store::new(&env.runtime.engine, ComponentHost::new(env.host_state(limits)));
        store.limiter(|h| &mut h.calls.limits);
        env.arm(&mut store);
        let exports = self.0.instantiate(&mut store)?;
        Ok(Box::new(LiveComponent {
            store,
            exports,
            reply: Vec::new(),
            peer: None,
        }))
    }
}

/// A live component instance: its store, its typed exports, and its last reply.
struct LiveComponent {
    store: Store<ComponentHost>,
    exports: Exports,
    reply: Vec<u8>,
    /// The last client and its address as the `peer` parameter gives it.
    peer: Option<(SocketAddr, String)>,
}

impl Instance for LiveComponent {
    /// Runs the export and passes on what the component printed.
    fn call(&mut self, call: &Call<'_>, env: &Env) -> Result<bool, Rejection> {
        self.store.set_epoch_deadline(env.budget.deadline_ticks());
        self.reply.clear();
        // A client sends many datagrams: its address is written out once.
        if self.peer.as_ref().is_none_or(|(addr, _)| *addr != call.peer) {
            self.peer = Some((call.peer, call.peer.to_string()));
        }
        let peer = self.peer.as_ref().map_or("", |(_, text)| text.as_str());
        let result = match call.entry {
            Entry::Handle => self.exports.handle(&mut self.store, call.datagram, peer),
            Entry::OnReply => self
                .exports
                .on_reply(&mut self.store, call.datagram, peer, call.upstream),
            Entry::Probe => self.exports.probe(&mut self.store, call.upstream),
            Entry::ProbeReply => self
                .exports
                .probe_reply(&mut self.store, call.upstream, call.datagram)
                // A judgement is no datagram: "healthy" is a reply of no bytes.
                .map(|healthy| healthy.then(Vec::new)),
        };
        let host = self.store.data_mut();
        let (stdout, stderr) = host.take_output();
        for (stream, text) in [("stdout", stdout), ("stderr", stderr)] {
            if !text.is_empty() {
                log_output(env, stream, &text, call.peer);
            }
        }
        let Some(reply) = result? else {
            return Ok(false);
        };
        if reply.len() > MAX_DATAGRAM {
            return Err(DropReason::Oversize.into());
        }
        let admitted = self.store.data_mut().calls.out.admit_reply(reply.len())?;
        self.reply = reply;
        Ok(admitted)
    }

    fn reply(&self) -> &[u8] {
        &self.reply
    }

    fn calls(&self) -> Option<&Calls> {
        Some(self.store.data().calls())
    }

    fn calls_mut(&mut self) -> Option<&mut Calls> {
        Some(self.store.data_mut().calls_mut())
    }
}

/// Passes what a component printed to the log, rate-limited with the guest's
/// log lines.
fn log_output(env: &Env, stream: &str, text: &[u8], peer: SocketAddr) {
    if !tracing::enabled!(target: "wasmgate::guest", tracing::Level::INFO) {
        return;
    }
    let Some(suppressed) = env.runtime.log_limit.allow() else {
        return;
    };
    let text = String::from_utf8_lossy(text);
    tracing::info!(target: "wasmgate::guest", %peer, suppressed, "{stream}: {}", text.trim_end());
}
