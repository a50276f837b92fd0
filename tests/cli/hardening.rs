//! Defects a hostile review found, each reproduced against the built binary:
//! forged log lines, log floods outside the rate limit, files that are not files,
//! unbounded configuration, a metrics endpoint that holds connections, and more.
//! Each test here failed on the code before its fix.

use crate::common;

use std::time::{Duration, Instant};

use common::{Served, client, write_file};

/// Every line the gateway wrote within `wait`.
fn lines_for(served: &Served, wait: Duration) -> Vec<String> {
    let deadline = Instant::now() + wait;
    let mut lines = Vec::new();
    while let Ok(line) = served
        .log
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
    {
        lines.push(line);
    }
    lines
}

#[test]
fn guest_text_cannot_forge_a_log_line() {
    let dir = tempfile::tempdir().unwrap();
    // The same forged text three ways: wasmgate.log, WASI stderr, env.abort.
    let logger = write_file(
        dir.path(),
        "logger.wat",
        br#"(module
            (import "wasmgate" "log" (func $log (param i32 i32 i32)))
            (memory (export "memory") 1)
            (data (i32.const 0) "hello\nFORGED INFO wasmgate: reloaded\r\1b[2J")
            (func (export "alloc") (param i32) (result i32) i32.const 1024)
            (func (export "handle") (param i32 i32) (result i64)
                (call $log (i32.const 2) (i32.const 0) (i32.const 41))
                i64.const -1))"#,
    );
    let stderr = write_file(
        dir.path(),
        "stderr.wat",
        br#"(module
            (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (data (i32.const 64) "hello\nFORGED INFO wasmgate: reloaded\n")
            (func (export "_start")
                (i32.store (i32.const 0) (i32.const 64))
                (i32.store (i32.const 4) (i32.const 37))
                (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))))"#,
    );
    let abort = write_file(
        dir.path(),
        "abort.wat",
        br#"(module
            (import "env" "abort" (func $abort (param i32 i32 i32 i32)))
            (memory (export "memory") 1)
            (data (i32.const 96) "\12\00\00\00h\00i\00\0a\00F\00O\00R\00G\00E\00D\00")
            (func (export "alloc") (param i32) (result i32) i32.const 1024)
            (func (export "handle") (param i32 i32) (result i64)
                (call $abort (i32.const 100) (i32.const 0) (i32.const 1) (i32.const 1))
                i64.const -1))"#,
    );
    for (module, escaped) in [
        (&logger, "hello\\nFORGED INFO wasmgate: reloaded\\r\\u{1b}[2J"),
        (&stderr, "hello\\nFORGED INFO wasmgate: reloaded"),
        (&abort, "hi\\nFORGED"),
    ] {
        let served = Served::start(&["--listen", "127.0.0.1:0", "--module", module]);
        client().send_to(b"x", served.addr).unwrap();
        let line = served
            .line_with(&[escaped])
            .unwrap_or_else(|| panic!("{module}: no escaped line"));
        assert!(!line.contains('\r') && !line.contains('\u{1b}'), "{line:?}");
        let rest = lines_for(&served, Duration::from_millis(300));
        assert!(
            !rest.iter().any(|l| l.starts_with("FORGED")),
            "{module}: a guest started a log line of its own: {rest:?}"
        );
    }
}

#[test]
fn wasi_socket_calls_in_a_loop_do_not_flood_the_log() {
    // Each datagram calls every socket function 1,000 times; wasmtime-wasi used to
    // log a warning per call (28,850 lines for 20 datagrams).
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        dir.path(),
        "sockets.wat",
        br#"(module
            (import "wasi_snapshot_preview1" "sock_accept" (func $accept (param i32 i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "sock_recv" (func $recv (param i32 i32 i32 i32 i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "sock_send" (func $send (param i32 i32 i32 i32 i32) (result i32)))
            (import "wasi_snapshot_preview1" "sock_shutdown" (func $shutdown (param i32 i32) (result i32)))
            (memory (export "memory") 1)
            (func (export "_start")
                (local $i i32)
                (loop $next
                    (drop (call $accept (i32.const 0) (i32.const 0) (i32.const 64)))
                    (drop (call $recv (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 64) (i32.const 68)))
                    (drop (call $send (i32.const 1) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 64)))
                    (drop (call $shutdown (i32.const 1) (i32.const 0)))
                    (local.set $i (i32.add (local.get $i) (i32.const 1)))
                    (br_if $next (i32.lt_u (local.get $i) (i32.const 1000))))))"#,
    );
    let served = Served::start(&["--listen", "127.0.0.1:0", "--module", &path, "--workers", "1"]);
    let c = client();
    for _ in 0..20 {
        c.send_to(b"x", served.addr).unwrap();
    }
    let lines = lines_for(&served, Duration::from_millis(1500));
    // None of wasmtime-wasi's per-call warnings; at most a few rate-limited drop
    // warnings, should a loaded machine make some datagrams time out.
    assert!(
        !lines.iter().any(|l| l.contains("not implemented")) && lines.len() <= 20,
        "{} log lines for 20 datagrams: {:?}",
        lines.len(),
        &lines[..lines.len().min(5)]
    );
}

const ECHO: &[u8] = br#"(module (memory (export "memory") 1)
    (func (export "alloc") (param i32) (result i32) i32.const 0)
    (func (export "handle") (param i32 i32) (result i64)
        (i64.or (i64.shl (i64.extend_i32_u (local.get 0)) (i64.const 32)) (i64.extend_i32_u (local.get 1)))))"#;

/// Replies with its first byte only: tells itself apart from [`ECHO`].
const FIRST_BYTE: &[u8] = br#"(module (memory (export "memory") 1)
    (func (export "alloc") (param i32) (result i32) i32.const 0)
    (func (export "handle") (param i32 i32) (result i64)
        (i64.or (i64.shl (i64.extend_i32_u (local.get 0)) (i64.const 32)) (i64.const 1))))"#;

fn mkfifo(path: &std::path::Path) {
    let status = std::process::Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success(), "mkfifo {}", path.display());
}

/// Replaces `path` with `contents` by writing beside it and renaming over it.
fn replace(path: &std::path::Path, contents: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn a_fifo_a_directory_or_a_device_as_the_module_is_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.wasm");
    mkfifo(&fifo);
    let folder = dir.path().join("folder.wasm");
    std::fs::create_dir(&folder).unwrap();
    let device = dir.path().join("zero.wasm");
    std::os::unix::fs::symlink("/dev/zero", &device).unwrap();
    for (path, kind) in [(&fifo, "a FIFO"), (&folder, "a directory"), (&device, "a device")] {
        let path = path.to_str().unwrap();
        for args in [vec!["check", path], vec!["--listen", "127.0.0.1:0", "--module", path]] {
            let started = Instant::now();
            let (code, _, err) = common::run_to_end(&args);
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{args:?} took {:?}",
                started.elapsed()
            );
            assert_eq!(code, Some(1), "{args:?}: {err}");
            assert!(
                err.contains(path) && err.contains(kind) && err.contains("not a regular file"),
                "{args:?}: {err}"
            );
        }
    }
}

#[test]
fn a_fifo_swapped_in_on_reload_is_reported_once_then_a_good_module_loads_and_sigterm_stops_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("guest.wat");
    std::fs::write(&path, ECHO).unwrap();
    let mut served = Served::start(&["--listen", "127.0.0.1:0", "--module", path.to_str().unwrap()]);
    let c = client();
    assert_eq!(common::ask(&c, served.addr, b"hi"), b"hi");
    std::fs::remove_file(&path).unwrap();
    mkfifo(&path);
    served
        .line_with(&["ERROR", "FIFO", "not a regular file"])
        .expect("the FIFO is reported");
    // More events on the same FIFO (chmod): the same failing state is not reported again.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(120));
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    }
    let again = lines_for(&served, Duration::from_millis(500));
    assert!(!again.iter().any(|l| l.contains("FIFO")), "reported again: {again:?}");
    assert_eq!(
        common::ask(&c, served.addr, b"hi"),
        b"hi",
        "the last good module serves"
    );
    std::fs::remove_file(&path).unwrap();
    replace(&path, FIRST_BYTE);
    served
        .line_with(&["reloaded"])
        .expect("the good module after the FIFO is loaded");
    assert_eq!(common::ask(&c, served.addr, b"hi"), b"h");
    let status = common::signal_and_wait(&mut served.child, "TERM", Duration::from_secs(1));
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_module_replaced_by_a_device_symlink_is_reported_once_not_on_every_event() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("guest.wat");
    std::fs::write(&path, ECHO).unwrap();
    let served = Served::start(&["--listen", "127.0.0.1:0", "--module", path.to_str().unwrap()]);
    for _ in 0..5 {
        let link = dir.path().join("link.tmp");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        std::fs::rename(&link, &path).unwrap();
        std::thread::sleep(Duration::from_millis(150));
    }
    let lines = lines_for(&served, Duration::from_millis(500));
    let errors: Vec<&String> = lines.iter().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{lines:?}");
    assert!(errors[0].contains("a device, not a regular file"), "{errors:?}");
    assert_eq!(common::ask(&client(), served.addr, b"still"), b"still");
}

#[test]
fn changes_to_other_files_beside_the_module_do_not_read_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("guest.wat");
    std::fs::write(&path, ECHO).unwrap();
    let served = Served::start_logging(
        &["--listen", "127.0.0.1:0", "--module", path.to_str().unwrap()],
        "wasmgate=debug",
    );
    let other = dir.path().join("access.log");
    for i in 0..20 {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&other)
            .unwrap();
        writeln!(f, "line {i}").unwrap();
        std::thread::sleep(Duration::from_millis(30));
    }
    let lines = lines_for(&served, Duration::from_millis(400));
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("nothing to reload") || l.contains("reload")),
        "{lines:?}"
    );
    // Touching the module itself is looked at: its identity changed, its content did not.
    let f = std::fs::File::options().append(true).open(&path).unwrap();
    f.set_modified(std::time::SystemTime::now()).unwrap();
    drop(f);
    served
        .line_with(&["module content unchanged"])
        .expect("the touched module was read and found unchanged");
}

#[test]
fn unbounded_settings_in_a_config_file_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (line, key) in [
        ("timeout_ms = 9223372036854775807", "timeout_ms"),
        ("workers = 2000", "workers"),
        ("batch = 100000", "batch"),
    ] {
        let config = write_file(
            dir.path(),
            "wasmgate.toml",
            format!("[[listener]]\nname = \"big\"\nlisten = \"127.0.0.1:0\"\n{line}\n").as_bytes(),
        );
        let (code, _, err) = common::run_to_end(&["--config", &config]);
        assert_eq!(code, Some(1), "{line}: {err}");
        assert!(
            err.contains(&config) && err.contains(&format!("listener[0] (big): {key}")) && err.contains("out of range"),
            "{line}: {err}"
        );
    }
    let (code, _, err) = common::run_to_end(&["--workers", "2000"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--workers") && err.contains("1 to 256"), "{err}");
}

#[test]
fn a_megabyte_long_line_gives_a_short_error() {
    let dir = tempfile::tempdir().unwrap();
    let long = "x".repeat(1 << 20);
    let module = write_file(dir.path(), "long.wat", format!("(module (func {long}))").as_bytes());
    let (code, _, err) = common::run_to_end(&["check", &module]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("is not valid WebAssembly") && err.len() < 4096,
        "{} bytes: {}",
        err.len(),
        &err[..err.len().min(300)]
    );
    let config = write_file(
        dir.path(),
        "long.toml",
        format!("[[listener]]\nname = \"a\"\nlisten = \"{long}\"\n").as_bytes(),
    );
    let (code, _, err) = common::run_to_end(&["--config", &config]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("listen") && err.len() < 4096,
        "{} bytes: {}",
        err.len(),
        &err[..err.len().min(300)]
    );
}

#[test]
fn send_escapes_terminal_sequences_when_printing_to_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "echo.wat", ECHO);
    let served = Served::start(&["--listen", "127.0.0.1:0", "--module", &path]);
    let bin = env!("CARGO_BIN_EXE_wasmgate");
    // script(1) gives `send` a pseudo-terminal as its stdout. It runs the
    // command with $SHELL, so the payload is built with POSIX printf, and the
    // shell is pinned to sh so that the test runs alike under any login shell.
    let out = std::process::Command::new("script")
        .env("SHELL", "/bin/sh")
        .args([
            "-qec",
            &format!(
                "{bin} send {} \"$(printf 'hi\\033]0;owned\\007\\033[2J')\"",
                served.addr
            ),
            "/dev/null",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("hi\\u{1b}]0;owned\\u{7}\\u{1b}[2J"), "{text:?}");
    assert!(!text.contains('\u{1b}'), "a raw escape reached the terminal: {text:?}");
    // To a pipe the reply is passed as it is.
    let (code, stdout, _) = common::run_to_end(&["send", &served.addr.to_string(), "hi\u{1b}[2J"]);
    assert_eq!((code, stdout.as_str()), (Some(0), "hi\u{1b}[2J\n"));
}

/// The process's open file descriptors.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// A scrape over a fresh connection; the status line.
fn scrape_status(addr: std::net::SocketAddr) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    let _ = s.read_to_string(&mut response);
    response.lines().next().unwrap_or_default().to_string()
}

#[test]
fn half_sent_metrics_requests_are_capped_and_closed() {
    use std::io::{Read as _, Write as _};
    let served = Served::start(&["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"]);
    let metrics = served.metrics_addr();
    let pid = served.child.id();
    assert_eq!(scrape_status(metrics), "HTTP/1.1 200 OK");
    let before = open_fds(pid);
    let mut held = Vec::new();
    for _ in 0..300 {
        let mut s = std::net::TcpStream::connect(metrics).unwrap();
        s.write_all(b"GET /metr").unwrap();
        held.push(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    let during = open_fds(pid);
    assert!(
        during <= before + 64,
        "{before} → {during} descriptors with 300 half-sent requests"
    );
    // The header-read timeout closes them: the first held connection sees EOF.
    held[0].set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 256];
    let n = held[0].read(&mut buf).unwrap_or(0);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "held open for {:?}",
        started.elapsed()
    );
    assert!(
        n == 0 || buf.starts_with(b"HTTP/1.1 408"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    // Clients that hang up free their slots, and a scrape is served again.
    drop(held);
    assert_eq!(scrape_status(metrics), "HTTP/1.1 200 OK");
}

/// A 4 MB module of a million empty functions: cheap to send, and left alone it
/// takes minutes and gigabytes to compile.
fn million_functions() -> Vec<u8> {
    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    fn section(id: u8, payload: &[u8], out: &mut Vec<u8>) {
        out.push(id);
        leb(payload.len(), out);
        out.extend_from_slice(payload);
    }
    const N: usize = 1_000_000;
    let mut module = b"\0asm\x01\0\0\0".to_vec();
    section(1, &[1, 0x60, 0, 0], &mut module); // one type: () -> ()
    let mut functions = Vec::new();
    leb(N, &mut functions);
    functions.resize(functions.len() + N, 0);
    section(3, &functions, &mut module);
    let mut code = Vec::new();
    leb(N, &mut code);
    for _ in 0..N {
        code.extend_from_slice(&[2, 0, 0x0b]); // 2 bytes: no locals, end
    }
    section(10, &code, &mut module);
    module
}

#[test]
fn a_compile_slowed_by_a_busy_host_is_not_refused_for_time_it_did_not_get() {
    // Before: the compile bound was wall time, and the child (at a lower
    // priority) starved beside busy loops until the bound refused the module.
    let dir = tempfile::tempdir().unwrap();
    let mut wat = String::from(
        r#"(module (memory (export "memory") 1)
        (func (export "alloc") (param i32) (result i32) i32.const 0)
        (func (export "handle") (param i32 i32) (result i64) i64.const -1)"#,
    );
    // About half a second of compiling: thousands of functions.
    for i in 0..4_000 {
        wat.push_str(&format!("(func $f{i} (result i32) i32.const {i})"));
    }
    wat.push(')');
    let path = write_file(dir.path(), "many.wat", wat.as_bytes());
    let cpu = common::last_cpu();
    // Four busy loops leave the child (five below the gateway's niceness)
    // about 7% of the CPU: its half second of compiling takes seconds.
    let busy: Vec<_> = (0..4).map(|_| common::BusyLoop::on(cpu)).collect();
    let args = ["check", path.as_str(), "--no-cache", "--compile-timeout", "2"];
    let started = Instant::now();
    let out = common::pinned(common::wasmgate(&args), cpu, 0).output().unwrap();
    let took = started.elapsed();
    drop(busy);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "refused after {took:?}: {err}");
    // It means something only if the compile took longer than the bound in
    // wall time.
    assert!(
        took > Duration::from_secs(2),
        "the busy loops did not slow the compile: {took:?}"
    );
}

#[test]
fn a_module_over_a_compile_bound_is_refused_naming_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "million.wasm", &million_functions());
    for (bounds, says) in [
        (
            ["--compile-memory", "128MiB", "--compile-timeout", "600"],
            "the 128 MiB compile memory bound (--compile-memory)",
        ),
        (
            ["--compile-memory", "4GiB", "--compile-timeout", "1"],
            "the 1 s compile time bound (--compile-timeout), in CPU time",
        ),
    ] {
        for command in [vec!["check", &path], vec!["--listen", "127.0.0.1:0", "--module", &path]] {
            let args = [command, bounds.to_vec()].concat();
            let started = Instant::now();
            let (code, _, err) = common::run_to_end(&args);
            assert_eq!(code, Some(1), "{args:?}: {err}");
            assert!(err.contains(&path) && err.contains(says), "{args:?}: {err}");
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{args:?} took {:?}",
                started.elapsed()
            );
        }
    }
}

#[test]
fn sigterm_while_a_reload_compiles_exits_at_once_and_publishes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("guest.wat");
    std::fs::write(&path, ECHO).unwrap();
    let mut served = Served::start(&["--listen", "127.0.0.1:0", "--module", path.to_str().unwrap()]);
    let c = client();
    replace(&path, &million_functions());
    // The compile runs in a child process: serving goes on meanwhile.
    std::thread::sleep(Duration::from_millis(400));
    for _ in 0..5 {
        assert_eq!(common::ask(&c, served.addr, b"meanwhile"), b"meanwhile");
    }
    let status = common::signal_and_wait(&mut served.child, "TERM", Duration::from_secs(1));
    assert_eq!(status.code(), Some(0));
    let rest: Vec<String> = served.log.iter().collect();
    assert!(rest.iter().any(|l| l.contains("shutting down")), "{rest:?}");
    assert!(
        !rest.iter().any(|l| l.contains("reloaded")),
        "a reload was published at shutdown: {rest:?}"
    );
}

#[test]
fn sigterm_while_starting_up_on_a_slow_module_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "million.wasm", &million_functions());
    let mut child = common::wasmgate(&["--listen", "127.0.0.1:0", "--module", &path])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    common::signal_and_wait(&mut child, "TERM", Duration::from_secs(1));
}

// Promised in the README and docs/ABI.md, and now tested.

#[test]
fn guest_log_text_is_cut_at_1_kib_invalid_utf8_replaced_and_20_lines_a_second() {
    let dir = tempfile::tempdir().unwrap();
    // Each datagram logs 3,000 bytes: "\xff" (invalid UTF-8), then 'a's, ending "END".
    let path = write_file(
        dir.path(),
        "chatty.wat",
        br#"(module
            (import "wasmgate" "log" (func $log (param i32 i32 i32)))
            (memory (export "memory") 1)
            (data (i32.const 0) "\ff")
            (data (i32.const 2997) "END")
            (func (export "alloc") (param i32) (result i32) i32.const 8192)
            (func (export "handle") (param i32 i32) (result i64)
                (memory.fill (i32.const 1) (i32.const 97) (i32.const 2996))
                (call $log (i32.const 2) (i32.const 0) (i32.const 3000))
                i64.const -1))"#,
    );
    let served = Served::start(&["--listen", "127.0.0.1:0", "--module", &path, "--workers", "1"]);
    let c = client();
    for _ in 0..100 {
        c.send_to(b"x", served.addr).unwrap();
    }
    let lines = lines_for(&served, Duration::from_millis(700));
    let logged: Vec<&String> = lines.iter().filter(|l| l.contains("aaaa")).collect();
    // 20 a second, counted per wall-clock second: a burst that straddles a second
    // may pass twice that, and without the limit all 100 would.
    assert!(
        !logged.is_empty() && logged.len() <= 40,
        "{} guest lines for 100 datagrams in well under a second",
        logged.len()
    );
    let line = logged[0];
    assert!(line.contains('\u{fffd}'), "invalid UTF-8 is not replaced: {line}");
    assert!(!line.contains("END"), "the message was not cut at 1 KiB");
    let a_run = line
        .split('\u{fffd}')
        .nth(1)
        .unwrap()
        .chars()
        .take_while(|&ch| ch == 'a')
        .count();
    assert_eq!(a_run, 1024 - 1, "1 KiB in all: the replaced byte and 1,023 'a's");
}

#[test]
fn wasi_stderr_is_cut_at_1_kib() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        dir.path(),
        "stderr.wat",
        br#"(module
            (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
            (memory (export "memory") 1)
            (data (i32.const 4093) "END")
            (func (export "_start")
                (memory.fill (i32.const 1024) (i32.const 98) (i32.const 3069))
                (i32.store (i32.const 0) (i32.const 1024))
                (i32.store (i32.const 4) (i32.const 3072))
                (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))))"#,
    );
    let served = Served::start(&["--listen", "127.0.0.1:0", "--module", &path]);
    client().send_to(b"x", served.addr).unwrap();
    let line = served.line_with(&["stderr: bbbb"]).expect("the stderr line");
    assert!(!line.contains("END"), "stderr was not cut");
    let b_run = line
        .split("stderr: ")
        .nth(1)
        .unwrap()
        .chars()
        .take_while(|&ch| ch == 'b')
        .count();
    assert_eq!(b_run, 1024);
}

#[test]
fn a_module_over_64_mib_is_refused_by_check_and_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut big = ECHO.to_vec();
    big.resize((64 << 20) + 1, b' '); // WAT with trailing blanks: valid text, too big
    let path = write_file(dir.path(), "big.wat", &big);
    for args in [vec!["check", &path], vec!["--listen", "127.0.0.1:0", "--module", &path]] {
        let (code, _, err) = common::run_to_end(&args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(
            err.contains(&path) && err.contains("over the 67108864 byte limit"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn a_reload_after_the_binary_was_replaced_on_disk_still_compiles() {
    // A package upgrade replaces the file while the old process serves on; its
    // compiling child must be the running image, not whatever is at that path now.
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("wasmgate");
    std::fs::copy(env!("CARGO_BIN_EXE_wasmgate"), &binary).unwrap();
    let module = dir.path().join("guest.wat");
    std::fs::write(&module, ECHO).unwrap();
    let mut served = Served::start_program(
        &binary,
        &["--listen", "127.0.0.1:0", "--module", module.to_str().unwrap()],
        "info",
    );
    // The new "version" on disk cannot compile anything.
    let upgraded = dir.path().join("wasmgate.new");
    std::fs::write(&upgraded, "#!/bin/sh\nexit 3\n").unwrap();
    std::fs::set_permissions(&upgraded, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&upgraded, &binary).unwrap();
    replace(&module, FIRST_BYTE);
    let line = served.line_with(&["reload"]).expect("a reload line");
    assert!(line.contains("reloaded"), "{line}");
    assert_eq!(common::ask(&client(), served.addr, b"hi"), b"h");
    common::signal_and_wait(&mut served.child, "TERM", Duration::from_secs(1));
}

/// Every file under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                out.extend(files_under(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}

const PWNED: &[u8] = br#"(module
  (memory (export "memory") 1)
  (data (i32.const 0) "PWNED")
  (func (export "alloc") (param i32) (result i32) i32.const 64)
  (func (export "handle") (param i32 i32) (result i64) i64.const 5))"#;

/// `wasmgate check` with the cache at `cache` and its key at `key`; the exit
/// code and stderr.
fn check_cached(module: &str, cache: &std::path::Path, key: &std::path::Path) -> (Option<i32>, String) {
    let (code, _, err) = common::run_to_end(&[
        "check",
        module,
        "--cache-dir",
        cache.to_str().unwrap(),
        "--cache-key",
        key.to_str().unwrap(),
    ]);
    (code, err)
}

#[test]
fn a_compile_cache_entry_is_used_only_when_authentic_and_a_bad_one_costs_a_recompile() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, key) = (dir.path().join("cache"), dir.path().join("state").join("cache.key"));
    let echo = write_file(dir.path(), "echo.wat", ECHO);
    let pwned = write_file(dir.path(), "pwned.wat", PWNED);
    // First: compiled and stored. Second: found.
    let (code, err) = check_cached(&echo, &cache, &key);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("found in the cache"), "{err}");
    let (code, err) = check_cached(&echo, &cache, &key);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("compiled module found in the cache"), "{err}");
    let echo_entry = files_under(&cache).pop().expect("an entry");
    let mode =
        |p: &std::path::Path| std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions());
    assert_eq!(mode(&key) & 0o777, 0o600);
    assert_eq!(mode(&cache) & 0o777, 0o700);

    // The attack: another module's machine code put in the entry's place. Before,
    // the gateway loaded and ran whatever machine code the entry held.
    let (code, err) = check_cached(&pwned, &cache, &key);
    assert_eq!(code, Some(0), "{err}");
    let pwned_entry = files_under(&cache).into_iter().find(|p| *p != echo_entry).unwrap();
    std::fs::copy(&pwned_entry, &echo_entry).unwrap();
    let served = Served::start(&[
        "--listen",
        "127.0.0.1:0",
        "--module",
        &echo,
        "--cache-dir",
        cache.to_str().unwrap(),
        "--cache-key",
        key.to_str().unwrap(),
    ]);
    assert!(
        served
            .preamble
            .iter()
            .any(|l| l.contains("compile cache entry refused") && l.contains("failed authentication")),
        "{:?}",
        served.preamble
    );
    assert_eq!(common::ask(&client(), served.addr, b"mine"), b"mine");
    drop(served);
    // The refused entry was replaced by an authentic one.
    let (_, err) = check_cached(&echo, &cache, &key);
    assert!(err.contains("found in the cache"), "{err}");

    // Bytes flipped in the machine code: refused, recompiled, served right.
    let mut bytes = std::fs::read(&echo_entry).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&echo_entry, &bytes).unwrap();
    let (code, err) = check_cached(&echo, &cache, &key);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("failed authentication"), "{err}");

    // A FIFO in an entry's place: skipped at once, not waited on.
    std::fs::remove_file(&echo_entry).unwrap();
    let fifo = std::ffi::CString::new(echo_entry.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let started = Instant::now();
    let (code, err) = check_cached(&echo, &cache, &key);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("not a regular file"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
}

#[test]
fn a_cache_directory_others_may_write_is_not_used_and_the_gateway_says_so() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("shared-cache");
    std::fs::create_dir(&cache).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
    let key = dir.path().join("cache.key");
    let echo = write_file(dir.path(), "echo.wat", ECHO);
    let (code, err) = check_cached(&echo, &cache, &key);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("the compile cache is not used") && err.contains("writable by anyone (mode 777)"),
        "{err}"
    );
    assert!(
        files_under(&cache).is_empty(),
        "something was written to a cache others may write"
    );
    // A key inside the cache directory is refused too.
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700)).unwrap();
    let (code, err) = check_cached(&echo, &cache, &cache.join("key"));
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("inside it"), "{err}");
}

#[test]
fn the_cache_goes_only_where_asked_and_never_under_the_real_home() {
    let dir = tempfile::tempdir().unwrap();
    let echo = write_file(dir.path(), "echo.wat", ECHO);
    let home = dir.path().join("home");
    // --no-cache writes nothing, not even under the default directories.
    let mut cmd = common::wasmgate(&["check", &echo, "--no-cache"]);
    cmd.env("HOME", &home)
        .env("XDG_CACHE_HOME", home.join("xdg"))
        .env_remove("XDG_STATE_HOME");
    assert!(cmd.output().unwrap().status.success());
    assert!(files_under(&home).is_empty());
    // Without flags: entries under $XDG_CACHE_HOME/wasmgate, the key under
    // $HOME/.local/state/wasmgate; the second run finds the first one's entry.
    for run in 0..2 {
        let mut cmd = common::wasmgate(&["check", &echo]);
        cmd.env("HOME", &home)
            .env("XDG_CACHE_HOME", home.join("xdg"))
            .env_remove("XDG_STATE_HOME");
        let out = cmd.output().unwrap();
        assert!(out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.contains("found in the cache"), run == 1, "run {run}: {err}");
    }
    assert_eq!(files_under(&home.join("xdg").join("wasmgate")).len(), 1);
    assert!(home.join(".local/state/wasmgate/cache.key").is_file());
}
