//! What one guest instance may hold in all. wasmtime's `StoreLimits` caps each
//! memory and each table on its own, so a component of 16 memories and 64 tables
//! could hold many times `--max-memory`; here every memory and table of the
//! store counts against one total, and the counts (instances, memories, tables)
//! stay wasmtime's.

use wasmtime::{ResourceLimiter, StoreLimits};

/// Bytes a table element is counted as: a function reference is a pointer.
pub const TABLE_ELEMENT_BYTES: usize = 8;

/// A [`ResourceLimiter`] with one byte budget for all memories and tables.
pub struct InstanceLimits {
    counts: StoreLimits,
    max_bytes: usize,
    used: usize,
}

impl InstanceLimits {
    /// `counts` bounds how many instances, memories and tables there may be and
    /// each one's size; `max_bytes` bounds what they hold together.
    pub fn new(counts: StoreLimits, max_bytes: usize) -> Self {
        Self {
            counts,
            max_bytes,
            used: 0,
        }
    }

    /// Bytes of memory and table held now.
    pub fn used(&self) -> usize {
        self.used
    }

    /// Admits growth by `more` bytes against the total, or refuses it as a trap
    /// (a guest that outgrows its cap is replaced, not left with a failed grow).
    fn admit(&mut self, more: usize, what: &str) -> wasmtime::Result<()> {
        match self.used.checked_add(more) {
            Some(total) if total <= self.max_bytes => Ok(()),
            _ => wasmtime::bail!(
                "growing a {what} by {more} bytes would take the instance past its {} byte memory cap \
                 (memories and tables together; max_memory)",
                self.max_bytes
            ),
        }
    }
}

impl ResourceLimiter for InstanceLimits {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        let more = desired.saturating_sub(current);
        self.admit(more, "memory")?;
        let allowed = self.counts.memory_growing(current, desired, maximum)?;
        if allowed {
            self.used += more;
        }
        Ok(allowed)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.counts.memory_grow_failed(error)
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        let more = desired.saturating_sub(current).saturating_mul(TABLE_ELEMENT_BYTES);
        self.admit(more, "table")?;
        let allowed = self.counts.table_growing(current, desired, maximum)?;
        if allowed {
            self.used += more;
        }
        Ok(allowed)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.counts.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.counts.instances()
    }

    fn tables(&self) -> usize {
        self.counts.tables()
    }

    fn memories(&self) -> usize {
        self.counts.memories()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::{Engine, Instance, Module, Store, StoreLimitsBuilder};

    const MIB: usize = 1 << 20;

    fn store(max: usize) -> Store<InstanceLimits> {
        let counts = StoreLimitsBuilder::new()
            .memory_size(max)
            .memories(4)
            .tables(4)
            .trap_on_grow_failure(true)
            .build();
        let mut store = Store::new(&Engine::default(), InstanceLimits::new(counts, max));
        store.limiter(|l| l);
        store
    }

    #[test]
    fn memories_count_together_against_one_cap() {
        // Three instances of 16 MiB each fit 64 MiB as they come; the fourth
        // (over 48 MiB already held) does not, though each alone fits.
        let mut s = store(56 * MIB);
        let module = Module::new(s.engine(), r#"(module (memory 256))"#).unwrap();
        for _ in 0..3 {
            Instance::new(&mut s, &module, &[]).unwrap();
        }
        assert_eq!(s.data().used(), 48 * MIB);
        let err = Instance::new(&mut s, &module, &[]).unwrap_err();
        assert!(format!("{err:#}").contains("memory cap"), "{err:#}");
    }

    #[test]
    fn tables_count_too_and_growth_past_the_cap_traps() {
        let mut s = store(MIB);
        let module = Module::new(
            s.engine(),
            r#"(module (memory 8) (table 0 funcref)
                (func (export "grow") (param i32) (result i32)
                  (table.grow (ref.null func) (local.get 0))))"#,
        )
        .unwrap();
        let instance = Instance::new(&mut s, &module, &[]).unwrap();
        let grow = instance.get_typed_func::<i32, i32>(&mut s, "grow").unwrap();
        // 8 pages (512 KiB) held: 64 Ki elements of 8 bytes fit, 64 Ki more do not.
        assert_eq!(grow.call(&mut s, 64 * 1024).unwrap(), 0);
        assert!(grow.call(&mut s, 64 * 1024).is_err());
    }
}
