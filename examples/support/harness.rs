//! What the benchmark examples share: pinning to a CPU, free ports, waiting for
//! a server, loadgen's CSV rows and their medians.

#![allow(dead_code)] // each example uses a part

use std::net::UdpSocket;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::bail;

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
