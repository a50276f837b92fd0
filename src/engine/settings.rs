//! The engine's settings, the same in the serving process and the compiling
//! child, and the caps every instance is held to.

use wasmtime::{Config, InstanceAllocationStrategy, PoolingAllocationConfig};

/// Caps that no ABI v1 guest should come near; they stop table and instance bombs.
pub(crate) const MAX_TABLE_ELEMENTS: usize = 100_000;
pub(crate) const MAX_TABLES: usize = 8;

/// A component's caps, over all its core instances, memories and tables:
/// generous, since toolchains differ; the Python, JavaScript and Rust examples
/// run well within them (tests/all/components.rs).
pub(crate) const COMPONENT_MAX_INSTANCES: usize = 64;
pub(crate) const COMPONENT_MAX_MEMORIES: usize = 16;
pub(crate) const COMPONENT_MAX_TABLES: usize = 64;
pub(crate) const COMPONENT_TABLE_ELEMENTS: usize = 1_000_000;

/// Bytes of each pooled memory and table kept mapped and reset by zeroing.
const POOL_KEEP_RESIDENT: usize = 256 << 10;

/// The engine's settings: the same for serving and for the compiling child
/// process, so that what the child compiles loads here. `pool` is the number of
/// instance slots for a pooling allocator (which only changes how instances are
/// allocated, not how code is compiled).
pub fn engine_config(pool: Option<u32>) -> Config {
    let mut config = Config::new();
    config.epoch_interruption(true);
    // Nothing reads wasm backtraces, and capturing one costs on every trap.
    config.wasm_backtrace_max_frames(None);
    if let Some(slots) = pool {
        let mut pool = PoolingAllocationConfig::new();
        // Each slot may hold a component, several core instances with their
        // memories and tables; what a store may use is capped by its limits
        // (each listener's --max-memory), so a slot's memory is left at its
        // 4 GiB default: a module that asks for more than its listener allows
        // is then refused by the sandbox's check, which says so plainly.
        pool.total_component_instances(slots)
            .total_core_instances(slots * COMPONENT_MAX_INSTANCES as u32)
            .total_memories(slots * COMPONENT_MAX_MEMORIES as u32)
            .total_tables(slots * COMPONENT_MAX_TABLES as u32)
            .max_memories_per_module(1)
            .max_tables_per_module(MAX_TABLES as u32)
            .table_elements(MAX_TABLE_ELEMENTS)
            // Small guests are reset by zeroing rather than by remapping.
            .linear_memory_keep_resident(POOL_KEEP_RESIDENT)
            .table_keep_resident(POOL_KEEP_RESIDENT)
            .pagemap_scan(wasmtime::Enabled::Auto);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    config
}
