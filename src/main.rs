//! The `wasmgate` binary: parse the command line, start logging, run.

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use wasmgate::cli::{Cli, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr);
    match cli.serve.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::stderr().is_terminal())
            .fmt_fields(wasmgate::text::escaping_fields())
            .init(),
        LogFormat::Json => logs.json().init(),
    }
    match cli.run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
