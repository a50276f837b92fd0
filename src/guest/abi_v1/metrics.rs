//! ABI v1's metric imports (docs/ABI.md, "Metrics"): `metric_define` reads
//! the name, the label names (joined by `\n`) and the buckets (`f64`,
//! little-endian) from guest memory; the updates read the label values
//! (joined by `\n`) and take the value as an `f64`. Each adapts a metric verb
//! of `guest::host`.

use wasmtime::{Caller, Linker};

use super::imports::{memory, region};
use crate::guest::abi::HOST_MODULE;
use crate::guest::host::{Calls, Update};
use crate::metrics::guest::{MAX_BUCKETS, MAX_LABELS, MetricKind, Recorded, Spec};
use crate::verdict::MetricError;

/// Defines the metric calls in `linker`.
pub(crate) fn define(linker: &mut Linker<Calls>) -> wasmtime::Result<()> {
    linker.func_wrap(HOST_MODULE, "metric_define", metric_define)?;
    for (name, update) in [
        ("metric_add", Update::Add),
        ("metric_set", Update::Set),
        ("metric_observe", Update::Observe),
    ] {
        linker.func_wrap(
            HOST_MODULE,
            name,
            move |caller: Caller<'_, Calls>, id: i32, ptr: i32, len: i32, value: f64| {
                metric_update(caller, name, update, (id, ptr, len), value)
            },
        )?;
    }
    Ok(())
}

/// `metric_define(kind, name_ptr, name_len, labels_ptr, labels_len,
/// buckets_ptr, buckets_count) -> i32`: the metric's id (0 or more), or a
/// negative code.
#[allow(clippy::too_many_arguments)]
fn metric_define(
    mut caller: Caller<'_, Calls>,
    kind: i32,
    name_ptr: i32,
    name_len: i32,
    labels_ptr: i32,
    labels_len: i32,
    buckets_ptr: i32,
    buckets_count: i32,
) -> wasmtime::Result<i32> {
    const F: &str = "metric_define";
    let mem = memory(&mut caller, F)?;
    let (memory, calls) = mem.data_and_store_mut(&mut caller);
    let name = region(memory, name_ptr, name_len, F, "the name")?;
    let labels = region(memory, labels_ptr, labels_len, F, "the label names")?;
    let invalid = |calls: &mut Calls| Ok(calls.metric_refused(MetricError::Invalid).code());
    // Checked before the region is read: a count past the bound is a refusal, not a trap.
    let count = buckets_count as u32 as usize;
    if count > MAX_BUCKETS {
        return invalid(calls);
    }
    let buckets = region(memory, buckets_ptr, (count * 8) as i32, F, "the buckets")?;
    let (Some(kind), Ok(name), Ok(labels)) = (
        MetricKind::from_code(kind),
        std::str::from_utf8(name),
        std::str::from_utf8(labels),
    ) else {
        return invalid(calls);
    };
    let mut names = [""; MAX_LABELS];
    let mut n = 0;
    for label in labels.split('\n').filter(|_| !labels.is_empty()) {
        let Some(slot) = names.get_mut(n) else {
            return invalid(calls);
        };
        *slot = label;
        n += 1;
    }
    let mut bounds = [0f64; MAX_BUCKETS];
    for (bound, bytes) in bounds.iter_mut().zip(buckets.chunks_exact(8)) {
        *bound = f64::from_le_bytes(bytes.try_into().unwrap_or_default());
    }
    let spec = Spec {
        kind,
        name,
        labels: &names[..n],
        buckets: &bounds[..count],
    };
    Ok(match calls.metric_define(&spec) {
        Ok(id) => id as i32,
        Err(error) => error.code(),
    })
}

/// `metric_add`, `metric_set`, `metric_observe(id, values_ptr, values_len,
/// value: f64) -> i32`: 0, 1 (recorded in the overflow series) or a negative code.
fn metric_update(
    mut caller: Caller<'_, Calls>,
    function: &str,
    update: Update,
    (id, ptr, len): (i32, i32, i32),
    value: f64,
) -> wasmtime::Result<i32> {
    let mem = memory(&mut caller, function)?;
    let (memory, calls) = mem.data_and_store_mut(&mut caller);
    let values = region(memory, ptr, len, function, "the label values")?;
    Ok(match calls.metric_update(update, id as u32, values, value) {
        Ok(Recorded::Series) => 0,
        Ok(Recorded::Overflow) => 1,
        Err(error) => error.code(),
    })
}
