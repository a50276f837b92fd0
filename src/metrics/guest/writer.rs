//! One worker's writer of a listener's guest metrics ([`MetricsWriter`]):
//! its block of cells and its cache of series, so that an update takes no
//! lock and allocates nothing once its series is known.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use xxhash_rust::xxh3::Xxh3Builder;

use super::registry::{Block, GuestMetrics, Slot, lock};
use super::rules::{MetricKind, check_values};
use crate::verdict::MetricError;

/// A seed no guest can predict, so that it cannot aim label values at one
/// bucket of a worker's cache.
fn random_seed() -> u64 {
    use std::hash::BuildHasher as _;
    std::collections::hash_map::RandomState::new().hash_one(0u8)
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
    use super::super::registry::{Spec, Value};
    use super::super::rules::MAX_SERIES;
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
