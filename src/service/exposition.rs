//! Prometheus metrics over HTTP: a collector that reads every listener's counters
//! when scraped (nothing on the datagram path), served at `/metrics` in the
//! Prometheus text format, with a bounded number of connections, each with a
//! header-read timeout and a bounded lifetime.

use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::gateway::Publisher;
use crate::metrics::{GUEST_TIME_BUCKETS_NS, Snapshot};
use crate::prove::ShadowResult;
use crate::upstream::{EndpointTotals, EndpointView, Pools};
use crate::verdict::{CallError, DropReason};

/// The listeners whose counters a scrape reports, by name.
pub struct GatewayCollector {
    listeners: Vec<(String, Publisher)>,
}

impl fmt::Debug for GatewayCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.listeners.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("GatewayCollector").field("listeners", &names).finish()
    }
}

/// A registry reporting `listeners`.
pub fn registry(listeners: Vec<(String, Publisher)>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(GatewayCollector { listeners }));
    registry
}

/// A counter family: name (without `_total`), help, and its value in a snapshot.
type CounterFamily = (&'static str, &'static str, fn(&Snapshot) -> u64);

const COUNTERS: [CounterFamily; 20] = [
    ("wasmgate_datagrams_received", "Datagrams received.", |s| s.received),
    ("wasmgate_datagrams_replied", "Datagrams answered with a reply.", |s| {
        s.replied
    }),
    ("wasmgate_bytes_received", "Payload bytes received.", |s| s.bytes_in),
    ("wasmgate_bytes_sent", "Payload bytes sent in replies.", |s| s.bytes_out),
    (
        "wasmgate_receive_errors",
        "Failed receive calls (the loop carries on).",
        |s| s.recv_errors,
    ),
    (
        "wasmgate_queue_overflows",
        "Datagrams the kernel dropped because a socket's receive queue was full.",
        |s| s.queue_overflows,
    ),
    ("wasmgate_reloads", "Module versions published by a reload.", |s| {
        s.reloads
    }),
    (
        "wasmgate_reload_failures",
        "Reloads refused: unreadable file or a module that failed its checks.",
        |s| s.reload_failures,
    ),
    (
        "wasmgate_datagrams_forwarded",
        "Datagrams the guest forwarded upstream without answering the client itself.",
        |s| s.forwarded,
    ),
    (
        "wasmgate_upstream_datagrams_received",
        "Datagrams received from upstream endpoints.",
        |s| s.upstream_received,
    ),
    (
        "wasmgate_upstream_bytes_received",
        "Payload bytes received from upstream endpoints.",
        |s| s.upstream_bytes_in,
    ),
    ("wasmgate_sessions_created", "Upstream sessions opened.", |s| {
        s.sessions_created
    }),
    (
        "wasmgate_session_idle_timeouts",
        "Upstream sessions closed after idle_timeout without traffic.",
        |s| s.sessions_expired,
    ),
    (
        "wasmgate_proxied_datagrams",
        "Datagrams a trusted proxy relayed with a valid PROXY v2 header naming the client.",
        |s| s.proxied,
    ),
    (
        "wasmgate_proxied_clients_full",
        "Datagrams from a trusted proxy naming a new client past the clients a worker keeps (dropped).",
        |s| s.proxied_full,
    ),
    (
        "wasmgate_client_handles_evicted",
        "Client handles of shared pools freed to make room for a new client (never one that proved its address).",
        |s| s.handles_evicted,
    ),
    (
        "wasmgate_record_dropped",
        "Datagrams --record did not record because its queue was full.",
        |s| s.record_dropped,
    ),
    (
        "wasmgate_access_log_dropped",
        "Access log lines dropped because the writer was behind (its queue was full).",
        |s| s.access_log_dropped,
    ),
    ("wasmgate_access_log_lines", "Access log lines written.", |s| {
        s.access_log_lines
    }),
    (
        "wasmgate_shadow_skipped",
        "Datagrams not shadowed because the candidate was behind (its queue was full).",
        |s| s.shadow_skipped,
    ),
];

impl GatewayCollector {
    /// Per endpoint of every pool: traffic both ways and health.
    fn encode_endpoints(&self, encoder: &mut DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let now = Instant::now();
        let pools: Vec<(&str, Arc<Pools>)> = self
            .listeners
            .iter()
            .filter_map(|(n, p)| Some((n.as_str(), p.pools()?)))
            .collect();
        let views: Vec<(&str, Vec<EndpointView<'_>>)> = pools.iter().map(|(n, p)| (*n, p.endpoints(now))).collect();
        for (name, help, value) in EndpointTotals::COUNTERS {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (listener, endpoints) in &views {
                for e in endpoints {
                    let addr = e.addr.to_string();
                    family
                        .encode_family(&[("listener", *listener), ("pool", e.pool), ("endpoint", addr.as_str())])?
                        .encode_counter::<NoLabelSet, _, u64>(&value(&e.totals), None)?;
                }
            }
        }
        for &(name, help, value) in EndpointTotals::GAUGES {
            let value = |e: &EndpointView<'_>| i64::try_from(value(&e.totals)).unwrap_or(i64::MAX);
            encode_endpoint_gauge(encoder, &views, (name, help), value)?;
        }
        let healthy = (
            "wasmgate_endpoint_healthy",
            "1 when the endpoint takes new sessions, 0 while it is ejected.",
        );
        encode_endpoint_gauge(encoder, &views, healthy, |e| i64::from(e.healthy))?;
        Ok(())
    }
}

/// A gauge family (name, help) with a sample per endpoint of every listener.
fn encode_endpoint_gauge(
    encoder: &mut DescriptorEncoder<'_>,
    views: &[(&str, Vec<EndpointView<'_>>)],
    (name, help): (&str, &str),
    value: impl Fn(&EndpointView<'_>) -> i64,
) -> Result<(), fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (listener, endpoints) in views {
        for e in endpoints {
            let addr = e.addr.to_string();
            family
                .encode_family(&[("listener", *listener), ("pool", e.pool), ("endpoint", addr.as_str())])?
                .encode_gauge(&value(e))?;
        }
    }
    Ok(())
}

/// A counter family (name, help) with a sample per listener and `reason`, the
/// value of reason `i` in a snapshot given by `value`.
fn encode_by_reason(
    encoder: &mut DescriptorEncoder<'_>,
    (name, help): (&str, &str),
    snapshots: &[(&str, Snapshot)],
    reasons: &[&str],
    value: fn(&Snapshot, usize) -> u64,
) -> Result<(), fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (listener, s) in snapshots {
        for (i, reason) in reasons.iter().enumerate() {
            family
                .encode_family(&[("listener", *listener), ("reason", *reason)])?
                .encode_counter::<NoLabelSet, _, u64>(&value(s, i), None)?;
        }
    }
    Ok(())
}

impl Collector for GatewayCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let snapshots: Vec<(&str, Snapshot)> = self.listeners.iter().map(|(n, p)| (n.as_str(), p.stats())).collect();

        for (name, help, value) in COUNTERS {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (listener, s) in &snapshots {
                family
                    .encode_family(&[("listener", *listener)])?
                    .encode_counter::<NoLabelSet, _, u64>(&value(s), None)?;
            }
        }

        let drop_reasons = DropReason::ALL.map(DropReason::as_str);
        encode_by_reason(
            &mut encoder,
            ("wasmgate_datagrams_dropped", "Datagrams not answered, by reason."),
            &snapshots,
            &drop_reasons,
            |s, i| s.dropped[i],
        )?;
        encode_by_reason(
            &mut encoder,
            (
                "wasmgate_guest_calls_refused",
                "forward, forward_key and send calls refused, by reason.",
            ),
            &snapshots,
            &CallError::ALL.map(CallError::as_str),
            |s, i| s.refused[i],
        )?;
        encode_by_reason(
            &mut encoder,
            (
                "wasmgate_upstream_datagrams_dropped",
                "Datagrams from upstreams not passed on to the client, by reason (no_reply: on_reply returned -1).",
            ),
            &snapshots,
            &drop_reasons,
            |s, i| s.upstream_dropped[i],
        )?;
        encode_by_reason(
            &mut encoder,
            (
                "wasmgate_proxy_header_errors",
                "Malformed PROXY v2 headers from trusted proxies and from pools that speak the protocol, by reason.",
            ),
            &snapshots,
            &crate::net::proxy_v2::HeaderError::ALL.map(crate::net::proxy_v2::HeaderError::as_str),
            |s, i| s.proxy_header_errors[i],
        )?;

        let mut active = encoder.encode_descriptor(
            "wasmgate_sessions_active",
            "Upstream sessions open now.",
            None,
            MetricType::Gauge,
        )?;
        for (listener, s) in &snapshots {
            active
                .encode_family(&[("listener", *listener)])?
                .encode_gauge(&i64::try_from(s.sessions_active).unwrap_or(i64::MAX))?;
        }
        let mut handles = encoder.encode_descriptor(
            "wasmgate_client_handles",
            "Clients of shared pools holding a handle now (waiting for answers, or lately answered).",
            None,
            MetricType::Gauge,
        )?;
        for (listener, s) in &snapshots {
            handles
                .encode_family(&[("listener", *listener)])?
                .encode_gauge(&i64::try_from(s.handles_active).unwrap_or(i64::MAX))?;
        }

        self.encode_endpoints(&mut encoder)?;

        let mut histogram = encoder.encode_descriptor(
            "wasmgate_guest_duration_seconds",
            "Time the guest took per datagram.",
            None,
            MetricType::Histogram,
        )?;
        for (listener, s) in &snapshots {
            // Per-bucket counts: the encoder makes them cumulative.
            let buckets: Vec<(f64, u64)> = s
                .guest_time
                .iter()
                .enumerate()
                .map(|(i, &n)| {
                    (
                        GUEST_TIME_BUCKETS_NS
                            .get(i)
                            .map_or(f64::INFINITY, |&ns| ns as f64 / 1e9),
                        n,
                    )
                })
                .collect();
            let count = s.guest_time.iter().sum();
            histogram
                .encode_family(&[("listener", *listener)])?
                .encode_histogram::<NoLabelSet>(s.guest_time_sum_ns as f64 / 1e9, count, &buckets, None)?;
        }

        super::guest_metrics::encode(&mut encoder, &self.listeners)?;

        let mut shadow = encoder.encode_descriptor(
            "wasmgate_shadow",
            "Datagrams the candidate module shadowed, by what its verdict was against the active's.",
            None,
            MetricType::Counter,
        )?;
        for (listener, s) in &snapshots {
            for (result, n) in ShadowResult::ALL.iter().zip(s.shadow) {
                shadow
                    .encode_family(&[("listener", *listener), ("result", result.as_str())])?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }

        for (name, help, value) in [
            (
                "wasmgate_state_entries",
                "Entries (values, limits, penalties) in the state the handlers share.",
                (|s| s.state.entries) as fn(&Snapshot) -> u64,
            ),
            (
                "wasmgate_state_bytes",
                "Bytes the shared state holds: keys, values and 128 bytes an entry.",
                |s| s.state.bytes,
            ),
        ] {
            let mut gauge = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (listener, s) in &snapshots {
                gauge
                    .encode_family(&[("listener", *listener)])?
                    .encode_gauge(&i64::try_from(value(s)).unwrap_or(i64::MAX))?;
            }
        }
        let mut evictions = encoder.encode_descriptor(
            "wasmgate_state_evictions",
            "Live entries evicted from the shared state to make room (shortest time left first).",
            None,
            MetricType::Counter,
        )?;
        for (listener, s) in &snapshots {
            evictions
                .encode_family(&[("listener", *listener)])?
                .encode_counter::<NoLabelSet, _, u64>(&s.state.evictions, None)?;
        }
        let mut limits = encoder.encode_descriptor(
            "wasmgate_limit",
            "Calls of the limit host call, by result.",
            None,
            MetricType::Counter,
        )?;
        for (listener, s) in &snapshots {
            for (result, n) in [("allowed", s.state.allowed), ("denied", s.state.denied)] {
                limits
                    .encode_family(&[("listener", *listener), ("result", result)])?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }

        let clustered: Vec<(&str, crate::state::ClusterStats)> = snapshots
            .iter()
            .filter_map(|(listener, s)| Some((*listener, s.cluster?)))
            .collect();
        if !clustered.is_empty() {
            for (name, help, value) in [
                (
                    "wasmgate_state_redis_up",
                    "1 while Redis answers the flushes of the shared limits, counters and penalties (the cluster scope), else 0.",
                    (|c| u64::from(c.up)) as fn(&crate::state::ClusterStats) -> u64,
                ),
                (
                    "wasmgate_state_cluster_gateways",
                    "Gateways sharing this listener's limits, counters and penalties through Redis (flushed in the last 3 s).",
                    |c| u64::from(c.gateways),
                ),
            ] {
                let mut gauge = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
                for (listener, c) in &clustered {
                    gauge
                        .encode_family(&[("listener", *listener)])?
                        .encode_gauge(&i64::try_from(value(c)).unwrap_or(i64::MAX))?;
                }
            }
            let mut errors = encoder.encode_descriptor(
                "wasmgate_state_redis_errors",
                "Flushes to Redis that failed (unreachable, timeout), and keys whose flush Redis refused.",
                None,
                MetricType::Counter,
            )?;
            for (listener, c) in &clustered {
                errors
                    .encode_family(&[("listener", *listener)])?
                    .encode_counter::<NoLabelSet, _, u64>(&c.errors, None)?;
            }
        }

        let mut info = encoder.encode_descriptor(
            "wasmgate_module",
            "The modules each listener has loaded: the active one serving, and a candidate.",
            None,
            MetricType::Info,
        )?;
        for (listener, publisher) in &self.listeners {
            let active = Some(publisher.current());
            for (role, program) in [("active", active), ("candidate", publisher.candidate())] {
                let Some(program) = program else { continue };
                info.encode_info(&[
                    ("listener", listener.as_str()),
                    ("role", role),
                    ("module", program.origin()),
                    ("abi", program.kind().name()),
                    ("sha256", program.sha256_hex().as_str()),
                ])?;
            }
        }
        Ok(())
    }
}

/// How long a client may take to send a request's headers, counted from the
/// connection (or the previous response): a half-sent request is closed then.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest a connection may stay open, however it is used: scrapers
/// reconnect, so nothing legitimate needs more, and an idle keep-alive ends here.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// Connections served at once; more wait in the kernel's backlog, costing the
/// process no file descriptor.
const MAX_CONNECTIONS: usize = 64;

/// Serves `GET /metrics` from `registry` until the task is dropped.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        // A slot first, so that no more than MAX_CONNECTIONS are ever accepted.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: wait, then take the next one.
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let registry = Arc::clone(&registry);
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req: Request<Incoming>| {
                let response = respond(&req, &registry);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_LIFETIME, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "metrics connection ended"),
                Err(_) => tracing::debug!("metrics connection closed after {CONNECTION_LIFETIME:?}"),
            }
        });
    }
}

fn respond(req: &Request<Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    if req.method() != Method::GET || req.uri().path() != "/metrics" {
        let mut response = Response::new(Full::new(Bytes::from_static(b"not found: try GET /metrics\n")));
        *response.status_mut() = StatusCode::NOT_FOUND;
        return response;
    }
    let mut body = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut body, registry) {
        let mut response = Response::new(Full::new(Bytes::from(format!("cannot encode metrics: {e}\n"))));
        *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        return response;
    }
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}
