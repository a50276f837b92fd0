//! The metric verbs (`metric_define`, `metric_add`, `metric_set`,
//! `metric_observe`): one method each on [`Calls`] for every kind of guest,
//! counted against the datagram's call limit. Definitions go to the
//! listener's registry of the module's role; updates go through the worker's
//! [`MetricsWriter`], lent to the store for each call.

use super::calls::Calls;
use crate::metrics::guest::{Recorded, Spec};
use crate::verdict::MetricError;

impl Calls {
    fn metric_call(&mut self) -> Result<(), MetricError> {
        self.out.count_call().map_err(|error| {
            self.out.refuse(error);
            MetricError::TooManyCalls
        })
    }

    /// `metric_define`: the id of the metric `spec` describes.
    pub(crate) fn metric_define(&mut self, spec: &Spec<'_>) -> Result<u32, MetricError> {
        self.metric_call()?;
        self.metrics.registry.define(spec, self.metrics.serial)
    }

    /// A metric call refused before it reached the registry (a kind, text or
    /// label value an adapter could not take): counted against the call limit
    /// and as a refusal all the same.
    pub(crate) fn metric_refused(&mut self, error: MetricError) -> MetricError {
        match self.metric_call() {
            Ok(()) => self.metrics.registry.refuse(error),
            Err(too_many) => too_many,
        }
    }

    /// `metric_add`, `metric_set` or `metric_observe` (`update` says which)
    /// on the series of `values` (joined by `\n`).
    pub(crate) fn metric_update(
        &mut self,
        update: Update,
        id: u32,
        values: &[u8],
        value: f64,
    ) -> Result<Recorded, MetricError> {
        self.metric_call()?;
        // None outside a call (in the start function): definitions only there.
        let Some(writer) = self.metrics.writer.as_mut() else {
            return Err(self.metrics.registry.refuse(MetricError::Invalid));
        };
        match update {
            Update::Add => writer.add(id, values, value),
            Update::Set => writer.set(id, values, value),
            Update::Observe => writer.observe(id, values, value),
        }
    }
}

/// Which update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Update {
    Add,
    Set,
    Observe,
}
