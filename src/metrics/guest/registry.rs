//! One listener's guest metrics of one role ([`GuestMetrics`]): the
//! definitions and series behind a lock that only a definition or a new
//! label set takes, the workers' blocks of cells, and what a scrape reads.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use arc_swap::ArcSwap;

use super::rules::{
    DEFAULT_BUCKETS, MAX_BUCKETS, MAX_CELLS, MAX_DEFINITIONS, MAX_IDS, MAX_LABELS, MAX_SERIES, MetricKind,
    RESERVED_LABELS, cells, check_values, reserved_name, valid_name,
};
use crate::verdict::MetricError;

/// Which of a listener's modules: the one serving it, or the candidate beside
/// it (`--candidate`); whose metrics, whose reloads.
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
/// so that a shadowed candidate never adds to the active's series. The
/// candidate's start afresh with each candidate.
#[derive(Debug, Default)]
pub struct ListenerMetrics {
    active: Arc<GuestMetrics>,
    candidate: ArcSwap<GuestMetrics>,
}

impl ListenerMetrics {
    pub fn role(&self, role: Role) -> Arc<GuestMetrics> {
        match role {
            Role::Active => Arc::clone(&self.active),
            Role::Candidate => self.candidate.load_full(),
        }
    }

    /// Forgets the candidate's metrics: a new candidate was loaded, or the
    /// last one promoted or unloaded. Its instances still running write to
    /// the old ones, which are no longer exported.
    pub fn new_candidate(&self) {
        self.candidate.store(Arc::default());
    }
}

/// One listener's metrics of one role.
#[derive(Debug)]
pub struct GuestMetrics {
    pub(super) inner: Mutex<Inner>,
    /// Bumped when a definition is replaced: writers then forget what they cached.
    pub(super) epoch: AtomicU64,
    /// Series given so far; a writer sends a new label set to overflow
    /// without the lock once they are all given.
    pub(super) series: AtomicUsize,
    /// Gauges' values (`f64` bits), one per series, shared by every worker.
    pub(super) gauges: Box<[AtomicU64]>,
    /// The workers' blocks; a dropped writer's block goes back for the next.
    pub(super) blocks: Mutex<Blocks>,
    pub(super) overflowed: AtomicU64,
    pub(super) refused: [AtomicU64; MetricError::ALL.len()],
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
pub(super) struct Blocks {
    pub(super) all: Vec<Arc<Block>>,
    pub(super) free: Vec<usize>,
}

/// One worker's cells.
#[derive(Debug)]
pub(super) struct Block(pub(super) Box<[AtomicU64]>);

impl Block {
    pub(super) fn add_f64(&self, at: usize, value: f64) {
        // One writer per block: a load and a store, no read-modify-write.
        let cell = &self.0[at];
        cell.store((f64::from_bits(cell.load(Relaxed)) + value).to_bits(), Relaxed);
    }

    pub(super) fn add_one(&self, at: usize) {
        let cell = &self.0[at];
        cell.store(cell.load(Relaxed) + 1, Relaxed);
    }
}

#[derive(Debug, Default)]
pub(super) struct Inner {
    pub(super) defs: Vec<Definition>,
    pub(super) by_name: HashMap<String, u32>,
    /// Key: the id (4 bytes, little-endian), then the label values joined by `\n`.
    pub(super) series: HashMap<Box<[u8]>, Slot>,
    pub(super) next_cell: usize,
    pub(super) next_gauge: usize,
    pub(super) live: usize,
}

#[derive(Debug)]
pub(super) struct Definition {
    pub(super) name: String,
    pub(super) kind: MetricKind,
    pub(super) labels: Vec<String>,
    pub(super) buckets: Arc<[f64]>,
    /// The program that defined it last ([`crate::guest::Program`]'s serial):
    /// a newer one may redefine it, an older one may not.
    pub(super) serial: u64,
    pub(super) retired: bool,
    /// Its series: label values and slot, in order of creation.
    pub(super) series: Vec<(Box<[String]>, Slot)>,
    pub(super) overflow: Slot,
}

/// Where a series' values are: a cell of every block (counters, histograms)
/// or of `gauges`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Slot {
    pub(super) id: u32,
    pub(super) at: u32,
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

pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
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
    pub(super) fn series(&self, key: &[u8]) -> Result<(Slot, bool), MetricError> {
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
    pub(super) fn take_block(&self) -> (usize, Arc<Block>) {
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

    /// Whether anything was ever defined or refused here (a role nobody used
    /// is not exported).
    pub fn used(&self) -> bool {
        !lock(&self.inner).defs.is_empty() || self.refused.iter().any(|n| n.load(Relaxed) > 0)
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
