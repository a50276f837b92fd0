//! The guests' own metrics on `/metrics`: each as `wasmgate_guest_<name>`,
//! labelled with its listener and its module's role (`active`, `candidate`)
//! before the guest's labels, and the refusals and overflows of the calls.

use std::collections::BTreeMap;
use std::fmt;

use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use crate::gateway::Publisher;
use crate::metrics::guest::{GuestMetrics, MetricKind, Role, Value};
use crate::verdict::MetricError;

/// One series: listener, role, the guest's labels (`None`: overflow), value.
type Row = (String, Role, Vec<(String, String)>, Value);

/// Encodes every listener's guest metrics. A name two listeners define with
/// different kinds is exported with the first listener's kind only.
pub(super) fn encode(encoder: &mut DescriptorEncoder<'_>, listeners: &[(String, Publisher)]) -> Result<(), fmt::Error> {
    let roles = [Role::Active, Role::Candidate];
    let mut families: BTreeMap<String, (MetricKind, Vec<Row>)> = BTreeMap::new();
    for (listener, publisher) in listeners {
        for role in roles {
            let metrics = publisher.guest_metrics().role(role);
            metrics.visit(&mut |family| {
                let (kind, rows) = families
                    .entry(family.name.to_owned())
                    .or_insert_with(|| (family.kind, Vec::new()));
                if *kind != family.kind {
                    return;
                }
                for (values, value) in family.series {
                    let labels = match values {
                        Some(values) => family.labels.iter().cloned().zip(values.iter().cloned()).collect(),
                        None => vec![("overflow".to_owned(), "true".to_owned())],
                    };
                    rows.push((listener.clone(), role, labels, value));
                }
            });
        }
    }
    for (name, (kind, rows)) in &families {
        let name = format!("wasmgate_guest_{name}");
        let (help, ty) = match kind {
            MetricKind::Counter => ("A counter the guest defines.", MetricType::Counter),
            MetricKind::Gauge => ("A gauge the guest defines.", MetricType::Gauge),
            MetricKind::Histogram => ("A histogram the guest defines.", MetricType::Histogram),
        };
        let mut family = encoder.encode_descriptor(&name, help, None, ty)?;
        for (listener, role, labels, value) in rows {
            let mut set: Vec<(&str, &str)> = vec![("listener", listener), ("role", role.as_str())];
            set.extend(labels.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            let mut series = family.encode_family(&set)?;
            match value {
                Value::Counter(v) => series.encode_counter::<NoLabelSet, _, f64>(v, None)?,
                Value::Gauge(v) => series.encode_gauge(v)?,
                Value::Histogram { buckets, sum } => {
                    let count = buckets.iter().map(|&(_, n)| n).sum();
                    series.encode_histogram::<NoLabelSet>(*sum, count, buckets, None)?;
                }
            }
        }
    }

    // The active module's always (a dashboard wants the series there); the
    // candidate's once it used them.
    let each = |f: &mut dyn FnMut(&str, Role, &GuestMetrics) -> Result<(), fmt::Error>| {
        for (listener, publisher) in listeners {
            for role in roles {
                let metrics = publisher.guest_metrics().role(role);
                if role == Role::Active || metrics.used() {
                    f(listener, role, &metrics)?;
                }
            }
        }
        Ok::<(), fmt::Error>(())
    };
    let mut overflowed = encoder.encode_descriptor(
        "wasmgate_guest_metrics_overflowed",
        "Guest metric updates recorded in their metric's overflow series: their label set was past the listener's series cap.",
        None,
        MetricType::Counter,
    )?;
    each(&mut |listener, role, metrics| {
        overflowed
            .encode_family(&[("listener", listener), ("role", role.as_str())])?
            .encode_counter::<NoLabelSet, _, u64>(&metrics.overflowed(), None)
    })?;
    let mut refused = encoder.encode_descriptor(
        "wasmgate_guest_metrics_refused",
        "Guest metric calls refused, by reason (docs/ABI.md, \"Metrics\").",
        None,
        MetricType::Counter,
    )?;
    each(&mut |listener, role, metrics| {
        for reason in MetricError::ALL {
            refused
                .encode_family(&[
                    ("listener", listener),
                    ("role", role.as_str()),
                    ("reason", reason.as_str()),
                ])?
                .encode_counter::<NoLabelSet, _, u64>(&metrics.refused(reason), None)?;
        }
        Ok(())
    })
}
