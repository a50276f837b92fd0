//! Metrics the handler defines (docs/ABI.md, "Metrics"): a [`Metric`] is a
//! `static`, defined with the host on its first update, and exported on the
//! gateway's `/metrics` as `wasmgate_guest_<name>`.

use core::sync::atomic::{AtomicI32, Ordering::Relaxed};

use crate::host;

/// Why a metric call did nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricError {
    /// A name, label or value breaks the rules, or the label values do not
    /// match the labels (docs/ABI.md, "Metrics").
    Invalid,
    /// The name is defined with another kind, labels or buckets.
    Conflict,
    /// The listener's definitions are all taken.
    Cap,
    /// More than 64 calls for one datagram.
    TooMany,
    /// A code this SDK does not know (a newer host).
    Other(i32),
}

impl MetricError {
    fn from_code(code: i32) -> Self {
        match code {
            -8 => Self::TooMany,
            -17 => Self::Invalid,
            -18 => Self::Conflict,
            -20 => Self::Cap,
            other => Self::Other(other),
        }
    }
}

/// Not defined yet.
const UNDEFINED: i32 = i32::MIN;

/// Label values or names, joined by `\n` as the host reads them: four of
/// at most 128 bytes fit.
struct Joined {
    buf: [u8; 4 * 129],
    len: usize,
}

impl Joined {
    fn new(parts: &[&str]) -> Result<Self, MetricError> {
        let mut joined = Self { buf: [0; 4 * 129], len: 0 };
        for (i, part) in parts.iter().enumerate() {
            let need = part.len() + usize::from(i > 0);
            let end = joined.len + need;
            let dst = joined.buf.get_mut(joined.len..end).ok_or(MetricError::Invalid)?;
            if i > 0 {
                dst[0] = b'\n';
            }
            dst[usize::from(i > 0)..].copy_from_slice(part.as_bytes());
            joined.len = end;
        }
        Ok(joined)
    }
}

/// A counter, gauge or histogram of the handler:
///
/// ```ignore
/// static REFUSED: Metric = Metric::counter("refused", &["reason"]);
/// let _ = REFUSED.add(&["rate"], 1.0);
/// ```
///
/// Every instance of the handler, on every worker, defines the same metric
/// and adds to the same series; it keeps its values across reloads while its
/// name, kind, labels and buckets stay.
pub struct Metric {
    kind: i32,
    name: &'static str,
    labels: &'static [&'static str],
    buckets: &'static [f64],
    id: AtomicI32,
}

impl Metric {
    /// A counter, exported as `wasmgate_guest_<name>_total`; only goes up.
    pub const fn counter(name: &'static str, labels: &'static [&'static str]) -> Self {
        Self::new(0, name, labels, &[])
    }

    /// A gauge: set, or moved either way.
    pub const fn gauge(name: &'static str, labels: &'static [&'static str]) -> Self {
        Self::new(1, name, labels, &[])
    }

    /// A histogram with `buckets` (upper bounds, increasing; none for
    /// Prometheus's default, 5 ms to 10 s).
    pub const fn histogram(name: &'static str, labels: &'static [&'static str], buckets: &'static [f64]) -> Self {
        Self::new(2, name, labels, buckets)
    }

    const fn new(kind: i32, name: &'static str, labels: &'static [&'static str], buckets: &'static [f64]) -> Self {
        Self {
            kind,
            name,
            labels,
            buckets,
            id: AtomicI32::new(UNDEFINED),
        }
    }

    /// Adds `value` to the series of the label `values` (a counter: ≥ 0).
    pub fn add(&self, values: &[&str], value: f64) -> Result<(), MetricError> {
        self.update(values, value, |id, p, n, v| unsafe { host::metric_add(id, p, n, v) })
    }

    /// Sets a gauge's series to `value`.
    pub fn set(&self, values: &[&str], value: f64) -> Result<(), MetricError> {
        self.update(values, value, |id, p, n, v| unsafe { host::metric_set(id, p, n, v) })
    }

    /// Counts `value` in a histogram's series.
    pub fn observe(&self, values: &[&str], value: f64) -> Result<(), MetricError> {
        self.update(values, value, |id, p, n, v| unsafe { host::metric_observe(id, p, n, v) })
    }

    /// The host's id, defining the metric on first use; a refused
    /// definition is not asked again.
    fn id(&self) -> Result<i32, MetricError> {
        let id = match self.id.load(Relaxed) {
            UNDEFINED => {
                let labels = Joined::new(self.labels)?;
                // SAFETY: the name, the labels and the buckets are valid for the call.
                let id = unsafe {
                    host::metric_define(
                        self.kind,
                        self.name.as_ptr(),
                        self.name.len() as i32,
                        labels.buf.as_ptr(),
                        labels.len as i32,
                        self.buckets.as_ptr(),
                        self.buckets.len() as i32,
                    )
                };
                // Past the call limit it may work on another datagram.
                if id != -8 {
                    self.id.store(id, Relaxed);
                }
                id
            }
            id => id,
        };
        if id < 0 { Err(MetricError::from_code(id)) } else { Ok(id) }
    }

    fn update(
        &self,
        values: &[&str],
        value: f64,
        call: impl FnOnce(i32, *const u8, i32, f64) -> i32,
    ) -> Result<(), MetricError> {
        let id = self.id()?;
        let values = Joined::new(values)?;
        match call(id, values.buf.as_ptr(), values.len as i32, value) {
            // 1: recorded in the overflow series (the host counts it).
            0 | 1 => Ok(()),
            code => Err(MetricError::from_code(code)),
        }
    }
}
