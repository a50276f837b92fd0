//! Shared helpers: start a gateway in-process on 127.0.0.1:0, run the built binary,
//! and talk to either over real UDP.

#![allow(dead_code, unreachable_pub)] // each test binary uses a different part

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod dns;
pub mod fixtures;

use wasmgate::config::ListenerSpec;
use wasmgate::config::{Isolation, Limits};
use wasmgate::gateway::Gateway;
use wasmgate::guest::Env;

/// Resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Says that a test could not run for want of `what`, and returns: in CI
/// (`CI` set, as `.ci/run` runs) a missing tool is a failure, not a pass.
pub fn skip(what: &str) {
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false") {
        panic!("{what}, and in CI that is a failure: .ci/run installs it");
    }
    eprintln!("SKIPPED: {what}");
}

/// How long a test waits for a reply that must come.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

pub fn config() -> ListenerSpec {
    ListenerSpec {
        listen: "127.0.0.1:0".parse().unwrap(),
        workers: 2,
        isolation: Isolation::Reuse,
        max_reply_ratio: 3.0,
        ..ListenerSpec::default()
    }
}

/// Starts a gateway serving `module` (WAT text or a binary) with default limits.
pub fn start(module: &[u8]) -> Gateway {
    start_with(module, Limits::default(), config())
}

pub fn start_with(module: &[u8], limits: Limits, config: ListenerSpec) -> Gateway {
    let env = Env::new(limits).unwrap();
    let program = env.load("test module", module).unwrap();
    Gateway::start(&env, program, &config).unwrap()
}

/// A client socket on loopback that gives up waiting after [`REPLY_TIMEOUT`].
pub fn client() -> UdpSocket {
    client_on("127.0.0.1:0")
}

pub fn client_on(addr: &str) -> UdpSocket {
    let socket = UdpSocket::bind(addr).unwrap();
    socket.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
    socket
}

/// Sends `payload` and returns the reply, failing the test if none comes.
pub fn ask(socket: &UdpSocket, to: SocketAddr, payload: &[u8]) -> Vec<u8> {
    socket.send_to(payload, to).unwrap();
    recv(socket, to)
}

/// Receives one datagram, which must come from `from`.
pub fn recv(socket: &UdpSocket, from: SocketAddr) -> Vec<u8> {
    let mut buf = vec![0u8; 70_000];
    let (n, sender) = socket
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("no reply from {from} within {REPLY_TIMEOUT:?}: {e}"));
    assert_eq!(sender, from, "reply from an unexpected address");
    buf.truncate(n);
    buf
}

/// Asserts that nothing arrives on `socket` for `wait`.
pub fn assert_silent(socket: &UdpSocket, wait: Duration) {
    socket.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 2048];
    let got = socket.recv_from(&mut buf);
    socket.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
    if let Ok((n, from)) = got {
        panic!("expected no datagram, got {n} bytes from {from}");
    }
}

/// Python's `bytes.upper()`.
pub fn upper(data: &[u8]) -> Vec<u8> {
    data.to_ascii_uppercase()
}

/// The built `wasmgate` binary, run with `args`; stdout and stderr are piped.
pub fn wasmgate(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wasmgate"));
    cmd.args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs the binary to completion (at most 30 s) and returns its exit code and output.
pub fn run_to_end(args: &[&str]) -> (Option<i32>, String, String) {
    let mut child = wasmgate(args).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("wasmgate {args:?} did not exit within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A `wasmgate` process serving on a port of its choosing; killed when dropped.
pub struct Served {
    pub child: Child,
    pub addr: SocketAddr,
    /// Every stderr line after the "serving" line, as it is written.
    pub log: std::sync::mpsc::Receiver<String>,
    /// The lines before it.
    pub preamble: Vec<String>,
}

impl Served {
    /// Starts the binary with `args` (which should include `--listen 127.0.0.1:0`)
    /// and waits for its "serving" log line to learn the address.
    pub fn start(args: &[&str]) -> Self {
        Self::start_logging(args, "info")
    }

    /// As [`Served::start`], with `RUST_LOG` set to `filter`.
    pub fn start_logging(args: &[&str], filter: &str) -> Self {
        Self::start_program(Path::new(env!("CARGO_BIN_EXE_wasmgate")), args, filter)
    }

    /// As [`Served::start_logging`], running `program` (a copy of the binary).
    pub fn start_program(program: &Path, args: &[&str], filter: &str) -> Self {
        let mut command = Command::new(program);
        command.args(args).env("RUST_LOG", filter);
        Self::start_command(command)
    }

    /// As [`Served::start`], running `command` as it is set up (its standard
    /// streams are taken over).
    pub fn start_command(mut command: Command) -> Self {
        let args: Vec<_> = command.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Owned by `Served` from here on, so a failure below still kills it.
        let mut served = Self {
            child,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            log: rx,
            preamble: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = served
                .log
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("wasmgate {args:?} did not report serving within 30 s"));
            if let Some(rest) = line.split("listen=").nth(1) {
                served.addr = rest.split_whitespace().next().unwrap().parse().unwrap();
                return served;
            }
            served.preamble.push(line);
        }
    }
}

impl Served {
    /// The metrics endpoint's address, from its "serving metrics" line.
    pub fn metrics_addr(&self) -> SocketAddr {
        let line = self
            .preamble
            .iter()
            .find(|l| l.contains("serving metrics"))
            .expect("a serving metrics line");
        let url = line.split("metrics=http://").nth(1).unwrap();
        url.split('/').next().unwrap().parse().unwrap()
    }

    /// Waits up to 10 s for a log line containing every one of `words`; every
    /// line up to it, that one last, or `None` if it did not come.
    pub fn lines_until(&self, words: &[&str]) -> Option<Vec<String>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut lines = Vec::new();
        loop {
            let line = self
                .log
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .ok()?;
            let found = words.iter().all(|w| line.contains(w));
            lines.push(line);
            if found {
                return Some(lines);
            }
        }
    }

    /// Waits up to 10 s for a log line containing every one of `words`, skipping others.
    pub fn line_with(&self, words: &[&str]) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let line = self
                .log
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .ok()?;
            if words.iter().all(|w| line.contains(w)) {
                return Some(line);
            }
        }
    }
}

/// The whole service, as `wasmgate ARGS` runs it, in this process: for tests
/// that need its addresses but not its process (log lines, signals, exit code).
/// Modules are compiled in-process. Stopped, and checked to stop cleanly, when
/// dropped.
pub struct Service {
    pub addr: SocketAddr,
    pub bound: wasmgate::service::Bound,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Service {
    /// Starts the service the flags `args` describe (as the binary would read
    /// them) and waits until every listener serves.
    pub fn start(args: &[&str]) -> Self {
        use clap::Parser as _;
        let cli = wasmgate::cli::Cli::try_parse_from(std::iter::once("wasmgate").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("wasmgate {args:?}: {e}"));
        let mut plan = cli.serve.plan().unwrap_or_else(|e| panic!("wasmgate {args:?}: {e:#}"));
        plan.compiler = wasmgate::engine::child::Compiler::InProcess;
        let (ready, bound) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            plan.run_until(
                move || {
                    Ok(async move {
                        let _ = stopped.await;
                    })
                },
                move |bound| {
                    let _ = ready.send(bound.clone());
                },
            )
        });
        let Ok(bound) = bound.recv_timeout(Duration::from_secs(60)) else {
            let result = thread.join();
            panic!("wasmgate {args:?} did not serve: {result:?}");
        };
        Self {
            addr: bound.listeners[0].1,
            bound,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The metrics endpoint's bound address.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.bound.metrics.expect("started with --metrics")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let result = thread.join();
            if !std::thread::panicking() {
                result.expect("the service panicked").expect("the service failed");
            }
        }
    }
}

/// AssemblyScript's `abort` import, with "boom!" at 100 and "a.ts" at 200 laid out
/// as AssemblyScript lays out strings: UTF-16, byte length in the 4 bytes before.
pub const ABORT_IMPORT: &str = r#"(import "env" "abort" (func $abort (param i32 i32 i32 i32)))
    (data (i32.const 96) "\0a\00\00\00b\00o\00o\00m\00!\00")
    (data (i32.const 196) "\08\00\00\00a\00.\00t\00s\00")"#;

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends signal `name` to `child` and waits at most `limit` for it to exit,
/// failing the test otherwise; its exit status.
pub fn signal_and_wait(child: &mut Child, name: &str, limit: Duration) -> std::process::ExitStatus {
    signal(child.id(), name);
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "no exit within {limit:?} of SIG{name}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends signal `name` (`TERM`, `HUP`, …) to process `pid`.
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid} failed");
}

/// Writes `contents` to `name` inside `dir` and returns the path as a string.
pub fn write_file(dir: &Path, name: &str, contents: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path.to_str().unwrap().to_string()
}

/// The last CPU: where a test that needs one to itself pins its processes.
pub fn last_cpu() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()) - 1
}

/// Runs `command` on CPU `cpu` only, at niceness `nice`.
pub fn pinned(mut command: Command, cpu: usize, nice: i32) -> Command {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: only async-signal-safe system calls between fork and exec, on
    // values owned by the closure.
    unsafe {
        command.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0
                || libc::setpriority(libc::PRIO_PROCESS, 0, nice) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

/// A busy loop on one CPU, stopped when dropped (and after 60 s in any case).
pub struct BusyLoop(std::process::Child);

impl BusyLoop {
    pub fn on(cpu: usize) -> Self {
        use std::os::unix::process::CommandExt as _;
        let mut sh = Command::new("timeout");
        sh.args(["-s", "KILL", "60", "sh", "-c", "while :; do :; done"])
            .process_group(0);
        Self(pinned(sh, cpu, 0).spawn().unwrap())
    }
}

impl Drop for BusyLoop {
    fn drop(&mut self) {
        // The whole group: `timeout` and the shell under it.
        let group = -(self.0.id() as i32);
        // SAFETY: a plain system call with no memory arguments.
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// A datagram an [`Upstream`] received, and its sender.
pub type Received = (Vec<u8>, SocketAddr);

/// A real UDP server on loopback for a gateway to forward to: it records every
/// datagram and, unless silent, answers each with `tag` followed by the datagram.
/// Stops when dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    got: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Upstream {
    pub fn echo(tag: &str) -> Self {
        Self::on("127.0.0.1:0", tag, true)
    }

    pub fn silent() -> Self {
        Self::on("127.0.0.1:0", "", false)
    }

    /// On a given address (to bring a stopped endpoint back on its port).
    pub fn on(addr: &str, tag: &str, answer: bool) -> Self {
        use std::sync::atomic::Ordering;
        let socket = UdpSocket::bind(addr).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let addr = socket.local_addr().unwrap();
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (g, s, tag) = (got.clone(), stop.clone(), tag.as_bytes().to_vec());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    g.lock().unwrap().push((buf[..n].to_vec(), from));
                    if answer {
                        let mut reply = tag.clone();
                        reply.extend_from_slice(&buf[..n]);
                        let _ = socket.send_to(&reply, from);
                    }
                }
            }
        });
        Self {
            addr,
            got,
            stop,
            thread: Some(thread),
        }
    }

    /// Every datagram received so far, with its sender.
    pub fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// Forgets what was received so far.
    pub fn clear(&self) {
        self.got.lock().unwrap().clear();
    }

    pub fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A loopback port that nothing listens on (bound, then closed): datagrams
/// to it draw ICMP port unreachable. On 127.0.0.254, where no other test
/// binds, so that the port is not taken again by a socket of a test running
/// beside this one (on 127.0.0.1 it could be).
pub fn closed_port() -> SocketAddr {
    UdpSocket::bind("127.0.0.254:0").unwrap().local_addr().unwrap()
}

/// Waits up to 5 s for `done`, polling.
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// GET /metrics over real HTTP; the body.
pub fn scrape(addr: SocketAddr) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("text/plain; version=0.0.4"), "{response}");
    response.split("\r\n\r\n").nth(1).unwrap().to_string()
}

/// The value of the sample `name{labels}` in a scrape.
pub fn sample(body: &str, name_and_labels: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {name_and_labels} in:\n{body}"))
        .parse()
        .unwrap()
}

/// Sends `payload` to `to` as a UDP datagram from `from`, which no ordinary
/// socket may claim; needs a raw socket (CAP_NET_RAW).
pub fn send_spoofed(from: SocketAddr, to: SocketAddr, payload: &[u8]) {
    use socket2::{Domain, Protocol, Socket, Type};
    let raw = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::UDP))
        .expect("a raw socket needs CAP_NET_RAW: run this test as root (.ci/run does)");
    // IP_HDRINCL is off: the kernel writes the IP header, with our source only
    // if it is local; 127.0.0.1 is.
    let mut datagram = Vec::with_capacity(8 + payload.len());
    datagram.extend_from_slice(&from.port().to_be_bytes());
    datagram.extend_from_slice(&to.port().to_be_bytes());
    datagram.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    datagram.extend_from_slice(&0u16.to_be_bytes()); // no checksum (IPv4 allows it)
    datagram.extend_from_slice(payload);
    raw.send_to(&datagram, &to.into()).unwrap();
}

/// The active module's guest counter or gauge `name` (as defined, without
/// `_total`) at the label `values`, summed over the workers; `None` if that
/// series does not exist.
pub fn guest_value(gateway: &Gateway, name: &str, values: &[&str]) -> Option<f64> {
    use wasmgate::metrics::guest::{Role, Value};
    let mut found = None;
    gateway
        .publisher()
        .guest_metrics()
        .role(Role::Active)
        .visit(&mut |family| {
            if family.name != name {
                return;
            }
            for (labels, value) in &family.series {
                if labels.is_some_and(|l| l.iter().map(String::as_str).eq(values.iter().copied()))
                    && let Value::Counter(v) | Value::Gauge(v) = value
                {
                    found = Some(*v);
                }
            }
        });
    found
}
