//! A listener's settings and every default, as plain data: where it
//! listens, what it runs and what each guest instance is held to.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::bounds::{DEFAULT_REPLY_RATIO, MAX_WORKERS};
use super::pool::PoolSpec;
use super::proving::{AccessLogSpec, CandidateSpec, RecordSpec};
use crate::net::proxied::TrustedProxies;
use crate::net::source_filter::PortSet;
use crate::state::{ClusterSpec, StateLimits};

/// What every guest instance is held to.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Time budget per datagram (alloc + handle), and for the start function:
    /// CPU time of the thread that runs the guest, so that a busy host does not
    /// charge a guest for the time it was preempted.
    pub timeout: Duration,
    /// The wall-time ceiling on the same, for a guest held up rather than
    /// computing; `None`: [`WALL_TIMEOUT_FACTOR`] times `timeout`.
    pub wall_timeout: Option<Duration>,
    /// Largest linear memory an instance may have, in bytes.
    pub max_memory: usize,
    /// How big the state the listener's handlers share may grow.
    pub state: StateLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_millis(10),
            wall_timeout: None,
            max_memory: 64 << 20,
            state: StateLimits::default(),
        }
    }
}

/// The wall-time ceiling of a guest call, unless set, in multiples of its CPU
/// budget: room for a worker that gets a tenth of a core on a busy host.
pub const WALL_TIMEOUT_FACTOR: u32 = 10;

impl Limits {
    /// The wall-time ceiling of a guest call: as set, else
    /// [`WALL_TIMEOUT_FACTOR`] times the CPU budget; never below the budget.
    pub fn wall_timeout(&self) -> Duration {
        self.wall_timeout
            .unwrap_or(self.timeout * WALL_TIMEOUT_FACTOR)
            .max(self.timeout)
    }
}

/// Whether a worker keeps one instance across datagrams or makes one per datagram.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Isolation {
    /// Reuse each worker's instance (fast); a fresh one replaces it after any trap,
    /// timeout or bad reply. Guest globals and memory survive between datagrams.
    #[default]
    Reuse,
    /// A fresh instance for every datagram: nothing survives between datagrams.
    Fresh,
}

impl fmt::Display for Isolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Reuse => "reuse",
            Self::Fresh => "fresh",
        })
    }
}

/// Datagrams per `recvmmsg`: enough to amortise the system call, small enough that
/// the replies of one batch leave promptly.
pub const DEFAULT_BATCH: usize = 32;

/// Everything needed to run one listener.
#[derive(Clone, Debug, PartialEq)]
pub struct ListenerSpec {
    /// Names the listener in logs and metrics (`listener="…"`).
    pub name: String,
    pub listen: SocketAddr,
    /// The module file; `None` serves the embedded uppercase guest.
    pub module: Option<PathBuf>,
    pub workers: usize,
    pub isolation: Isolation,
    pub limits: Limits,
    pub max_reply_ratio: f64,
    pub batch: usize,
    /// Reload the module when its file changes.
    pub watch: bool,
    /// The upstream pools the guest may forward to (every listener has them all,
    /// each with its own sessions).
    pub pools: Vec<PoolSpec>,
    /// Client source ports never answered (`0-1023` unless configured).
    pub deny_source_ports: PortSet,
    /// Sources that relay clients with a PROXY v2 header (none unless configured).
    pub proxy_protocol_from: TrustedProxies,
    /// `--record`: the listener's datagrams to a pcapng file.
    pub record: Option<RecordSpec>,
    /// `--access-log`: a JSON line per client datagram (a share of them).
    pub access_log: Option<AccessLogSpec>,
    /// `--candidate`: a second module shadowing (or canarying) the active one.
    pub candidate: Option<CandidateSpec>,
    /// `--state-redis`: limits shared with other gateways through Redis.
    pub cluster: Option<ClusterSpec>,
}

/// Where a listener listens unless told.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 8008));

/// The name of the listener the flags describe.
pub const DEFAULT_LISTENER_NAME: &str = "default";

/// Every listener default, written once: the flags and the TOML file start
/// from these.
impl Default for ListenerSpec {
    fn default() -> Self {
        Self {
            name: DEFAULT_LISTENER_NAME.to_string(),
            listen: DEFAULT_LISTEN,
            module: None,
            workers: default_workers(),
            isolation: Isolation::Reuse,
            limits: Limits::default(),
            max_reply_ratio: DEFAULT_REPLY_RATIO,
            batch: DEFAULT_BATCH,
            watch: true,
            pools: Vec::new(),
            deny_source_ports: PortSet::default(),
            proxy_protocol_from: TrustedProxies::default(),
            record: None,
            access_log: None,
            candidate: None,
            cluster: None,
        }
    }
}

/// One worker per available core, at most [`MAX_WORKERS`].
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .min(MAX_WORKERS)
}
