//! ABI v1 guests: a core module exporting `memory`, `alloc` and `handle` (and
//! perhaps `on_reply`), with the `wasmgate` host calls. One instance serves
//! datagram after datagram (unless `--isolation fresh`).

use std::ops::Range;

use wasmtime::{InstancePre, Memory, Store, TypedFunc};

pub(crate) mod imports;
pub(crate) mod metrics;

use crate::guest::abi::{self, GuestKind, NO_REPLY};
use crate::guest::env::Env;
use crate::guest::host::{Calls, CallsView};
use crate::guest::kind::{Call, Entry, Instance, Kind};
use crate::guest::outcome::Rejection;
use crate::verdict::DropReason;

/// An ABI v1 module linked with the host calls.
pub(super) struct AbiV1(pub(super) InstancePre<Calls>);

impl Kind for AbiV1 {
    fn kind(&self) -> GuestKind {
        GuestKind::AbiV1
    }

    fn instantiate(&self, env: &Env) -> wasmtime::Result<Box<dyn Instance>> {
        let mut store = Store::new(&env.runtime.engine, env.host_state(env.instance_limits()));
        store.limiter(|h| &mut h.limits);
        env.arm(&mut store);
        let instance = self.0.instantiate(&mut store)?;
        // The ABI check guarantees these exports and their types.
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| wasmtime::format_err!("no `memory` export"))?;
        store.data_mut().memory = Some(memory);
        let alloc = instance.get_typed_func(&mut store, "alloc")?;
        let handle = instance.get_typed_func(&mut store, "handle")?;
        let mut optional = |name: &str| match instance.get_func(&mut store, name) {
            Some(f) => f.typed(&store).map(Some),
            None => Ok(None),
        };
        let on_reply = optional(abi::ON_REPLY.0)?;
        let probe = optional(abi::PROBE.0)?;
        let probe_reply = optional(abi::PROBE_REPLY.0)?;
        Ok(Box::new(Live {
            store,
            memory,
            alloc,
            handle,
            on_reply,
            probe,
            probe_reply,
            reply: None,
        }))
    }
}

/// A live instance: its store and the exports the host calls.
struct Live {
    store: Store<Calls>,
    memory: Memory,
    alloc: TypedFunc<i32, i32>,
    handle: TypedFunc<(i32, i32), i64>,
    on_reply: Option<TypedFunc<(i32, i32), i64>>,
    probe: Option<TypedFunc<(i32, i32), i64>>,
    probe_reply: Option<TypedFunc<(i32, i32), i64>>,
    /// Where the last call's reply is in guest memory.
    reply: Option<Range<usize>>,
}

impl Instance for Live {
    fn call(&mut self, call: &Call<'_>, env: &Env) -> Result<bool, Rejection> {
        self.store.set_epoch_deadline(env.budget.deadline_ticks());
        self.reply = None;
        self.reply = self.run(call)?;
        Ok(self.reply.is_some())
    }

    fn reply(&self) -> &[u8] {
        match &self.reply {
            Some(range) => &self.memory.data(&self.store)[range.clone()],
            None => &[],
        }
    }

    fn calls(&self) -> Option<&Calls> {
        Some(self.store.data().calls())
    }

    fn calls_mut(&mut self) -> Option<&mut Calls> {
        Some(self.store.data_mut().calls_mut())
    }
}

impl Live {
    /// Copies the datagram in, runs the export, and says where the reply is.
    fn run(&mut self, call: &Call<'_>) -> Result<Option<Range<usize>>, Rejection> {
        let func = match call.entry {
            Entry::Handle => &self.handle,
            // Only called for programs that export them.
            Entry::OnReply => self.on_reply.as_ref().ok_or(DropReason::Trap)?,
            Entry::Probe => self.probe.as_ref().ok_or(DropReason::Trap)?,
            Entry::ProbeReply => self.probe_reply.as_ref().ok_or(DropReason::Trap)?,
        };
        let len = call.datagram.len();
        // `len` is at most MAX_DATAGRAM, so it fits an i32.
        let ptr = self.alloc.call(&mut self.store, len as i32)?;
        let dst = abi::alloc_range(ptr, len, self.memory.data_size(&self.store))?;
        self.memory.data_mut(&mut self.store)[dst].copy_from_slice(call.datagram);
        let packed = func.call(&mut self.store, (ptr, len as i32))?;
        if packed == NO_REPLY {
            return Ok(None);
        }
        // The ratio is checked here against the budget that `send` shares.
        let range = abi::reply_range(packed, self.memory.data_size(&self.store), len, 0.0)?;
        let admitted = self.store.data_mut().out.admit_reply(range.len())?;
        Ok(admitted.then_some(range))
    }
}
