//! What every store of a listener needs, whatever the guest's kind: the
//! process's [`Runtime`], the listener's limits and time budget, its compiler
//! and its shared state. The loader (`mod.rs`) makes programs with it; every
//! kind makes and runs its instances with it.

use std::sync::Arc;

use anyhow::bail;
use wasmtime::{ExternType, Module, Store, StoreLimitsBuilder};

use super::host::{Calls, MetricsLink, Outbox};
use super::instance_limits::InstanceLimits;
use super::outcome::Rejection;
use super::runtime::Runtime;
use crate::config::Limits;
use crate::engine::budget::{self, Budget, Meter};
use crate::engine::child::Compiler;
use crate::engine::{MAX_TABLE_ELEMENTS, MAX_TABLES};
use crate::metrics::guest::{ListenerMetrics, MetricsWriter, Role};
use crate::state::State;
use crate::verdict::DropReason;

/// A listener's guests: the process's [`Runtime`] with this listener's limits.
/// Cheap to clone.
#[derive(Clone)]
pub struct Env {
    pub(super) runtime: Arc<Runtime>,
    pub(super) limits: Limits,
    /// What a call may spend: CPU time, with a wall-time ceiling.
    pub(super) budget: Budget,
    pub(super) compiler: Arc<Compiler>,
    /// The state its guests share; clones share it, so it outlives reloads.
    pub(super) state: Arc<State>,
    /// The metrics its guests define, by role; clones share them, so they
    /// outlive reloads.
    pub(super) metrics: Arc<ListenerMetrics>,
    /// Whose metrics this sandbox's guests write: the active module's, or the candidate's.
    pub(super) role: Role,
    /// The serial of the program its guest runs (set by the runner).
    pub(super) serial: u64,
}

impl Env {
    /// A sandbox on an engine of its own that maps memory for each instance as
    /// it is made (see [`Runtime::new`]). A process with several listeners
    /// shares one runtime among them instead ([`Env::on`]).
    pub fn new(limits: Limits) -> anyhow::Result<Self> {
        Ok(Self::on(Runtime::new()?, limits))
    }

    /// A sandbox on an engine of its own with a pool of `slots` instance slots
    /// (see [`Runtime::with_instance_pool`]).
    pub fn with_instance_pool(limits: Limits, slots: u32) -> anyhow::Result<Self> {
        Ok(Self::on(Runtime::with_instance_pool(slots)?, limits))
    }

    /// A sandbox with `limits` on `runtime`, which other sandboxes may share.
    pub fn on(runtime: Arc<Runtime>, limits: Limits) -> Self {
        Self {
            runtime,
            budget: Budget {
                cpu: limits.timeout,
                wall: limits.wall_timeout(),
            },
            limits,
            compiler: Arc::new(Compiler::InProcess),
            state: Arc::new(State::new(limits.state)),
            metrics: Arc::default(),
            role: Role::Active,
            serial: 0,
        }
    }

    /// The same sandbox with a state of its own, empty, with the same bounds:
    /// for a module that must not touch what the serving one shares (the shadow).
    pub fn with_own_state(&self) -> Self {
        Self {
            state: Arc::new(State::new(self.limits.state)),
            ..self.clone()
        }
    }

    /// The same sandbox with guest metrics of its own: for a run whose
    /// counts must not reach the listener's (the active module beside a canary).
    pub fn with_own_metrics(&self) -> Self {
        Self {
            metrics: Arc::default(),
            ..self.clone()
        }
    }

    /// The same sandbox writing the candidate's metrics (role `candidate`).
    pub fn as_candidate(&self) -> Self {
        Self {
            role: Role::Candidate,
            ..self.clone()
        }
    }

    /// The guest metrics of its listener, by role.
    pub fn metrics(&self) -> &Arc<ListenerMetrics> {
        &self.metrics
    }

    /// A writer of its role's metrics, for one worker.
    pub(super) fn metrics_writer(&self) -> MetricsWriter {
        MetricsWriter::new(self.metrics.role(self.role))
    }

    /// The state its guests share.
    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// Compiles modules with `compiler` from now on (in-process by default).
    pub fn with_compiler(mut self, compiler: Compiler) -> Self {
        self.compiler = Arc::new(compiler);
        self
    }
}

impl Env {
    /// Whether instances come from a pool ([`Env::with_instance_pool`]).
    pub fn has_instance_pool(&self) -> bool {
        self.runtime.has_instance_pool()
    }

    pub(super) fn check_memory(&self, module: &Module) -> anyhow::Result<()> {
        if let Some(ExternType::Memory(m)) = module.get_export("memory") {
            let need = m.minimum().saturating_mul(m.page_size());
            let cap = self.limits.max_memory as u64;
            if need > cap {
                bail!(
                    "its memory starts at {} bytes ({} pages), over the listener's memory limit of {cap} bytes (--max-memory, or max_memory in a config file)",
                    need,
                    m.minimum()
                );
            }
        }
        Ok(())
    }

    /// What an ABI v1 or WASI instance may hold: one memory, a few tables, and
    /// `--max-memory` for all of them together.
    pub(super) fn instance_limits(&self) -> InstanceLimits {
        let counts = StoreLimitsBuilder::new()
            .memory_size(self.limits.max_memory)
            .table_elements(MAX_TABLE_ELEMENTS)
            .tables(MAX_TABLES)
            .memories(1)
            .instances(1)
            // A guest that outgrows its cap is stopped and replaced, not left to
            // carry on with a failed `memory.grow`.
            .trap_on_grow_failure(true)
            .build();
        InstanceLimits::new(counts, self.limits.max_memory)
    }

    /// The host state of a new store, held to `limits`. There is no client while
    /// the start function runs, whichever datagram the instance is made for:
    /// `peer` says 0.
    pub(super) fn host_state(&self, limits: InstanceLimits) -> Calls {
        Calls {
            limits,
            peer: None,
            log_limit: Arc::clone(&self.runtime.log_limit),
            sessions: None,
            out: Outbox::default(),
            upstream: String::new(),
            state: Arc::clone(&self.state),
            memory: None,
            now: None,
            metrics: MetricsLink {
                registry: self.metrics.role(self.role),
                serial: self.serial,
                writer: None,
            },
        }
    }

    /// Starts metering a call (and the start function of an instance made for
    /// it) on this thread.
    pub(super) fn start_meter(&self) -> Meter {
        self.budget.start(self.runtime.ticks())
    }

    /// Gives a new store the call's epoch deadline and the callback that judges
    /// the budget when it passes ([`budget::on_deadline`]).
    pub(super) fn arm<T: 'static>(&self, store: &mut Store<T>) {
        store.set_epoch_deadline(self.budget.deadline_ticks());
        store.epoch_deadline_callback(|_| budget::on_deadline());
    }

    /// The epoch deadline interrupts only wasm code; time spent inside a host call
    /// (WASI above all) is judged here, after the fact, by the same rule, so
    /// that a datagram whose handling ran past the budget is dropped as a
    /// timeout all the same, and one the deadline would have let through is not.
    pub(super) fn check_budget(&self, meter: &Meter) -> Result<(), Rejection> {
        if meter.overran(self.runtime.ticks()) {
            return Err(DropReason::Timeout.into());
        }
        Ok(())
    }
}
