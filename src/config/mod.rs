//! What to serve: one listener from command-line flags, or several from a TOML
//! file (`--config`). Both end as a list of [`ListenerSpec`]s, checked before
//! anything binds: unknown keys, bad values and clashing addresses are refused with
//! the file, the key and the reason.
mod bounds;
mod file;
mod listener;
mod pool;
mod proving;
pub mod state;
mod upstreams;

pub use file::{FileConfig, check_clashes, load, schema};
pub use listener::*;
pub use pool::*;

pub use bounds::{
    DEFAULT_REPLY_RATIO, MAX_BATCH, MAX_TIMEOUT_MS, MAX_WALL_TIMEOUT_MS, MAX_WORKERS, check_batch, check_ratio,
    check_timeout_ms, check_wall_timeout_ms, check_workers, parse_addr, parse_duration, parse_size, parse_with,
};
pub use proving::{
    AccessLogSpec, CandidateSpec, DEFAULT_PROMOTE_MIN_CLIENTS, DEFAULT_PROMOTE_MIN_TIME, DEFAULT_RECORD_MAX_BYTES,
    RecordSpec, check_percent, check_sample,
};
pub use state::{DEFAULT_REDIS_FLUSH, cluster_spec};
