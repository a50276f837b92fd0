//! Component guests: a WebAssembly component of the `wasmgate:handler` world
//! (`wit/handler.wit`), run through its typed exports with a WASI 0.2 context
//! that grants nothing; its host calls are ABI v1's.

use std::net::SocketAddr;

use wasmtime::{Store, StoreLimitsBuilder};

use super::env::Env;
use super::kind::{Call, Entry, Instance, Kind};
use super::outcome::Rejection;
use crate::engine::{COMPONENT_MAX_INSTANCES, COMPONENT_MAX_MEMORIES, COMPONENT_MAX_TABLES, COMPONENT_TABLE_ELEMENTS};
use crate::guest::abi::GuestKind;
use crate::guest::component::{ComponentHost, ComponentPre, Exports};
use crate::guest::hostcalls::Outbox;
use crate::guest::instance_limits::InstanceLimits;
use crate::upstream::Lent;
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
    /// Lends the sessions, runs the export, takes them back, and passes on
    /// what the component printed.
    fn call(&mut self, call: &Call<'_>, sessions: &mut Lent, env: &Env, max_ratio: f64) -> Result<bool, Rejection> {
        self.store.set_epoch_deadline(env.budget.deadline_ticks());
        self.reply.clear();
        let allowance = call.allowance(max_ratio);
        self.store
            .data_mut()
            .calls
            .lend(call.peer, sessions, allowance, call.upstream);
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
        };
        let host = self.store.data_mut();
        host.calls.take_back(sessions);
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

    fn outbox(&self) -> &Outbox {
        &self.store.data().calls.out
    }

    fn outbox_mut(&mut self) -> &mut Outbox {
        &mut self.store.data_mut().calls.out
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
