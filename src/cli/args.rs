//! Flags more than one command shares: the bounds on compiling a module, the
//! limits each guest instance is held to, and the log format.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::config::{Limits, check_timeout_ms, check_wall_timeout_ms, parse_size, parse_with};
use crate::engine::cache::Cache;
use crate::engine::child::{CompileBounds, Compiler};
use crate::state::StateLimits;

/// The bounds on compiling a module (at start-up, on reload, and for `check`),
/// for every listener. A module that needs more is refused, saying which bound.
#[derive(Debug, Args)]
pub struct CompileArgs {
    /// Most CPU time compiling a module may take, in seconds (1 to 3600): a
    /// compile slowed by a busy host is not refused for time it did not get.
    #[arg(long, value_name = "SECONDS", default_value_t = 60, value_parser = |s: &str| parse_with(s, check_compile_timeout))]
    pub compile_timeout: u64,

    /// Longest a compile may take in wall time, however little CPU it got, in
    /// seconds (1 to 3600).
    #[arg(long, value_name = "SECONDS", default_value_t = 600, value_parser = |s: &str| parse_with(s, check_compile_timeout))]
    pub compile_wall_timeout: u64,

    /// Most memory compiling a module may take: bytes, or a number with MiB or GiB (at least 16MiB).
    #[arg(long, value_name = "SIZE", default_value = "1GiB", value_parser = parse_compile_memory)]
    pub compile_memory: usize,

    /// Where compiled modules are kept, so that a restart with the same module
    /// skips compiling it (default: $XDG_CACHE_HOME/wasmgate, else ~/.cache/wasmgate).
    /// It must be this user's and not writable by group or others, or it is not used.
    #[arg(long, value_name = "DIR", conflicts_with = "no_cache")]
    pub cache_dir: Option<PathBuf>,

    /// The key that authenticates cache entries, made on first use; it must be
    /// outside the cache directory and readable by this user only (default:
    /// $XDG_STATE_HOME/wasmgate/cache.key, else ~/.local/state/wasmgate/cache.key).
    #[arg(long, value_name = "FILE", conflicts_with = "no_cache")]
    pub cache_key: Option<PathBuf>,

    /// Compile every module afresh; keep nothing on disk.
    #[arg(long)]
    pub no_cache: bool,
}

impl CompileArgs {
    /// A compiler that runs this executable as a child process under these bounds.
    pub fn compiler(&self) -> anyhow::Result<Compiler> {
        Compiler::this_executable(
            CompileBounds {
                timeout: Duration::from_secs(self.compile_timeout),
                wall_timeout: Duration::from_secs(self.compile_wall_timeout),
                max_memory: self.compile_memory as u64,
            },
            self.cache(),
        )
    }

    /// The cache in use, if any: a cache directory or key that cannot be used
    /// safely is refused with a warning, and modules are then compiled afresh.
    pub fn cache(&self) -> Option<Cache> {
        let dir = self.cache_dir()?;
        let key = self.cache_key()?;
        match Cache::open(&dir, &key) {
            Ok(cache) => Some(cache),
            Err(e) => {
                tracing::warn!(
                    cache = %dir.display(),
                    "the compile cache is not used: {e:#}"
                );
                None
            }
        }
    }

    /// The cache key's file, if the cache is used.
    pub fn cache_key(&self) -> Option<PathBuf> {
        if self.no_cache {
            return None;
        }
        if let Some(key) = &self.cache_key {
            return Some(key.clone());
        }
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        var("XDG_STATE_HOME")
            .or_else(|| var("HOME").map(|h| h.join(".local").join("state")))
            .map(|base| base.join("wasmgate").join("cache.key"))
    }

    /// The cache directory in use, if any.
    pub fn cache_dir(&self) -> Option<PathBuf> {
        if self.no_cache {
            return None;
        }
        if let Some(dir) = &self.cache_dir {
            return Some(dir.clone());
        }
        let home = |var: &str| std::env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from);
        home("XDG_CACHE_HOME")
            .or_else(|| home("HOME").map(|h| h.join(".cache")))
            .map(|base| base.join("wasmgate"))
    }
}

fn check_compile_timeout(seconds: u64) -> Result<u64, String> {
    match seconds {
        1..=3600 => Ok(seconds),
        _ => Err(format!("{seconds} is out of range: give 1 to 3600 seconds")),
    }
}

fn parse_compile_memory(s: &str) -> Result<usize, String> {
    match parse_size(s)? {
        n if n >= 16 << 20 => Ok(n),
        _ => Err("too small: give at least 16MiB".into()),
    }
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// What each guest instance is held to.
#[derive(Debug, Args)]
pub struct LimitArgs {
    /// Time budget for the guest per datagram (and for its start function), in
    /// milliseconds of CPU time (1 to 60000): time the worker spends preempted
    /// on a busy host is not charged.
    #[arg(long, value_name = "MS", default_value_t = 10, value_parser = |s: &str| parse_with(s, |ms| check_timeout_ms(ms).map(|_| ms)))]
    pub timeout_ms: u64,

    /// Wall-time ceiling on the same, in milliseconds (1 to 600000), for a guest
    /// held up rather than computing (default: ten times --timeout-ms; never
    /// below it).
    #[arg(long, value_name = "MS", value_parser = |s: &str| parse_with(s, |ms| check_wall_timeout_ms(ms).map(|_| ms)))]
    pub wall_timeout_ms: Option<u64>,

    /// Largest linear memory per guest instance: bytes, or a number with KiB, MiB or GiB.
    #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = parse_size)]
    pub max_memory: usize,

    /// Most bytes the state the handlers share may hold (keys, values, and 128 bytes
    /// an entry): bytes, or a number with KiB, MiB or GiB.
    #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = parse_size)]
    pub state_max_bytes: usize,

    /// Most entries (values, limits, penalties) the shared state may hold.
    #[arg(long, value_name = "N", default_value_t = StateLimits::default().max_entries)]
    pub state_max_entries: usize,
}

impl LimitArgs {
    pub fn limits(&self) -> Limits {
        Limits {
            timeout: Duration::from_millis(self.timeout_ms),
            wall_timeout: self.wall_timeout_ms.map(Duration::from_millis),
            max_memory: self.max_memory,
            state: StateLimits {
                max_bytes: self.state_max_bytes,
                max_entries: self.state_max_entries,
            },
        }
    }
}
