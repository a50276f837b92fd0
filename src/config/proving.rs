//! The settings for proving a module before it serves: `--record` and
//! `--candidate` (shadow, canary, promotion), and for watching one serve
//! (`--access-log`), as plain data.

use std::path::PathBuf;
use std::time::Duration;

/// The default of `--promote-min-clients`: one client, or a handful, cannot
/// speak for everyone.
pub const DEFAULT_PROMOTE_MIN_CLIENTS: usize = 10;

/// The default of `--promote-min-time`.
pub const DEFAULT_PROMOTE_MIN_TIME: Duration = Duration::from_secs(60);

/// The default of `--record-max-bytes`.
pub const DEFAULT_RECORD_MAX_BYTES: u64 = 100 << 20;

/// What to record and where (`--record`, `--record-sample`, `--record-max-bytes`).
#[derive(Clone, Debug, PartialEq)]
pub struct RecordSpec {
    pub path: PathBuf,
    /// The share of client datagrams recorded (with what the gateway did about them), 0..=1.
    pub sample: f64,
    /// Recording stops (with a log line) once the file is this large.
    pub max_bytes: u64,
}

impl RecordSpec {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            sample: 1.0,
            max_bytes: DEFAULT_RECORD_MAX_BYTES,
        }
    }
}

/// Where the access log goes and how much of the traffic (`--access-log`,
/// `--access-log-sample`).
#[derive(Clone, Debug, PartialEq)]
pub struct AccessLogSpec {
    /// The file, or `-` for standard output.
    pub path: PathBuf,
    /// The share of client datagrams logged, 0..=1.
    pub sample: f64,
}

/// A candidate module beside the active one (`--candidate`, `--shadow-sample`,
/// `--canary-percent`, `--promote-after`, `--shadow-mismatches`).
#[derive(Clone, Debug, PartialEq)]
pub struct CandidateSpec {
    pub path: PathBuf,
    /// The share of the active module's datagrams the candidate also runs on, stubbed, 0..=1.
    pub shadow_sample: f64,
    /// The share of clients (by address) the candidate serves for real, 0..=100.
    pub canary_percent: f64,
    /// Promote after this many candidate datagrams with no mismatch, trap or timeout.
    pub promote_after: Option<u64>,
    /// … from at least this many client networks (/24 or /48) …
    pub promote_min_clients: usize,
    /// … and no sooner than this after it was loaded.
    pub promote_min_time: Duration,
    /// Where the last mismatches are written, in the `--record` format.
    pub mismatches: Option<PathBuf>,
    /// Unload a candidate that traps or times out more often than the active.
    pub rollback: bool,
}

impl CandidateSpec {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            shadow_sample: 1.0,
            canary_percent: 0.0,
            promote_after: None,
            promote_min_clients: DEFAULT_PROMOTE_MIN_CLIENTS,
            promote_min_time: DEFAULT_PROMOTE_MIN_TIME,
            mismatches: None,
            rollback: true,
        }
    }
}

/// Checks a `--canary-percent`.
pub fn check_percent(p: f64) -> Result<f64, String> {
    if (0.0..=100.0).contains(&p) {
        Ok(p)
    } else {
        Err(format!("{p} is not a percentage from 0 to 100"))
    }
}

/// A sampled share: 0 to 1.
pub fn check_sample(r: f64) -> Result<f64, String> {
    if (0.0..=1.0).contains(&r) {
        Ok(r)
    } else {
        Err(format!("{r} is not a share: give a number from 0 to 1, such as 0.1"))
    }
}
