//! The rules a guest's metric definitions and label values follow, and the
//! bounds on them: Prometheus's names, the gateway's own families reserved.

use crate::verdict::MetricError;

/// Metric definitions a listener's guests (one role) may make.
pub(super) const MAX_DEFINITIONS: usize = 64;
/// Ids ever given, replaced definitions included (a replaced one's id is not reused).
pub(super) const MAX_IDS: usize = 4 * MAX_DEFINITIONS;
/// Label sets, of all metrics together, per listener and role; past it an
/// update goes to its metric's overflow series.
pub(super) const MAX_SERIES: usize = 1024;
/// Guest-chosen labels per metric.
pub const MAX_LABELS: usize = 4;
/// Buckets of a histogram (a last, unbounded one is added).
pub const MAX_BUCKETS: usize = 16;
/// Bytes of a metric or label name.
pub(super) const MAX_NAME_BYTES: usize = 64;
/// Bytes of a label value.
pub(super) const MAX_LABEL_VALUE_BYTES: usize = 128;
/// 8-byte cells of one worker's block (128 KiB): a counter takes one, a
/// histogram its buckets + 2. Past it a new series goes to overflow.
pub(super) const MAX_CELLS: usize = 16_384;

/// A histogram's buckets when its definition gives none (Prometheus's default).
pub(super) const DEFAULT_BUCKETS: [f64; 11] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Labels the gateway sets itself, which a guest may not name.
pub(super) const RESERVED_LABELS: [&str; 4] = ["listener", "role", "overflow", "le"];

/// Names whose exported family would be one of the gateway's own, or end
/// like a family's generated series (`_bucket`, `_sum`, `_count`).
pub(super) fn reserved_name(name: &str) -> bool {
    name.starts_with("metrics_")
        || matches!(name, "calls_refused" | "duration_seconds")
        || ["_total", "_bucket", "_sum", "_count", "_created", "_info"]
            .iter()
            .any(|suffix| name.ends_with(suffix))
}

/// What a metric is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up (`metric_add` with a value ≥ 0); exported with `_total`.
    Counter,
    /// Set or moved either way (`metric_set`, `metric_add`).
    Gauge,
    /// Counts observations per bucket (`metric_observe`).
    Histogram,
}

impl MetricKind {
    /// The kind of ABI v1's code (0 counter, 1 gauge, 2 histogram).
    pub const fn from_code(code: i32) -> Option<Self> {
        match code {
            0 => Some(Self::Counter),
            1 => Some(Self::Gauge),
            2 => Some(Self::Histogram),
            _ => None,
        }
    }
}

pub(super) fn cells(kind: MetricKind, buckets: usize) -> usize {
    match kind {
        MetricKind::Counter => 1,
        MetricKind::Gauge => 0,
        // Per bucket, the unbounded one, and the sum.
        MetricKind::Histogram => buckets + 2,
    }
}

pub(super) fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= MAX_NAME_BYTES
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A label value: UTF-8 up to [`MAX_LABEL_VALUE_BYTES`], no control
/// characters (quotes and backslashes are escaped when exported).
pub(super) fn valid_value(value: &str) -> bool {
    value.len() <= MAX_LABEL_VALUE_BYTES && !value.chars().any(char::is_control)
}

/// The label values joined by `\n`, checked: as many as the metric's
/// labels, each valid.
pub(super) fn check_values(joined: &[u8], labels: usize) -> Result<&str, MetricError> {
    let text = std::str::from_utf8(joined).map_err(|_| MetricError::Invalid)?;
    let ok = if labels == 0 {
        text.is_empty()
    } else {
        text.split('\n').count() == labels && text.split('\n').all(valid_value)
    };
    if ok { Ok(text) } else { Err(MetricError::Invalid) }
}
