//! The command line: its options, and the `serve` (default), `check` and `send`
//! commands.

mod args;
pub mod new;
mod reference;
mod send;
mod serve;

pub use args::{CompileArgs, LimitArgs, LogFormat};
pub use serve::{Plan, ServeArgs};

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::Isolation;
use crate::config::{DEFAULT_REPLY_RATIO, ListenerSpec, PoolSpec, check_ratio, parse_upstream_flag, parse_with};
use crate::engine::child::Compiler;
use crate::guest::Env;

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
        /// The proxies in front of the gateway, as for serving: their datagrams
        /// in a raw capture (tcpdump's) carry a PROXY v2 header, which names the
        /// client and is taken off before the module sees the datagram, and the
        /// replies to them carry one too. A --record capture needs none.
        #[arg(long, value_name = "CIDRS")]
        proxy_protocol_from: Option<crate::net::proxied::TrustedProxies>,
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

impl Cli {
    /// The reference of every flag and config key (`docs/REFERENCE.md`).
    pub fn reference() -> String {
        reference::markdown(<Self as clap::CommandFactory>::command())
    }

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
                proxy_protocol_from,
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
                        proxy_protocol_from: proxy_protocol_from.unwrap_or_default(),
                        isolation,
                        max_reply_ratio,
                        limits: limits.limits(),
                        ..ListenerSpec::default()
                    },
                    limits: limits.limits(),
                };
                Ok(replay(&options, json))
            }
            None => serve::serve(self.serve).map(|()| ExitCode::SUCCESS),
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

#[cfg(test)]
mod tests {
    use super::serve::listener_from_flags;
    use super::*;
    use crate::config::Limits;
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
