//! Hot reload under live traffic. Each test serves a module that tags every reply
//! with one byte, changes the file the way deployments do, and keeps probe clients
//! sending uniquely numbered datagrams throughout. Every probe must be answered with
//! exactly the old or the new module's reply, and once a client has seen the new
//! module it must never see the old one again.

use crate::common;
use crate::common::fixtures::tagged;

use std::time::{Duration, Instant};

use common::{Served, ask, client, write_file};

const SWAP_LIMIT: Duration = Duration::from_secs(5);

/// Waits for a log line containing every one of `words`.
fn log_line(served: &Served, words: &[&str]) -> String {
    let deadline = Instant::now() + SWAP_LIMIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match served.log.recv_timeout(left) {
            Ok(line) if words.iter().all(|w| line.contains(w)) => return line,
            Ok(_) => {}
            Err(_) => panic!("no log line with {words:?}"),
        }
    }
}

#[test]
fn binary_logs_each_reload_and_each_failure_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "guest.wat", &tagged(b'A'));
    let served = Served::start(&["--listen", "127.0.0.1:0", "--module", &path]);
    let c = client();
    assert_eq!(ask(&c, served.addr, b"x"), b"Ax");
    std::fs::write(&path, tagged(b'B')).unwrap();
    let line = log_line(&served, &["reloaded"]);
    for word in [path.as_str(), "sha256=", "compile_ms=", "replaced=true", "previous="] {
        assert!(line.contains(word), "reload line lacks {word:?}: {line}");
    }
    assert_eq!(ask(&c, served.addr, b"x"), b"Bx");
    std::fs::write(&path, b"(module)").unwrap();
    let line = log_line(&served, &["reload failed"]);
    assert!(line.contains(&path) && line.contains("missing export"), "{line}");
    // Touching the bad file again does not repeat the error.
    std::thread::sleep(Duration::from_millis(200));
    std::fs::write(&path, b"(module)").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let again: Vec<String> = served.log.try_iter().filter(|l| l.contains("reload failed")).collect();
    assert!(again.is_empty(), "the same failure was logged again: {again:?}");
    assert_eq!(ask(&c, served.addr, b"x"), b"Bx");
    // Deleting the module is a warning, once; the last good module serves on.
    std::fs::remove_file(&path).unwrap();
    let line = log_line(
        &served,
        &["WARN", "module file is missing", "last good module keeps serving"],
    );
    assert!(line.contains(&path), "{line}");
    assert_eq!(ask(&c, served.addr, b"x"), b"Bx");
}

#[test]
fn binary_with_no_watch_reloads_only_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "guest.wat", &tagged(b'A'));
    let served = Served::start(&["--listen", "127.0.0.1:0", "--module", &path, "--no-watch"]);
    let c = client();
    assert_eq!(ask(&c, served.addr, b"x"), b"Ax");
    std::fs::write(&path, tagged(b'B')).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(ask(&c, served.addr, b"x"), b"Ax", "--no-watch reloaded anyway");
    common::signal(served.child.id(), "HUP");
    log_line(&served, &["reloaded", "replaced=true"]);
    assert_eq!(ask(&c, served.addr, b"x"), b"Bx");
    // SIGHUP reloads even unchanged content.
    common::signal(served.child.id(), "HUP");
    log_line(&served, &["reloaded", "replaced=false"]);
}
