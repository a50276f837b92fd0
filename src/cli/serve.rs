//! `wasmgate serve` (the default command): its flags, the one listener they
//! describe (or the config file they name), and starting the service.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;

use super::args::{CompileArgs, LimitArgs, LogFormat};
use crate::config::{
    self, DEFAULT_BATCH, DEFAULT_REPLY_RATIO, Isolation, ListenerSpec, PoolSpec, check_batch, check_ratio,
    check_workers, parse_addr, parse_size, parse_upstream_flag, parse_with,
};
use crate::engine::child::Compiler;

/// Options for serving (the default command).
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Serve every listener described in this TOML file (see examples/wasmgate.toml)
    /// instead of the one described by the flags below.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["listen", "module", "workers", "isolation", "max_reply_ratio", "batch", "no_watch", "timeout_ms", "wall_timeout_ms", "max_memory", "state_max_bytes", "state_max_entries", "state_redis", "state_redis_ca", "upstream", "deny_source_ports", "proxy_protocol_from", "record", "access_log", "candidate"])]
    pub config: Option<PathBuf>,

    /// Address to listen on: IPv4 (`0.0.0.0:9000`) or IPv6 (`[::]:9000`).
    #[arg(long, value_name = "ADDR", default_value_t = config::DEFAULT_LISTEN, value_parser = parse_addr)]
    pub listen: SocketAddr,

    /// Guest module to run: a `.wasm` binary or `.wat` text [default: the embedded uppercase guest].
    #[arg(long, value_name = "PATH")]
    pub module: Option<PathBuf>,

    /// Worker threads (1 to 256), each with its own socket and guest instance [default: available cores].
    #[arg(long, value_name = "N", value_parser = |s: &str| parse_with(s, check_workers))]
    pub workers: Option<usize>,

    /// `reuse`: each worker keeps its instance across datagrams (replaced after a trap
    /// or timeout); `fresh`: a new instance per datagram, so no state survives.
    #[arg(long, value_enum, default_value_t)]
    pub isolation: Isolation,

    /// Drop replies larger than this multiple of their request, so that spoofed
    /// requests cannot be amplified (RFC 9000 §8); 0 disables the check.
    #[arg(long, value_name = "RATIO", default_value_t = DEFAULT_REPLY_RATIO, value_parser = |s: &str| parse_with(s, check_ratio))]
    pub max_reply_ratio: f64,

    /// Datagrams taken per receive system call (recvmmsg), their replies sent with
    /// one sendmmsg; 1 takes one datagram per system call.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_BATCH, value_parser = |s: &str| parse_with(s, check_batch))]
    pub batch: usize,

    /// An upstream pool the guest may forward to, as NAME=ENDPOINT[,ENDPOINT…];
    /// repeat for more pools. Endpoints are IP:PORT, [IPv6]:PORT or HOST:PORT.
    /// Pools from flags take the default settings (hash policy, 60 s idle
    /// timeout); a config file can change them.
    #[arg(long, value_name = "NAME=ENDPOINTS", value_parser = parse_upstream_flag)]
    pub upstream: Vec<PoolSpec>,

    /// Client source ports never answered, as ranges (`0-1023,5353`) or `none`:
    /// services on well-known ports answer anything, so answering them can start
    /// a loop from one spoofed datagram. The gateway's own sockets and its pools'
    /// endpoints are never answered whatever this says.
    #[arg(long, value_name = "PORTS", default_value = crate::net::source_filter::DEFAULT_DENIED_PORTS)]
    pub deny_source_ports: crate::net::source_filter::PortSet,

    /// Sources, as CIDR blocks (`10.0.0.0/8,2001:db8::/32`), whose every
    /// datagram must start with a PROXY protocol v2 header naming the real
    /// client: that client is the client everywhere, and answers go back
    /// through the proxy with a header. A datagram from such a source without
    /// a valid header is dropped; from any other source a header is payload.
    #[arg(long, value_name = "CIDRS")]
    pub proxy_protocol_from: Option<crate::net::proxied::TrustedProxies>,

    /// Do not watch the module file for changes (SIGHUP still reloads it).
    #[arg(long)]
    pub no_watch: bool,

    /// Record the listener's datagrams to this pcapng file (readable by tcpdump
    /// and tshark, replayed by `wasmgate replay`): client datagrams with the
    /// module's sha256 and what became of them, replies, forwards and upstream
    /// answers. Recording never slows a worker: past a bounded queue datagrams
    /// are not recorded and counted (wasmgate_record_dropped_total).
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,

    /// The share of datagrams recorded, 0 to 1.
    #[arg(long, value_name = "SHARE", default_value_t = 1.0, requires = "record", value_parser = |s: &str| parse_with(s, config::check_sample))]
    pub record_sample: f64,

    /// Recording stops (with a log line) once the file is this large.
    #[arg(long, value_name = "SIZE", default_value = "100MiB", requires = "record", value_parser = parse_size)]
    pub record_max_bytes: usize,

    /// Write one JSON line per client datagram to this file (`-`: standard
    /// output): time, client, bytes in and out, verdict and drop reason, guest
    /// time, upstream, module and the guest's note. Never slows a worker: past
    /// a bounded queue lines are dropped and counted
    /// (wasmgate_access_log_dropped_total). The file is created 0600, never
    /// through a symbolic link, and reopened on SIGHUP (logrotate's convention).
    #[arg(long, value_name = "FILE")]
    pub access_log: Option<PathBuf>,

    /// The share of client datagrams the access log writes, 0 to 1.
    #[arg(long, value_name = "SHARE", default_value_t = 1.0, requires = "access_log", value_parser = |s: &str| parse_with(s, config::check_sample))]
    pub access_log_sample: f64,

    /// Load this module beside the active one as a candidate: it runs on the
    /// same datagrams (a share given by --shadow-sample) after the active has
    /// answered, with its own instance and limits and its forwards stubbed,
    /// and what it would have done is compared (wasmgate_shadow_total).
    /// Clients see only the active module. Edits reload it like the active.
    #[arg(long, value_name = "PATH")]
    pub candidate: Option<PathBuf>,

    /// The share of datagrams the candidate shadows, 0 to 1.
    #[arg(long, value_name = "SHARE", default_value_t = 1.0, requires = "candidate", value_parser = |s: &str| parse_with(s, config::check_sample))]
    pub shadow_sample: f64,

    /// Let the candidate serve this percentage of clients for real, chosen by
    /// a hash of the client's IP address (a client stays on its side).
    #[arg(long, value_name = "P", default_value_t = 0.0, requires = "candidate", value_parser = |s: &str| parse_with(s, config::check_percent))]
    pub canary_percent: f64,

    /// Promote the candidate to active after N of its datagrams with no
    /// mismatch, trap or timeout (SIGUSR1 promotes by hand). A candidate
    /// trapping or timing out more often than the active is unloaded.
    #[arg(long, value_name = "N", requires = "candidate")]
    pub promote_after: Option<u64>,

    /// Promote only once the clean datagrams came from at least N client
    /// networks (IPv4 /24, IPv6 /48): one client cannot force a promotion.
    #[arg(long, value_name = "N", default_value_t = config::DEFAULT_PROMOTE_MIN_CLIENTS, requires = "promote_after")]
    pub promote_min_clients: usize,

    /// Promote no sooner than this many seconds after the candidate was loaded.
    #[arg(long, value_name = "SECONDS", default_value_t = config::DEFAULT_PROMOTE_MIN_TIME.as_secs(), requires = "promote_after")]
    pub promote_min_time: u64,

    /// Share the handlers' `limit` buckets, `state_incr` counters and penalties
    /// with every gateway using this Redis (`redis://HOST:PORT`, `rediss://` for
    /// TLS): each flushes what it spent, added and penalized every few
    /// milliseconds, never on the datagram path (see docs/ABI.md for the error
    /// this allows).
    #[arg(long, value_name = "URL")]
    pub state_redis: Option<String>,

    /// With Redis unreachable: `open` (each gateway limits alone) or `closed`
    /// (every `limit` call denies until Redis is back).
    #[arg(long, value_name = "open|closed", default_value = "open", requires = "state_redis")]
    pub state_redis_failure: String,

    /// How often, in milliseconds, limits, counters and penalties are flushed
    /// to Redis (1 to 1000).
    #[arg(long, value_name = "MS", default_value_t = 5, requires = "state_redis")]
    pub state_redis_flush_ms: u64,

    /// The name this service's keys are kept under in Redis (default: the
    /// listener's name, `default` from flags, which every flag-started gateway
    /// shares): gateways that share limits must give the same one.
    #[arg(long, value_name = "NAME", requires = "state_redis", value_parser = |s: &str| config::state::check_namespace(s))]
    pub state_redis_namespace: Option<String>,

    /// For a `rediss://` (TLS) URL: the CA certificates (PEM) to trust for
    /// Redis's certificate, instead of the system's roots.
    #[arg(long, value_name = "FILE", requires = "state_redis")]
    pub state_redis_ca: Option<std::path::PathBuf>,

    /// Keep a candidate loaded however often it traps or times out (to study
    /// it, or to measure what it costs); it is still never promoted automatically.
    #[arg(long, requires = "candidate")]
    pub no_rollback: bool,

    /// Keep the last 100 shadow mismatches in this file, in the --record
    /// format (with the active module's replies), for `wasmgate replay`.
    #[arg(long, value_name = "FILE", requires = "candidate")]
    pub shadow_mismatches: Option<PathBuf>,

    /// Serve Prometheus metrics over HTTP at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    pub metrics: Option<SocketAddr>,

    /// Log as human-readable text or as one JSON object per line.
    #[arg(long, value_enum, default_value_t)]
    pub log_format: LogFormat,

    #[command(flatten)]
    pub limits: LimitArgs,

    #[command(flatten)]
    pub compile: CompileArgs,
}

/// The one listener the flags describe; what a flag leaves out is
/// [`ListenerSpec::default`], as in a config file.
pub(super) fn listener_from_flags(args: &ServeArgs) -> anyhow::Result<ListenerSpec> {
    let defaults = ListenerSpec::default();
    let cluster = match &args.state_redis {
        Some(url) => Some(
            config::cluster_spec(
                url,
                Some(&args.state_redis_failure),
                Duration::from_millis(args.state_redis_flush_ms),
                args.state_redis_namespace.as_deref(),
                args.state_redis_ca.as_deref(),
            )
            .context("--state-redis")?,
        ),
        None => None,
    };
    Ok(ListenerSpec {
        listen: args.listen,
        module: args.module.clone(),
        workers: args.workers.unwrap_or(defaults.workers),
        isolation: args.isolation,
        limits: args.limits.limits(),
        max_reply_ratio: args.max_reply_ratio,
        batch: args.batch,
        watch: !args.no_watch,
        pools: args.upstream.clone(),
        deny_source_ports: args.deny_source_ports.clone(),
        proxy_protocol_from: args.proxy_protocol_from.clone().unwrap_or_default(),
        access_log: args.access_log.as_ref().map(|path| config::AccessLogSpec {
            path: path.clone(),
            sample: args.access_log_sample,
        }),
        record: args.record.as_ref().map(|path| config::RecordSpec {
            path: path.clone(),
            sample: args.record_sample,
            max_bytes: args.record_max_bytes as u64,
        }),
        candidate: args.candidate.as_ref().map(|path| config::CandidateSpec {
            path: path.clone(),
            shadow_sample: args.shadow_sample,
            canary_percent: args.canary_percent,
            promote_after: args.promote_after,
            promote_min_clients: args.promote_min_clients,
            promote_min_time: Duration::from_secs(args.promote_min_time),
            mismatches: args.shadow_mismatches.clone(),
            rollback: !args.no_rollback,
        }),
        cluster,
        ..defaults
    })
}

/// What `serve` was asked to run, checked: the listeners (from the flags or the
/// file), the file they came from, the metrics address and the compiler.
#[derive(Debug)]
pub struct Plan {
    pub listeners: Vec<ListenerSpec>,
    pub config: Option<PathBuf>,
    pub metrics: Option<SocketAddr>,
    pub compiler: Compiler,
}

impl ServeArgs {
    /// Reads the flags (and the config file they name) into a [`Plan`]; an `Err`
    /// names the flag or the file and what is wrong with it.
    pub fn plan(&self) -> anyhow::Result<Plan> {
        let (listeners, file_metrics) = match &self.config {
            Some(path) => {
                let file = config::load(path, config::default_workers())?;
                (file.listeners, file.metrics)
            }
            None => {
                let spec = listener_from_flags(self)?;
                config::check_pools(&spec.pools)?;
                (vec![spec], None)
            }
        };
        Ok(Plan {
            listeners,
            config: self.config.clone(),
            // --metrics on the command line wins over the file's [metrics].
            metrics: self.metrics.or(file_metrics),
            compiler: self.compile.compiler()?,
        })
    }
}

impl Plan {
    /// Serves until the future `shutdown()` makes completes; see
    /// [`crate::service::run_until`].
    pub fn run_until<S: Future<Output = ()>>(
        self,
        shutdown: impl FnOnce() -> anyhow::Result<S>,
        ready: impl FnOnce(&crate::service::Bound),
    ) -> anyhow::Result<()> {
        crate::service::run_until(
            self.listeners,
            self.config.as_deref(),
            self.metrics,
            &self.compiler,
            shutdown,
            ready,
        )
    }
}

pub(super) fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let plan = args.plan()?;
    crate::service::run(plan.listeners, plan.config.as_deref(), plan.metrics, &plan.compiler)
}
