//! The command line: its options, and the `serve` (default), `check` and `send`
//! commands.

pub mod new;
mod send;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{
    self, DEFAULT_BATCH, DEFAULT_REPLY_RATIO, ListenerSpec, PoolSpec, check_batch, check_ratio, check_timeout_ms,
    check_wall_timeout_ms, check_workers, parse_addr, parse_size, parse_upstream_flag, parse_with,
};
use crate::config::{Isolation, Limits};
use crate::engine::cache::Cache;
use crate::engine::child::{CompileBounds, Compiler};
use crate::guest::Env;
use crate::state::StateLimits;

/// A UDP gateway whose behaviour is a sandboxed WebAssembly module.
///
/// Every datagram received is handed to the guest module; what it returns goes
/// back to the client as one datagram. With no --module it serves the embedded
/// guest, which uppercases ASCII letters. Logging follows RUST_LOG (default: info).
#[derive(Debug, Parser)]
#[command(name = "wasmgate", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a module against the guest ABI and the limits without serving.
    ///
    /// Compiles the module, checks its exports and imports, and runs its start
    /// function once under the time and memory limits. Prints what is wrong and
    /// exits 1 if it cannot serve; exits 0 if it can.
    Check {
        /// The module: a `.wasm` binary or `.wat` text.
        module: PathBuf,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        compile: CompileArgs,
    },
    /// Start a handler project: writes NAME/ with a minimal handler in LANG
    /// (and wit/handler.wit for components), and prints the commands that build
    /// and serve it.
    New {
        /// The language.
        #[arg(long, value_enum)]
        lang: crate::cli::new::Lang,
        /// The project's name, which is also its directory.
        name: String,
        /// Where to create the project directory.
        #[arg(long, value_name = "DIR", default_value = ".")]
        dir: PathBuf,
    },
    /// Replay a capture's client datagrams through a module and compare.
    ///
    /// Reads pcap (as tcpdump writes it) or pcapng (as tshark or --record write
    /// it). The client datagrams are those sent to PORT; each goes through MODULE
    /// in capture order, with its client's address and a clock read off the
    /// capture. Nothing is sent: forwards are reported, and the upstream answers
    /// of a --record capture are fed to `on_reply`. MODULE is compared with
    /// OLD run the same way, or without --against with the replies the capture
    /// holds. Exits 0 when nothing differs, 1 when something does, 2 on bad input.
    Replay {
        /// The capture file.
        capture: PathBuf,
        /// The module to try: a `.wasm` binary or `.wat` text.
        #[arg(long, value_name = "NEW")]
        module: PathBuf,
        /// Compare with this module rather than with the recorded replies.
        #[arg(long, value_name = "OLD")]
        against: Option<PathBuf>,
        /// The gateway's UDP port in the capture [default: the port that received most datagrams; on a tie, the one that received first].
        #[arg(long, value_name = "P")]
        port: Option<u16>,
        /// An upstream pool the module may forward to, as for serving (never contacted).
        #[arg(long, value_name = "NAME=ENDPOINTS", value_parser = parse_upstream_flag)]
        upstream: Vec<PoolSpec>,
        /// `reuse` or `fresh`, as for serving.
        #[arg(long, value_enum, default_value_t)]
        isolation: Isolation,
        /// As for serving.
        #[arg(long, value_name = "RATIO", default_value_t = DEFAULT_REPLY_RATIO, value_parser = |s: &str| parse_with(s, check_ratio))]
        max_reply_ratio: f64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Internal: compile a module from stdin under a memory bound (the gateway's
    /// compiling child process).
    #[command(name = "__compile", hide = true)]
    Compile {
        /// The data limit in bytes.
        max_memory: String,
        /// The CPU time limit in seconds.
        cpu_seconds: String,
    },
    /// Send datagrams to a gateway and print the replies.
    ///
    /// Each MESSAGE is sent as one datagram and its reply printed on a line, or
    /// `no reply` after the timeout. With no MESSAGE, lines are read from standard
    /// input until EOF, each sent as one datagram (with a `>>: ` prompt when it is a
    /// terminal). Exits 1 if any message got no reply.
    Send {
        /// The gateway: IP:PORT or HOST:PORT, such as 127.0.0.1:8008.
        addr: String,
        /// Messages to send, one datagram each.
        messages: Vec<String>,
        /// How long to wait for each reply, in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = 1000)]
        timeout_ms: u64,
    },
}

/// Options for serving (the default command).
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Serve every listener described in this TOML file (see examples/wasmgate.toml)
    /// instead of the one described by the flags below.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["listen", "module", "workers", "isolation", "max_reply_ratio", "batch", "no_watch", "timeout_ms", "wall_timeout_ms", "max_memory", "state_max_bytes", "state_max_entries", "state_redis", "state_redis_ca", "upstream", "deny_source_ports", "record", "candidate"])]
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

impl Cli {
    /// Runs the chosen command. An `Err` is a failure to start; its message names
    /// what failed and why.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self.command {
            Some(Command::Check {
                module,
                limits,
                compile,
            }) => check(&module, &limits, compile.compiler()?),
            Some(Command::New { lang, name, dir }) => {
                let steps = crate::cli::new::create(lang, &name, &dir)?;
                println!("created {}", dir.join(&name).display());
                println!("next:");
                for step in steps {
                    println!("  {step}");
                }
                println!("then, from another terminal: wasmgate send 127.0.0.1:8008 hello");
                Ok(ExitCode::SUCCESS)
            }
            Some(Command::Compile {
                max_memory,
                cpu_seconds,
            }) => Ok(crate::engine::child::run_child(&max_memory, &cpu_seconds)),
            Some(Command::Send {
                addr,
                messages,
                timeout_ms,
            }) => send::send(&addr, &messages, Duration::from_millis(timeout_ms)),
            Some(Command::Replay {
                capture,
                module,
                against,
                port,
                upstream,
                isolation,
                max_reply_ratio,
                json,
                limits,
            }) => {
                let options = crate::prove::replay::Options {
                    capture,
                    module,
                    against,
                    port,
                    listener: ListenerSpec {
                        pools: upstream,
                        isolation,
                        max_reply_ratio,
                        limits: limits.limits(),
                        ..ListenerSpec::default()
                    },
                    limits: limits.limits(),
                };
                Ok(replay(&options, json))
            }
            None => serve(self.serve).map(|()| ExitCode::SUCCESS),
        }
    }
}

/// Runs a replay: exit 0 when nothing differs, 1 when something does, 2 on bad input.
fn replay(options: &crate::prove::replay::Options, json: bool) -> ExitCode {
    match crate::prove::replay::run(options) {
        Ok(report) => {
            if json {
                match serde_json::to_string_pretty(&report) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        eprintln!("error: cannot write the report: {e}");
                        return ExitCode::from(2);
                    }
                }
            } else {
                print!("{}", report.text());
            }
            if report.differs() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn check(path: &Path, limits: &LimitArgs, compiler: Compiler) -> anyhow::Result<ExitCode> {
    let env = Env::new(limits.limits())?.with_compiler(compiler);
    match env.load_file(Some(path)) {
        Ok(program) => {
            let imports = match (program.world(), program.imports()) {
                (Some(_), list) => format!("{} imports, listed below", list.len()),
                (None, []) => "none".to_string(),
                (None, list) => list.join(", "),
            };
            println!(
                "{}: ok: fits {} (sha256 {}; imports: {imports})",
                path.display(),
                program.kind(),
                program.sha256_hex()
            );
            if let Some(world) = program.world() {
                println!("{world}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The one listener the flags describe; what a flag leaves out is
/// [`ListenerSpec::default`], as in a config file.
fn listener_from_flags(args: &ServeArgs) -> anyhow::Result<ListenerSpec> {
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

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let (listeners, file_metrics) = match &args.config {
        Some(path) => {
            let file = config::load(path, config::default_workers())?;
            (file.listeners, file.metrics)
        }
        None => {
            let spec = listener_from_flags(&args)?;
            config::check_pools(&spec.pools)?;
            (vec![spec], None)
        }
    };
    // --metrics on the command line wins over the file's [metrics].
    crate::service::run(
        listeners,
        args.config.as_deref(),
        args.metrics.or(file_metrics),
        &args.compile.compiler()?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// The long flags of `command` (not `--help` or `--version`).
    fn flags(command: &clap::Command) -> Vec<String> {
        command
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|l| !matches!(*l, "help" | "version"))
            .map(|l| format!("--{l}"))
            .collect()
    }

    #[test]
    fn every_flag_is_in_the_reference() {
        let guide = include_str!("../../docs/GUIDE.md");
        let handlers = include_str!("../../docs/HANDLERS.md");
        let cli = Cli::command();
        // Serving: one row each in the guide's table of options.
        let rows: Vec<&str> = guide.lines().filter(|l| l.starts_with("| `--")).collect();
        let missing: Vec<String> = flags(&cli)
            .into_iter()
            .filter(|f| !rows.iter().any(|r| r.starts_with(&format!("| `{f}"))))
            .collect();
        assert!(
            missing.is_empty(),
            "not in docs/GUIDE.md's table of options: {missing:?}"
        );
        // The other commands: said somewhere in the guide or the handler reference.
        for sub in cli.get_subcommands() {
            for flag in flags(sub) {
                let said = format!("{flag} ");
                assert!(
                    guide.contains(&said) || handlers.contains(&said) || guide.contains(&format!("{flag}`")),
                    "`wasmgate {} {flag}` is not in docs/GUIDE.md or docs/HANDLERS.md",
                    sub.get_name()
                );
            }
        }
    }

    #[test]
    fn no_flags_give_the_listener_defaults() {
        let cli = Cli::try_parse_from(["wasmgate"]).unwrap();
        assert_eq!(listener_from_flags(&cli.serve).unwrap(), ListenerSpec::default());
    }

    #[test]
    fn flags_are_held_to_the_same_bounds_as_the_config_file() {
        let refused = |args: &[&str], says: &str| {
            let e = Cli::try_parse_from([&["wasmgate"], args].concat())
                .unwrap_err()
                .to_string();
            let flag = args[0].split('=').next().unwrap_or_default();
            assert!(e.contains(flag) && e.contains(says), "{args:?}: {e}");
        };
        refused(&["--timeout-ms", "0"], "1 to 60000");
        refused(&["--timeout-ms", "9223372036854775807"], "1 to 60000");
        refused(&["--workers", "0"], "1 to 256");
        refused(&["--workers", "2000"], "1 to 256");
        refused(&["--batch", "1025"], "1 to 1024");
        refused(&["--max-reply-ratio=-1"], "≥ 0");
        refused(&["--max-reply-ratio", "inf"], "≥ 0");
        refused(&["--listen", "localhost"], "IP:PORT");
        refused(&["--max-memory", "5GiB"], "over 4GiB");
        let cli =
            Cli::try_parse_from(["wasmgate", "--workers", "256", "--timeout-ms", "60000", "--batch", "1"]).unwrap();
        assert_eq!(
            (cli.serve.workers, cli.serve.limits.timeout_ms, cli.serve.batch),
            (Some(256), 60_000, 1)
        );
    }

    #[test]
    fn defaults_match_the_documentation() {
        let cli = Cli::try_parse_from(["wasmgate"]).unwrap();
        assert!(cli.command.is_none());
        // The literals are docs/GUIDE.md's, so that a changed default fails here.
        assert_eq!(cli.serve.listen, "127.0.0.1:8008".parse().unwrap());
        assert_eq!(cli.serve.limits.timeout_ms, 10);
        assert_eq!(cli.serve.limits.max_memory, 64 * 1024 * 1024);
        assert_eq!(cli.serve.limits.limits(), Limits::default());
        assert_eq!(cli.serve.max_reply_ratio, 3.0);
        assert_eq!(cli.serve.isolation, Isolation::Reuse);
        assert_eq!(cli.serve.batch, 32);
        assert_eq!(cli.serve.workers, None, "default: one per core");
        assert_eq!(cli.serve.log_format, LogFormat::Text);
        let cli = Cli::try_parse_from(["wasmgate", "check", "m.wat", "--timeout-ms", "5"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Check { limits, .. }) if limits.timeout_ms == 5));
        assert!(Cli::try_parse_from(["wasmgate", "--workers", "0"]).is_err());
    }

    #[test]
    fn config_excludes_single_listener_flags() {
        assert!(Cli::try_parse_from(["wasmgate", "--config", "w.toml", "--listen", "127.0.0.1:1"]).is_err());
        assert!(Cli::try_parse_from(["wasmgate", "--config", "w.toml", "--metrics", "127.0.0.1:9090"]).is_ok());
    }
}
