//! The command line: its options, and the `serve` (default) and `check` commands.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::reload::Reloader;
use crate::sandbox::{Isolation, Limits, Program, Sandbox, read_module};
use crate::server::{DEFAULT_BATCH, Gateway, ServeConfig};

/// How the embedded default guest is named in logs.
pub const EMBEDDED_ORIGIN: &str = "<embedded uppercase guest>";

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
    },
}

/// Options for serving (the default command).
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on: IPv4 (`0.0.0.0:9000`) or IPv6 (`[::]:9000`).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8008", value_parser = parse_addr)]
    pub listen: SocketAddr,

    /// Guest module to run: a `.wasm` binary or `.wat` text [default: the embedded uppercase guest].
    #[arg(long, value_name = "PATH")]
    pub module: Option<PathBuf>,

    /// Worker threads, each with its own socket and guest instance [default: available cores].
    #[arg(long, value_name = "N")]
    pub workers: Option<NonZeroUsize>,

    /// `reuse`: each worker keeps its instance across datagrams (replaced after a trap
    /// or timeout); `fresh`: a new instance per datagram, so no state survives.
    #[arg(long, value_enum, default_value_t)]
    pub isolation: Isolation,

    /// Drop replies larger than this multiple of their request, so that spoofed
    /// requests cannot be amplified (RFC 9000 §8); 0 disables the check.
    #[arg(long, value_name = "RATIO", default_value_t = 3.0, value_parser = parse_ratio)]
    pub max_reply_ratio: f64,

    /// Datagrams taken per receive system call (recvmmsg), their replies sent with
    /// one sendmmsg; 1 uses one recvfrom and one sendto per datagram.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_BATCH, value_parser = parse_batch)]
    pub batch: usize,

    /// Benchmarks only: uppercase natively instead of running the guest.
    #[arg(long, hide = true)]
    pub native_uppercase: bool,

    /// Do not watch the module file for changes (SIGHUP still reloads it).
    #[arg(long)]
    pub no_watch: bool,

    #[command(flatten)]
    pub limits: LimitArgs,
}

/// What each guest instance is held to.
#[derive(Debug, Args)]
pub struct LimitArgs {
    /// Time budget for the guest per datagram (and for its start function), in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub timeout_ms: u64,

    /// Largest linear memory per guest instance: bytes, or a number with KiB, MiB or GiB.
    #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = parse_size)]
    pub max_memory: usize,
}

impl LimitArgs {
    pub fn limits(&self) -> Limits {
        Limits {
            timeout: Duration::from_millis(self.timeout_ms),
            max_memory: self.max_memory,
        }
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("`{s}` is not an IP:PORT address such as 127.0.0.1:8008 or [::1]:8008"))
}

fn parse_batch(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n @ 1..=1024) => Ok(n),
        _ => Err(format!("`{s}` is not a batch size: give a whole number from 1 to 1024")),
    }
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 0.0 => Ok(r),
        _ => Err(format!(
            "`{s}` is not a ratio: give a number ≥ 0, such as 3 or 1.5 (0 disables)"
        )),
    }
}

/// Parses `65536`, `512KiB`, `64MiB`, `1GiB` (also `K`, `M`, `G`; all powers of 1024).
fn parse_size(s: &str) -> Result<usize, String> {
    let err = || format!("`{s}` is not a size: give bytes or a number with KiB, MiB or GiB, such as 64MiB");
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| err())?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        _ => return Err(err()),
    };
    let bytes = n.checked_mul(1 << shift).ok_or_else(err)?;
    if bytes > 4 << 30 {
        return Err(format!(
            "`{s}` is over 4GiB, the most a 32-bit WebAssembly memory can hold"
        ));
    }
    usize::try_from(bytes).map_err(|_| err())
}

impl Cli {
    /// Runs the chosen command. An `Err` is a failure to start; its message names
    /// what failed and why.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self.command {
            Some(Command::Check { module, limits }) => check(&module, &limits),
            None => serve(self.serve).map(|()| ExitCode::SUCCESS),
        }
    }
}

fn check(path: &Path, limits: &LimitArgs) -> anyhow::Result<ExitCode> {
    let sandbox = Sandbox::new(limits.limits())?;
    match load_module(&sandbox, Some(path)) {
        Ok(program) => {
            let imports = match program.imports() {
                [] => "none".to_string(),
                list => list.join(", "),
            };
            println!(
                "{}: ok: fits the wasmgate guest ABI v1 (sha256 {}; imports: {imports})",
                path.display(),
                program.sha256_hex()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Reads, checks and compiles the module at `path`, or the embedded guest if `None`.
/// Errors name the file and the reason.
pub fn load_module(sandbox: &Sandbox, path: Option<&Path>) -> anyhow::Result<Program> {
    let Some(path) = path else {
        return sandbox.load(EMBEDDED_ORIGIN, crate::DEFAULT_GUEST_WASM);
    };
    let name = path.display().to_string();
    let bytes = read_module(path).with_context(|| format!("cannot read module {name}"))?;
    sandbox
        .load(name.clone(), &bytes)
        .with_context(|| format!("module {name}"))
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let limits = args.limits.limits();
    let workers = args
        .workers
        .or_else(|| std::thread::available_parallelism().ok())
        .map_or(1, NonZeroUsize::get);
    let sandbox = match args.isolation {
        Isolation::Reuse => Sandbox::new(limits)?,
        // One live instance per worker, plus one for checking a reloaded module.
        Isolation::Fresh => Sandbox::with_instance_pool(limits, u32::try_from(workers + 1)?)?,
    };
    let program = load_module(&sandbox, args.module.as_deref())?;
    let config = ServeConfig {
        listen: args.listen,
        workers,
        isolation: args.isolation,
        max_reply_ratio: args.max_reply_ratio,
        batch: args.batch,
        native_uppercase: args.native_uppercase,
    };
    let (module, sha256) = (program.origin().to_string(), program.short_sha256());
    let gateway = Gateway::start(&sandbox, program, &config)?;
    // Watch before saying "serving": a change made after that line must be seen.
    let reloader = match &args.module {
        Some(path) => Some(Reloader::start(
            sandbox.clone(),
            path.clone(),
            gateway.publisher(),
            !args.no_watch,
        )?),
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // Also before "serving": a signal sent after that line must be handled, not fatal.
    let signals = {
        let _runtime = runtime.enter();
        Signals::new()?
    };
    tracing::info!(
        listen = %gateway.local_addr(),
        module,
        sha256,
        workers = config.workers,
        isolation = %config.isolation,
        timeout_ms = args.limits.timeout_ms,
        max_memory = args.limits.max_memory,
        max_reply_ratio = config.max_reply_ratio,
        batch = config.batch,
        native = config.native_uppercase,
        "serving"
    );
    runtime.block_on(signals.wait(reloader.as_ref()));
    tracing::info!("shutting down: finishing the datagrams in flight");
    drop(reloader);
    let stats = gateway.shutdown();
    tracing::info!(%stats, "stopped");
    Ok(())
}

/// The signals the gateway acts on, registered up front.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

impl Signals {
    /// Registers the handlers; must run inside the runtime.
    fn new() -> anyhow::Result<Self> {
        let register = |kind: SignalKind, name: &str| signal(kind).with_context(|| format!("cannot listen for {name}"));
        Ok(Self {
            interrupt: register(SignalKind::interrupt(), "SIGINT")?,
            terminate: register(SignalKind::terminate(), "SIGTERM")?,
            hangup: register(SignalKind::hangup(), "SIGHUP")?,
        })
    }

    /// Reloads on SIGHUP; returns on SIGINT (Ctrl-C) or SIGTERM.
    async fn wait(mut self, reloader: Option<&Reloader>) {
        loop {
            tokio::select! {
                _ = self.interrupt.recv() => return,
                _ = self.terminate.recv() => return,
                _ = self.hangup.recv() => match reloader {
                    Some(reloader) => {
                        tracing::info!("SIGHUP: reloading the module");
                        reloader.force();
                    }
                    None => tracing::warn!("SIGHUP: serving the embedded guest, there is no module file to reload"),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("65536"), Ok(65_536));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        for bad in ["", "MiB", "-1", "1.5MiB", "64MB", "5GiB", "99999999999999999999"] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn ratios_and_addresses_are_checked() {
        assert_eq!(parse_ratio("0"), Ok(0.0));
        assert_eq!(parse_ratio("2.5"), Ok(2.5));
        assert!(parse_ratio("-1").is_err());
        assert!(parse_ratio("inf").is_err());
        assert!(parse_addr("[::1]:9000").is_ok());
        let e = parse_addr("localhost").unwrap_err();
        assert!(e.contains("IP:PORT"), "{e}");
    }

    #[test]
    fn defaults_match_the_documentation() {
        let cli = Cli::try_parse_from(["wasmgate"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.serve.listen, "127.0.0.1:8008".parse().unwrap());
        assert_eq!(cli.serve.limits.limits(), Limits::default());
        assert_eq!(cli.serve.max_reply_ratio, 3.0);
        assert_eq!(cli.serve.isolation, Isolation::Reuse);
        let cli = Cli::try_parse_from(["wasmgate", "check", "m.wat", "--timeout-ms", "5"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Check { limits, .. }) if limits.timeout_ms == 5));
        assert!(Cli::try_parse_from(["wasmgate", "--workers", "0"]).is_err());
    }
}
