//! What the benchmark examples share: their run options, the release directory,
//! pinning to a CPU, free ports, waiting for a server, one `loadgen` run and
//! the median of its CSV rows.

#![allow(dead_code)] // each example uses a part

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Row {
    pub(crate) rate: f64,
    pub(crate) lost: u64,
    pub(crate) wrong: u64,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
    pub(crate) cpu_us: f64,
}

pub(crate) fn parse_row(line: &str) -> anyhow::Result<Row> {
    let f: Vec<&str> = line.trim().split(',').collect();
    if f.len() != 7 {
        bail!("unexpected loadgen output: {line:?}");
    }
    Ok(Row {
        rate: f[0].parse()?,
        lost: f[1].parse()?,
        wrong: f[2].parse()?,
        p50: f[3].parse()?,
        p99: f[4].parse()?,
        p999: f[5].parse()?,
        cpu_us: f[6].parse()?,
    })
}

/// Runs `cmd` pinned to `cpu` when `taskset` exists.
pub(crate) fn pinned(cpu: usize, program: &Path) -> Command {
    if Path::new("/usr/bin/taskset").exists() {
        let mut c = Command::new("/usr/bin/taskset");
        c.arg("-c").arg(cpu.to_string()).arg(program);
        c
    } else {
        Command::new(program)
    }
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until the server at `port` answers.
pub(crate) fn wait_ready(port: u16) -> anyhow::Result<()> {
    let probe = UdpSocket::bind("127.0.0.1:0")?;
    probe.set_read_timeout(Some(Duration::from_millis(100)))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 64];
    while Instant::now() < deadline {
        probe.send_to(b"ready?", ("127.0.0.1", port))?;
        if probe.recv(&mut buf).is_ok() {
            return Ok(());
        }
    }
    bail!("the server on port {port} did not answer within 20 s")
}

pub(crate) struct Running(pub(crate) Child);

/// Starts `cmd` quietly (no stdin, output discarded); killed when dropped.
pub(crate) fn spawn(mut cmd: Command, name: &str) -> anyhow::Result<Running> {
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    Ok(Running(child))
}

/// A number from dnsperf's report: the first word after `name:`.
pub(crate) fn dnsperf_field(out: &str, name: &str) -> Option<f64> {
    let line = out.lines().find(|l| l.trim_start().starts_with(name))?;
    line.split(':').nth(1)?.split_whitespace().next()?.parse().ok()
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The pid doing the work: taskset and env exec their command, so it is the child's.
pub(crate) fn server_pid(running: &Running) -> u32 {
    running.0.id()
}

pub(crate) fn median_run(runs: &mut [Row]) -> Row {
    runs.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    runs[runs.len() / 2]
}

/// How many runs, of how long, each cell gets.
#[derive(Debug, clap::Args)]
pub(crate) struct RunArgs {
    /// Runs per cell; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub(crate) runs: usize,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 3.0)]
    pub(crate) seconds: f64,
}

/// The release directory, where the running example was built.
pub(crate) fn release_dir() -> anyhow::Result<PathBuf> {
    Ok(std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .context("cannot find the release directory")?
        .to_path_buf())
}

/// One `loadgen` run on CPU 1 against `port` (clients × window × payload),
/// charging the CPU of process `pid`; `name` names the server in errors.
pub(crate) fn measure(
    loadgen: &Path,
    port: u16,
    pid: u32,
    (clients, window, size): (usize, usize, usize),
    seconds: f64,
    name: &str,
) -> anyhow::Result<Row> {
    let out = pinned(1, loadgen)
        .args(["--target", &format!("127.0.0.1:{port}")])
        .args(["--clients", &clients.to_string(), "--window", &window.to_string()])
        .args([
            "--size",
            &size.to_string(),
            "--seconds",
            &seconds.to_string(),
            "--warmup",
            "1",
        ])
        .args(["--pid", &pid.to_string(), "--csv", "--allow-wrong"])
        .output()
        .context("cannot run loadgen")?;
    if !out.status.success() {
        bail!(
            "loadgen failed against {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_row(&String::from_utf8_lossy(&out.stdout))
}
