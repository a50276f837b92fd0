//! Metrics a guest defines and updates (`metric_define`, `metric_add`,
//! `metric_set`, `metric_observe`): one [`GuestMetrics`] per listener and
//! role, bounded in definitions, series and cells. Counters and histograms
//! live in per-worker blocks of cells, each written by one worker only and
//! summed at scrape; a worker finds a series in a cache of its own, so an
//! update takes no lock and allocates nothing once its series is known.
//! Gauges, which `set` overwrites, are one cell per series for all workers
//! (a compare-and-swap to add, never a lock).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use xxhash_rust::xxh3::Xxh3Builder;

use crate::verdict::MetricError;

/// A seed no guest can predict, so that it cannot aim label values at one
/// bucket of a worker's cache.
fn random_seed() -> u64 {
    use std::hash::BuildHasher as _;
    std::collections::hash_map::RandomState::new().hash_one(0u8)
}

/// Metric definitions a listener's guests (one role) may make.
pub const MAX_DEFINITIONS: usize = 64;
/// Ids ever given, replaced definitions included (a replaced one's id is not reused).
const MAX_IDS: usize = 4 * MAX_DEFINITIONS;
/// Label sets, of all metrics together, per listener and role; past it an
/// update goes to its metric's overflow series.
pub const MAX_SERIES: usize = 1024;
/// Guest-chosen labels per metric.
pub const MAX_LABELS: usize = 4;
/// Buckets of a histogram (a last, unbounded one is added).
pub const MAX_BUCKETS: usize = 16;
/// Bytes of a metric or label name.
pub const MAX_NAME_BYTES: usize = 64;
/// Bytes of a label value.
pub const MAX_LABEL_VALUE_BYTES: usize = 128;
/// 8-byte cells of one worker's block (128 KiB): a counter takes one, a
/// histogram its buckets + 2. Past it a new series goes to overflow.
pub const MAX_CELLS: usize = 16_384;

/// A histogram's buckets when its definition gives none (Prometheus's default).
pub const DEFAULT_BUCKETS: [f64; 11] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Labels the gateway sets itself, which a guest may not name.
const RESERVED_LABELS: [&str; 4] = ["listener", "role", "overflow", "le"];

/// Names whose exported family would be one of the gateway's own, or end
/// like a family's generated series (`_bucket`, `_sum`, `_count`).
fn reserved_name(name: &str) -> bool {
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

/// Whose metrics: the module serving the listener, or the candidate beside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Active,
    Candidate,
}

impl Role {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Candidate => "candidate",
        }
    }
}

/// A listener's guest metrics: the active module's and the candidate's apart,
/// so that a shadowed candidate never adds to the active's series.
#[derive(Debug, Default)]
pub struct ListenerMetrics {
    active: Arc<GuestMetrics>,
    candidate: Arc<GuestMetrics>,
}

impl ListenerMetrics {
    pub fn role(&self, role: Role) -> &Arc<GuestMetrics> {
        match role {
            Role::Active => &self.active,
            Role::Candidate => &self.candidate,
        }
    }
}

/// One listener's metrics of one role.
#[derive(Debug)]
pub struct GuestMetrics {
    inner: Mutex<Inner>,
    /// Bumped when a definition is replaced: writers then forget what they cached.
    epoch: AtomicU64,
    /// Series given so far; a writer sends a new label set to overflow
    /// without the lock once they are all given.
    series: AtomicUsize,
    /// Gauges' values (`f64` bits), one per series, shared by every worker.
    gauges: Box<[AtomicU64]>,
    /// The workers' blocks; a dropped writer's block goes back for the next.
    blocks: Mutex<Blocks>,
    overflowed: AtomicU64,
    refused: [AtomicU64; MetricError::ALL.len()],
}

impl Default for GuestMetrics {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            epoch: AtomicU64::new(0),
            series: AtomicUsize::new(0),
            gauges: (0..MAX_SERIES + MAX_DEFINITIONS).map(|_| AtomicU64::new(0)).collect(),
            blocks: Mutex::default(),
            overflowed: AtomicU64::new(0),
            refused: Default::default(),
        }
    }
}

#[derive(Debug, Default)]
struct Blocks {
    all: Vec<Arc<Block>>,
    free: Vec<usize>,
}

/// One worker's cells.
#[derive(Debug)]
struct Block(Box<[AtomicU64]>);

impl Block {
    fn add_f64(&self, at: usize, value: f64) {
        // One writer per block: a load and a store, no read-modify-write.
        let cell = &self.0[at];
        cell.store((f64::from_bits(cell.load(Relaxed)) + value).to_bits(), Relaxed);
    }

    fn add_one(&self, at: usize) {
        let cell = &self.0[at];
        cell.store(cell.load(Relaxed) + 1, Relaxed);
    }
}

#[derive(Debug, Default)]
struct Inner {
    defs: Vec<Definition>,
    by_name: HashMap<String, u32>,
    /// Key: the id (4 bytes, little-endian), then the label values joined by `\n`.
    series: HashMap<Box<[u8]>, Slot>,
    next_cell: usize,
    next_gauge: usize,
    live: usize,
}

#[derive(Debug)]
struct Definition {
    name: String,
    kind: MetricKind,
    labels: Vec<String>,
    buckets: Arc<[f64]>,
    /// The program that defined it last ([`crate::guest::Program`]'s serial):
    /// a newer one may redefine it, an older one may not.
    serial: u64,
    retired: bool,
    /// Its series: label values and slot, in order of creation.
    series: Vec<(Box<[String]>, Slot)>,
    overflow: Slot,
}

/// Where a series' values are: a cell of every block (counters, histograms)
/// or of `gauges`.
#[derive(Clone, Copy, Debug)]
struct Slot {
    id: u32,
    at: u32,
}

/// What a definition asks for.
#[derive(Debug)]
pub struct Spec<'a> {
    pub kind: MetricKind,
    pub name: &'a str,
    pub labels: &'a [&'a str],
    /// Upper bounds, strictly increasing and finite; none for the default.
    pub buckets: &'a [f64],
}

fn cells(kind: MetricKind, buckets: usize) -> usize {
    match kind {
        MetricKind::Counter => 1,
        MetricKind::Gauge => 0,
        // Per bucket, the unbounded one, and the sum.
        MetricKind::Histogram => buckets + 2,
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= MAX_NAME_BYTES
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A label value: UTF-8 up to [`MAX_LABEL_VALUE_BYTES`], no control
/// characters (quotes and backslashes are escaped when exported).
fn valid_value(value: &str) -> bool {
    value.len() <= MAX_LABEL_VALUE_BYTES && !value.chars().any(char::is_control)
}

/// The label values joined by `\n`, checked: as many as the metric's
/// labels, each valid.
fn check_values(joined: &[u8], labels: usize) -> Result<&str, MetricError> {
    let text = std::str::from_utf8(joined).map_err(|_| MetricError::Invalid)?;
    let ok = if labels == 0 {
        text.is_empty()
    } else {
        text.split('\n').count() == labels && text.split('\n').all(valid_value)
    };
    if ok { Ok(text) } else { Err(MetricError::Invalid) }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // What is under these locks stays consistent between statements, so a
    // panic elsewhere while one was held leaves nothing half-done.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl GuestMetrics {
    /// Counts a refused call under its reason.
    pub fn refuse(&self, error: MetricError) -> MetricError {
        self.refused[error.index()].fetch_add(1, Relaxed);
        error
    }

    /// Defines a metric, or finds the one defined alike (by any instance,
    /// before a reload too: a metric keeps its values while its name, kind,
    /// labels and buckets stay). `serial` orders programs: a newer one
    /// replaces an older one's definition of the name, an older one is refused.
    pub fn define(&self, spec: &Spec<'_>, serial: u64) -> Result<u32, MetricError> {
        self.try_define(spec, serial).map_err(|e| self.refuse(e))
    }

    fn try_define(&self, spec: &Spec<'_>, serial: u64) -> Result<u32, MetricError> {
        let name = match spec.kind {
            MetricKind::Counter => spec.name.strip_suffix("_total").unwrap_or(spec.name),
            _ => spec.name,
        };
        if !valid_name(name) || reserved_name(name) || name.starts_with("__") {
            return Err(MetricError::Invalid);
        }
        if spec.labels.len() > MAX_LABELS
            || spec.labels.iter().enumerate().any(|(i, label)| {
                !valid_name(label)
                    || label.starts_with("__")
                    || RESERVED_LABELS.contains(label)
                    || spec.labels[..i].contains(label)
            })
        {
            return Err(MetricError::Invalid);
        }
        let buckets: &[f64] = match spec.kind {
            MetricKind::Histogram if spec.buckets.is_empty() => &DEFAULT_BUCKETS,
            MetricKind::Histogram => spec.buckets,
            _ if spec.buckets.is_empty() => &[],
            _ => return Err(MetricError::Invalid),
        };
        if buckets.len() > MAX_BUCKETS
            || buckets.iter().any(|b| !b.is_finite())
            || buckets.windows(2).any(|w| w[0] >= w[1])
        {
            return Err(MetricError::Invalid);
        }
        let mut inner = lock(&self.inner);
        if let Some(&id) = inner.by_name.get(name) {
            let def = &mut inner.defs[id as usize];
            if def.kind == spec.kind && def.labels == spec.labels && *def.buckets == *buckets {
                def.serial = def.serial.max(serial);
                return Ok(id);
            }
            if def.serial >= serial {
                return Err(MetricError::Conflict);
            }
            // A newer module redefines the name: the old series are no longer
            // exported, and writers forget them.
            def.retired = true;
            let gone = def.series.len();
            inner.series.retain(|key, _| key[..4] != id.to_le_bytes());
            inner.live -= gone;
            inner.by_name.remove(name);
            self.epoch.fetch_add(1, Relaxed);
        }
        let live = inner.defs.iter().filter(|d| !d.retired).count();
        let need = cells(spec.kind, buckets.len());
        if live >= MAX_DEFINITIONS
            || inner.defs.len() >= MAX_IDS
            || inner.next_cell + need > MAX_CELLS
            || (spec.kind == MetricKind::Gauge && inner.next_gauge >= self.gauges.len())
        {
            return Err(MetricError::Cap);
        }
        let id = inner.defs.len() as u32;
        let overflow = inner.allocate(id, spec.kind, need);
        inner.defs.push(Definition {
            name: name.to_owned(),
            kind: spec.kind,
            labels: spec.labels.iter().map(|&l| l.to_owned()).collect(),
            buckets: buckets.into(),
            serial,
            retired: false,
            series: Vec::new(),
            overflow,
        });
        inner.by_name.insert(name.to_owned(), id);
        Ok(id)
    }

    /// The series of `key` (id, then values joined by `\n`), made if there is
    /// room; its metric's overflow series if not.
    fn series(&self, key: &[u8]) -> Result<(Slot, bool), MetricError> {
        let id = u32::from_le_bytes([key[0], key[1], key[2], key[3]]);
        let mut inner = lock(&self.inner);
        if let Some(&slot) = inner.series.get(key) {
            return Ok((slot, true));
        }
        let Some(def) = inner.defs.get(id as usize).filter(|d| !d.retired) else {
            return Err(MetricError::Unknown);
        };
        let values = check_values(&key[4..], def.labels.len())?;
        let values: Box<[String]> = if def.labels.is_empty() {
            Box::new([])
        } else {
            values.split('\n').map(str::to_owned).collect()
        };
        let (kind, need, overflow) = (def.kind, cells(def.kind, def.buckets.len()), def.overflow);
        let room = inner.live < MAX_SERIES
            && inner.next_cell + need <= MAX_CELLS
            && (kind != MetricKind::Gauge || inner.next_gauge < self.gauges.len());
        if !room {
            return Ok((overflow, false));
        }
        let slot = inner.allocate(id, kind, need);
        inner.live += 1;
        self.series.fetch_add(1, Relaxed);
        inner.defs[id as usize].series.push((values, slot));
        inner.series.insert(key.into(), slot);
        Ok((slot, true))
    }

    /// Takes a block for a new writer: a free one (whose values it goes on
    /// adding to), or a new one.
    fn take_block(&self) -> (usize, Arc<Block>) {
        let mut blocks = lock(&self.blocks);
        if let Some(index) = blocks.free.pop() {
            return (index, Arc::clone(&blocks.all[index]));
        }
        let block = Arc::new(Block((0..MAX_CELLS).map(|_| AtomicU64::new(0)).collect()));
        blocks.all.push(Arc::clone(&block));
        (blocks.all.len() - 1, block)
    }

    /// Every live metric, with each series' values summed over the workers, as
    /// `each` wants them.
    pub fn visit(&self, each: &mut dyn FnMut(Family<'_>)) {
        let inner = lock(&self.inner);
        let blocks: Vec<Arc<Block>> = lock(&self.blocks).all.clone();
        let sum = |at: usize| -> u64 { blocks.iter().map(|b| b.0[at].load(Relaxed)).sum() };
        let sum_f64 = |at: usize| -> f64 { blocks.iter().map(|b| f64::from_bits(b.0[at].load(Relaxed))).sum() };
        let value = |def: &Definition, slot: Slot| -> Value {
            let at = slot.at as usize;
            match def.kind {
                MetricKind::Counter => Value::Counter(sum_f64(at)),
                MetricKind::Gauge => Value::Gauge(f64::from_bits(self.gauges[at].load(Relaxed))),
                MetricKind::Histogram => {
                    let n = def.buckets.len();
                    let counts: Vec<u64> = (0..=n).map(|i| sum(at + i)).collect();
                    Value::Histogram {
                        buckets: def.buckets.iter().copied().chain([f64::INFINITY]).zip(counts).collect(),
                        sum: sum_f64(at + n + 1),
                    }
                }
            }
        };
        for def in inner.defs.iter().filter(|d| !d.retired) {
            let series = def
                .series
                .iter()
                .map(|(values, slot)| (Some(&values[..]), value(def, *slot)))
                // A metric without labels has one series and never overflows.
                .chain((!def.labels.is_empty()).then(|| (None, value(def, def.overflow))))
                .collect();
            each(Family {
                name: &def.name,
                kind: def.kind,
                labels: &def.labels,
                series,
            });
        }
    }

    /// Updates that went to an overflow series.
    pub fn overflowed(&self) -> u64 {
        self.overflowed.load(Relaxed)
    }

    /// Refused calls of one reason.
    pub fn refused(&self, error: MetricError) -> u64 {
        self.refused[error.index()].load(Relaxed)
    }
}

impl Inner {
    fn allocate(&mut self, id: u32, kind: MetricKind, cells: usize) -> Slot {
        let at = if kind == MetricKind::Gauge {
            self.next_gauge += 1;
            self.next_gauge - 1
        } else {
            self.next_cell += cells;
            self.next_cell - cells
        };
        Slot { id, at: at as u32 }
    }
}

/// One metric as a scrape sees it.
#[derive(Debug)]
pub struct Family<'a> {
    pub name: &'a str,
    pub kind: MetricKind,
    pub labels: &'a [String],
    /// Each series' label values (`None`: the overflow series) and value.
    pub series: Vec<(Option<&'a [String]>, Value)>,
}

/// A series' value, summed over the workers.
#[derive(Debug, PartialEq)]
pub enum Value {
    Counter(f64),
    Gauge(f64),
    /// Per-bucket counts (not cumulative), the unbounded bucket last, and the sum.
    Histogram {
        buckets: Vec<(f64, u64)>,
        sum: f64,
    },
}

/// What a definition's writer keeps of it.
#[derive(Clone, Debug)]
struct Known {
    kind: MetricKind,
    labels: usize,
    buckets: Arc<[f64]>,
    /// The label values of its last update and their series: a handler
    /// updates one series again and again, and a comparison costs less than
    /// hashing.
    last: Option<(Vec<u8>, Slot)>,
}

/// One worker's writer of a [`GuestMetrics`]: its block and its cache of
/// series, lent to each call of the guest.
#[derive(Debug)]
pub struct MetricsWriter {
    metrics: Arc<GuestMetrics>,
    block: Option<(usize, Arc<Block>)>,
    /// The series this worker knows, by key; xxh3 with a random seed (std's
    /// SipHash costs more than the rest of an update).
    cache: HashMap<Box<[u8]>, Slot, Xxh3Builder>,
    defs: Vec<Option<Known>>,
    epoch: u64,
    /// The series count when a label set last went to overflow: while it
    /// stays, every series is given and new label sets need no lock.
    full_at: Option<usize>,
    /// Each metric's overflow slot, once an update went there.
    overflow: Vec<Option<Slot>>,
    key: Vec<u8>,
}

/// How an update ended when it was not refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// In its own series.
    Series,
    /// In its metric's overflow series: the label set was one too many.
    Overflow,
}

impl MetricsWriter {
    pub fn new(metrics: Arc<GuestMetrics>) -> Self {
        Self {
            metrics,
            block: None,
            cache: HashMap::with_hasher(Xxh3Builder::new().with_seed(random_seed())),
            defs: Vec::new(),
            epoch: 0,
            full_at: None,
            overflow: Vec::new(),
            key: Vec::new(),
        }
    }

    /// The registry it writes to.
    pub fn metrics(&self) -> &Arc<GuestMetrics> {
        &self.metrics
    }

    /// `metric_add` on a counter (`value` ≥ 0) or a gauge.
    pub fn add(&mut self, id: u32, values: &[u8], value: f64) -> Result<Recorded, MetricError> {
        self.update(id, values, |kind, _| match kind {
            MetricKind::Counter if value >= 0.0 && value.is_finite() => Some(Op::AddCell(value)),
            MetricKind::Gauge if value.is_finite() => Some(Op::AddGauge(value)),
            _ => None,
        })
    }

    /// `metric_set` on a gauge.
    pub fn set(&mut self, id: u32, values: &[u8], value: f64) -> Result<Recorded, MetricError> {
        self.update(id, values, |kind, _| {
            (kind == MetricKind::Gauge && value.is_finite()).then_some(Op::SetGauge(value))
        })
    }

    /// `metric_observe` on a histogram.
    pub fn observe(&mut self, id: u32, values: &[u8], value: f64) -> Result<Recorded, MetricError> {
        self.update(id, values, |kind, buckets| {
            (kind == MetricKind::Histogram && !value.is_nan()).then(|| {
                let bucket = buckets.iter().position(|&b| value <= b).unwrap_or(buckets.len());
                Op::Observe(bucket, buckets.len(), value)
            })
        })
    }

    fn update(
        &mut self,
        id: u32,
        values: &[u8],
        op: impl FnOnce(MetricKind, &[f64]) -> Option<Op>,
    ) -> Result<Recorded, MetricError> {
        let result = self.try_update(id, values, op);
        result.map_err(|e| self.metrics.refuse(e))
    }

    fn try_update(
        &mut self,
        id: u32,
        values: &[u8],
        op: impl FnOnce(MetricKind, &[f64]) -> Option<Op>,
    ) -> Result<Recorded, MetricError> {
        let epoch = self.metrics.epoch.load(Relaxed);
        if epoch != self.epoch {
            self.cache.clear();
            self.defs.clear();
            self.full_at = None;
            self.overflow.clear();
            self.epoch = epoch;
        }
        if !matches!(self.defs.get(id as usize), Some(Some(_))) {
            self.learn(id)?;
        }
        let Some(Some(known)) = self.defs.get_mut(id as usize) else {
            return Err(MetricError::Unknown);
        };
        let op = op(known.kind, &known.buckets).ok_or(MetricError::Invalid)?;
        let (slot, recorded) = match &known.last {
            Some((last, slot)) if last.as_slice() == values => (*slot, Recorded::Series),
            _ => {
                let labels = known.labels;
                self.key.clear();
                self.key.extend_from_slice(&id.to_le_bytes());
                self.key.extend_from_slice(values);
                let found = match self.cache.get(self.key.as_slice()) {
                    Some(&slot) => (slot, Recorded::Series),
                    None => self.find(labels)?,
                };
                if let (Some(Some(known)), (slot, Recorded::Series)) = (self.defs.get_mut(id as usize), found) {
                    let last = known.last.get_or_insert_with(|| (Vec::new(), slot));
                    last.0.clear();
                    last.0.extend_from_slice(values);
                    last.1 = slot;
                }
                found
            }
        };
        if recorded == Recorded::Overflow {
            self.metrics.overflowed.fetch_add(1, Relaxed);
        }
        let at = slot.at as usize;
        match op {
            Op::SetGauge(v) => self.metrics.gauges[at].store(v.to_bits(), Relaxed),
            Op::AddGauge(v) => {
                let cell = &self.metrics.gauges[at];
                // Shared by the workers: a compare-and-swap, not a lock.
                let _ = cell.fetch_update(Relaxed, Relaxed, |bits| Some((f64::from_bits(bits) + v).to_bits()));
            }
            Op::AddCell(v) => self.block().add_f64(at, v),
            Op::Observe(bucket, n, v) => {
                let block = self.block();
                block.add_one(at + bucket);
                block.add_f64(at + n + 1, v);
            }
        }
        Ok(recorded)
    }

    /// The definition of `id`, asked of the registry once.
    fn learn(&mut self, id: u32) -> Result<(), MetricError> {
        let inner = lock(&self.metrics.inner);
        let def = inner
            .defs
            .get(id as usize)
            .filter(|d| !d.retired)
            .ok_or(MetricError::Unknown)?;
        let known = Known {
            kind: def.kind,
            labels: def.labels.len(),
            buckets: Arc::clone(&def.buckets),
            last: None,
        };
        drop(inner);
        let index = id as usize;
        if self.defs.len() <= index {
            self.defs.resize(index + 1, None);
        }
        self.defs[index] = Some(known);
        Ok(())
    }

    /// The slot of the label set in `key`, not cached yet.
    fn find(&mut self, labels: usize) -> Result<(Slot, Recorded), MetricError> {
        let given = self.metrics.series.load(Relaxed);
        if self.full_at == Some(given) {
            // No series was given since this writer learned them all: a label
            // set it does not know is one too many, found without the lock.
            check_values(&self.key[4..], labels)?;
            let id = u32::from_le_bytes([self.key[0], self.key[1], self.key[2], self.key[3]]);
            if let Some(slot) = self.overflow.get(id as usize).copied().flatten() {
                return Ok((slot, Recorded::Overflow));
            }
        }
        let (slot, own) = self.metrics.series(&self.key)?;
        if own {
            self.cache.insert(self.key.as_slice().into(), slot);
            return Ok((slot, Recorded::Series));
        }
        // Full: learn every series once (at most MAX_SERIES), so that the
        // next new label set needs no lock.
        let inner = lock(&self.metrics.inner);
        for (key, &slot) in &inner.series {
            self.cache.entry(key.clone()).or_insert(slot);
        }
        let given = self.metrics.series.load(Relaxed);
        drop(inner);
        let index = slot.id as usize;
        if self.overflow.len() <= index {
            self.overflow.resize(index + 1, None);
        }
        self.overflow[index] = Some(slot);
        self.full_at = Some(given);
        Ok((slot, Recorded::Overflow))
    }

    fn block(&mut self) -> &Block {
        let metrics = &self.metrics;
        &self.block.get_or_insert_with(|| metrics.take_block()).1
    }
}

impl Drop for MetricsWriter {
    fn drop(&mut self) {
        if let Some((index, _)) = self.block.take() {
            lock(&self.metrics.blocks).free.push(index);
        }
    }
}

enum Op {
    SetGauge(f64),
    AddGauge(f64),
    AddCell(f64),
    /// Bucket, bucket count, value.
    Observe(usize, usize, f64),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec<'a>(kind: MetricKind, name: &'a str, labels: &'a [&'a str]) -> Spec<'a> {
        Spec {
            kind,
            name,
            labels,
            buckets: &[],
        }
    }

    type Series = (Option<Vec<String>>, Value);

    fn values(metrics: &GuestMetrics) -> Vec<(String, Vec<Series>)> {
        let mut all = Vec::new();
        metrics.visit(&mut |f| {
            let series = f
                .series
                .into_iter()
                .map(|(v, value)| (v.map(<[String]>::to_vec), value))
                .collect();
            all.push((f.name.to_owned(), series));
        });
        all
    }

    #[test]
    fn two_writers_add_to_one_series_summed_at_scrape() {
        let metrics = Arc::new(GuestMetrics::default());
        let id = metrics.define(&spec(MetricKind::Counter, "hits", &["why"]), 1).unwrap();
        let (mut a, mut b) = (
            MetricsWriter::new(Arc::clone(&metrics)),
            MetricsWriter::new(Arc::clone(&metrics)),
        );
        for _ in 0..3 {
            assert_eq!(a.add(id, b"x", 1.0), Ok(Recorded::Series));
        }
        assert_eq!(b.add(id, b"x", 2.5), Ok(Recorded::Series));
        assert_eq!(
            b.add(id, b"x", -1.0),
            Err(MetricError::Invalid),
            "a counter never goes down"
        );
        assert_eq!(b.set(id, b"x", 1.0), Err(MetricError::Invalid), "nor is set");
        let all = values(&metrics);
        assert_eq!(all[0].1[0], (Some(vec!["x".to_owned()]), Value::Counter(5.5)));
        assert_eq!(metrics.refused(MetricError::Invalid), 2);
    }

    #[test]
    fn a_newer_program_replaces_a_definition_and_an_older_one_is_refused() {
        let metrics = Arc::new(GuestMetrics::default());
        let old = metrics.define(&spec(MetricKind::Counter, "hits", &[]), 1).unwrap();
        assert_eq!(
            metrics.define(&spec(MetricKind::Counter, "hits", &[]), 2),
            Ok(old),
            "alike: kept"
        );
        let mut w = MetricsWriter::new(Arc::clone(&metrics));
        w.add(old, b"", 1.0).unwrap();
        let new = metrics.define(&spec(MetricKind::Gauge, "hits", &[]), 3).unwrap();
        assert_ne!(new, old);
        assert_eq!(
            metrics.define(&spec(MetricKind::Counter, "hits", &[]), 2),
            Err(MetricError::Conflict)
        );
        assert_eq!(
            w.add(old, b"", 1.0),
            Err(MetricError::Unknown),
            "the writer forgot the old one"
        );
        w.set(new, b"", 7.0).unwrap();
        let all = values(&metrics);
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].1, vec![(Some(vec![]), Value::Gauge(7.0))]);
    }

    #[test]
    fn past_the_cap_new_label_sets_overflow_and_known_ones_still_count() {
        let metrics = Arc::new(GuestMetrics::default());
        let id = metrics
            .define(&spec(MetricKind::Counter, "by_key", &["key"]), 1)
            .unwrap();
        let (mut a, mut b) = (
            MetricsWriter::new(Arc::clone(&metrics)),
            MetricsWriter::new(Arc::clone(&metrics)),
        );
        for i in 0..MAX_SERIES {
            // Half the series made by each writer.
            let w = if i % 2 == 0 { &mut a } else { &mut b };
            assert_eq!(w.add(id, format!("k{i}").as_bytes(), 1.0), Ok(Recorded::Series));
        }
        assert_eq!(a.add(id, b"one too many", 1.0), Ok(Recorded::Overflow));
        // Without the lock now: a series `b` made is found, a new one overflows,
        // an invalid one is refused.
        assert_eq!(a.add(id, b"k1", 1.0), Ok(Recorded::Series));
        assert_eq!(a.add(id, b"another", 1.0), Ok(Recorded::Overflow));
        assert_eq!(a.add(id, b"bad\n", 1.0), Err(MetricError::Invalid));
        assert_eq!(metrics.overflowed(), 2);
        let all = values(&metrics);
        assert_eq!(all[0].1.len(), MAX_SERIES + 1);
        assert_eq!(all[0].1.last().unwrap(), &(None, Value::Counter(2.0)));
        assert_eq!(all[0].1[1], (Some(vec!["k1".to_owned()]), Value::Counter(2.0)));
    }

    #[test]
    fn histograms_count_per_bucket_and_sum() {
        let metrics = Arc::new(GuestMetrics::default());
        let buckets = [1.0, 10.0];
        let id = metrics
            .define(
                &Spec {
                    buckets: &buckets,
                    ..spec(MetricKind::Histogram, "latency", &[])
                },
                1,
            )
            .unwrap();
        let mut w = MetricsWriter::new(Arc::clone(&metrics));
        for v in [0.5, 1.0, 3.0, 100.0] {
            w.observe(id, b"", v).unwrap();
        }
        assert_eq!(w.observe(id, b"", f64::NAN), Err(MetricError::Invalid));
        let all = values(&metrics);
        assert_eq!(
            all[0].1[0].1,
            Value::Histogram {
                buckets: vec![(1.0, 2), (10.0, 1), (f64::INFINITY, 1)],
                sum: 104.5
            }
        );
        let unordered = [2.0, 1.0];
        let bad = Spec {
            buckets: &unordered,
            ..spec(MetricKind::Histogram, "bad", &[])
        };
        assert_eq!(metrics.define(&bad, 1), Err(MetricError::Invalid));
    }

    #[test]
    fn a_dropped_writers_block_is_reused_with_its_values() {
        let metrics = Arc::new(GuestMetrics::default());
        let id = metrics.define(&spec(MetricKind::Counter, "n", &[]), 1).unwrap();
        for _ in 0..3 {
            let mut w = MetricsWriter::new(Arc::clone(&metrics));
            w.add(id, b"", 1.0).unwrap();
        }
        assert_eq!(lock(&metrics.blocks).all.len(), 1);
        assert_eq!(values(&metrics)[0].1[0].1, Value::Counter(3.0));
    }
}
