//! The process's one wasmtime engine: its instance allocator, the linkers of
//! every guest kind, and the epoch ticker that interrupts guests. Every
//! listener's [`super::Env`] runs on it with its own limits.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use wasmtime::{Engine, Linker};

use crate::engine::engine_config;
use crate::engine::ticker::EpochTicker;
use crate::guest::abi_v1::imports;
use crate::guest::abi_v1::metrics;
use crate::guest::component::host::{self as wit, ComponentHost};
use crate::guest::host::Calls;
use crate::guest::wasi_command::host::{self as wasi, WasiHost};
use crate::metrics::RateLimit;

/// Guest log lines let through per second, across all instances.
const GUEST_LOG_LINES_PER_SECOND: u64 = 20;

/// An engine with its linkers and ticker. Shared by [`Arc`]; the ticker stops
/// when the last holder lets go.
pub struct Runtime {
    pub(super) engine: Engine,
    pub(super) linker: Linker<Calls>,
    pub(super) wasi_linker: Linker<WasiHost>,
    pub(super) component_linker: wasmtime::component::Linker<ComponentHost>,
    pub(super) log_limit: Arc<RateLimit>,
    pooled: bool,
    /// The epoch ticks so far, counted beside the engine's epoch (which cannot be
    /// read back), so that time in host calls is measured as the deadline measures.
    ticks: Arc<AtomicU64>,
    _ticker: EpochTicker,
}

impl Runtime {
    /// An engine that maps memory for each instance as it is made: best when
    /// instances are few and long-lived (`--isolation reuse`).
    pub fn new() -> anyhow::Result<Arc<Self>> {
        Self::build(None)
    }

    /// An engine with a pool of `slots` preallocated instance slots, reused
    /// with copy-on-write memory images: best when an instance is made per
    /// datagram (`--isolation fresh`, WASI commands). At most `slots` instances
    /// can be alive at once.
    pub fn with_instance_pool(slots: u32) -> anyhow::Result<Arc<Self>> {
        Self::build(Some(slots))
    }

    fn build(pool: Option<u32>) -> anyhow::Result<Arc<Self>> {
        let engine = Engine::new(&engine_config(pool))?;
        let ticks = Arc::new(AtomicU64::new(0));
        let mut linker = imports::linker(&engine)?;
        imports::define(&mut linker)?;
        metrics::define(&mut linker)?;
        Ok(Arc::new(Self {
            linker,
            wasi_linker: wasi::linker(&engine)?,
            component_linker: wit::linker(&engine)?,
            log_limit: Arc::new(RateLimit::new(GUEST_LOG_LINES_PER_SECOND)),
            pooled: pool.is_some(),
            _ticker: EpochTicker::start(engine.clone(), Arc::clone(&ticks))?,
            ticks,
            engine,
        }))
    }

    /// Whether instances come from a pool.
    pub fn has_instance_pool(&self) -> bool {
        self.pooled
    }

    /// The epoch ticks so far.
    pub(super) fn ticks(&self) -> u64 {
        self.ticks.load(Ordering::Relaxed)
    }
}
