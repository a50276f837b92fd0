//! Metrics a guest defines and updates (`metric_define`, `metric_add`,
//! `metric_set`, `metric_observe`): one [`GuestMetrics`] per listener and
//! role, bounded in definitions, series and cells. Counters and histograms
//! live in per-worker blocks of cells, each written by one worker only and
//! summed at scrape; a worker finds a series in a cache of its own, so an
//! update takes no lock and allocates nothing once its series is known.
//! Gauges, which `set` overwrites, are one cell per series for all workers
//! (a compare-and-swap to add, never a lock).

mod registry;
mod rules;
mod writer;

pub use registry::{Family, GuestMetrics, ListenerMetrics, Role, Spec, Value};
pub use rules::{MAX_BUCKETS, MAX_LABELS, MetricKind};
pub use writer::{MetricsWriter, Recorded};
