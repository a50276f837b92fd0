//! Forwarding through the built binary: pools changed by editing the config
//! file and by SIGHUP while traffic flows, two processes agreeing on endpoints,
//! sockets freed by idle expiry, replies drained at shutdown, `wasmgate send`.

use crate::common;
use crate::common::fixtures::{config, example};

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Served, Upstream, ask, client, signal, signal_and_wait, wait_until, write_file};

const FORWARD: &str = "examples/forward.wat";
const TOKEN_ROUTER: &str = "examples/token-router.wat";

/// Replaces the file at `path` by renaming a new one over it, as editors and
/// deploy tools do.
fn replace(path: &str, contents: &str) {
    let tmp = format!("{path}.new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn tag(reply: &[u8]) -> String {
    String::from_utf8_lossy(&reply[..reply.iter().position(|&b| b == b':').unwrap_or(0)]).into_owned()
}

/// Clients that each ask once every few milliseconds until stopped, and remember
/// which endpoint answered each time and how many answers never came.
struct Probes {
    stop: Arc<AtomicBool>,
    lost: Arc<AtomicUsize>,
    sent: Arc<AtomicUsize>,
    tags: Arc<std::sync::Mutex<Vec<HashSet<String>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Probes {
    fn start(gateway: SocketAddr, n: usize) -> Self {
        let (stop, lost, sent): (Arc<AtomicBool>, Arc<AtomicUsize>, Arc<AtomicUsize>) = Default::default();
        let tags = Arc::new(std::sync::Mutex::new(vec![HashSet::new(); n]));
        let (s, l, c, t) = (
            Arc::clone(&stop),
            Arc::clone(&lost),
            Arc::clone(&sent),
            Arc::clone(&tags),
        );
        let thread = std::thread::spawn(move || {
            let clients: Vec<UdpSocket> = (0..n)
                .map(|_| {
                    let c = client();
                    c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                    c
                })
                .collect();
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut seq = 0u64;
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                for (i, client) in clients.iter().enumerate() {
                    seq += 1;
                    client.send_to(&seq.to_be_bytes(), gateway).unwrap();
                    c.fetch_add(1, Ordering::Relaxed);
                    let mut buf = [0u8; 64];
                    match client.recv_from(&mut buf) {
                        Ok((n, _)) => {
                            t.lock().unwrap()[i].insert(tag(&buf[..n]));
                        }
                        Err(_) => {
                            l.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Self {
            stop,
            lost,
            sent,
            tags,
            thread: Some(thread),
        }
    }

    /// Stops the probes; (sent, lost, the set of endpoints each client saw).
    fn finish(mut self) -> (usize, usize, Vec<HashSet<String>>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        (
            self.sent.load(Ordering::Relaxed),
            self.lost.load(Ordering::Relaxed),
            self.tags.lock().unwrap().clone(),
        )
    }
}

/// The endpoints new clients reach, by tag.
fn reached_by_new_clients(gateway: SocketAddr, n: usize) -> HashSet<String> {
    (0..n).map(|_| tag(&ask(&client(), gateway, b"new"))).collect()
}

/// A Kubernetes ConfigMap mounted as a directory: `wasmgate.toml` is a link
/// through `..data` to a timestamped directory, and an edit of the ConfigMap
/// writes a new directory and renames a new `..data` link over the old one.
/// The file the gateway was started with never changes; what it names does.
#[test]
fn a_config_edit_through_a_configmap_directory_mount_is_seen() {
    use std::os::unix::fs::symlink;
    let (a, b) = (Upstream::echo("a:"), Upstream::echo("b:"));
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let version = |name: &str, endpoint: SocketAddr| {
        std::fs::create_dir(d.join(name)).unwrap();
        std::fs::write(d.join(name).join("wasmgate.toml"), config(&[endpoint], "")).unwrap();
    };
    version("..2026_12_07_09_00_00.1", a.addr);
    symlink("..2026_12_07_09_00_00.1", d.join("..data")).unwrap();
    symlink("..data/wasmgate.toml", d.join("wasmgate.toml")).unwrap();
    let path = d.join("wasmgate.toml");
    let served = Served::start(&["--config", path.to_str().unwrap()]);
    assert_eq!(reached_by_new_clients(served.addr, 5), HashSet::from(["a".into()]));

    // The kubelet's update: a new directory, a new link renamed over `..data`,
    // then the old directory removed.
    version("..2026_12_07_09_01_00.2", b.addr);
    symlink("..2026_12_07_09_01_00.2", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    std::fs::remove_dir_all(d.join("..2026_12_07_09_00_00.1")).unwrap();
    let line = served
        .line_with(&["the config file changed", "pools reloaded"])
        .expect("the edit is seen through the directory mount");
    assert!(line.contains(&b.addr.to_string()), "{line}");
    wait_until("new clients to reach the endpoint of the edited ConfigMap", || {
        reached_by_new_clients(served.addr, 5) == HashSet::from(["b".into()])
    });
}

#[test]
fn pools_change_by_editing_the_config_file_and_by_sighup_while_probes_lose_nothing() {
    let (a, b, c) = (Upstream::echo("a:"), Upstream::echo("b:"), Upstream::echo("c:"));
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "gateway.toml", config(&[a.addr, b.addr], "").as_bytes());
    let served = Served::start(&["--config", &path]);
    let probes = Probes::start(served.addr, 12);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        reached_by_new_clients(served.addr, 30),
        HashSet::from(["a".into(), "b".into()])
    );

    // B leaves, C joins: the file is replaced while the probes run.
    replace(&path, &config(&[a.addr, c.addr], ""));
    let line = served
        .line_with(&["the config file changed", "pools reloaded"])
        .expect("a reload line");
    assert!(
        line.contains(&c.addr.to_string()) && !line.contains(&b.addr.to_string()),
        "{line}"
    );
    std::thread::sleep(Duration::from_millis(300));
    // New clients go to A or C, never to the removed B.
    assert_eq!(
        reached_by_new_clients(served.addr, 30),
        HashSet::from(["a".into(), "c".into()])
    );

    // SIGHUP re-reads the file even when nothing about it looks changed: same
    // inode, same size, same modification time, B back in place of C.
    let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
    let text = config(&[a.addr, b.addr], "");
    assert_eq!(
        text.len(),
        config(&[a.addr, c.addr], "").len(),
        "ports of the same length"
    );
    std::fs::write(&path, &text).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(modified)
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    signal(served.child.id(), "HUP");
    let line = served
        .line_with(&["SIGHUP", "pools reloaded"])
        .expect("a SIGHUP reload line");
    assert!(line.contains(&b.addr.to_string()), "{line}");
    std::thread::sleep(Duration::from_millis(300));

    let (sent, lost, tags) = probes.finish();
    assert!(sent > 200, "only {sent} probes");
    assert_eq!(lost, 0, "{lost} of {sent} probe datagrams lost across the reloads");
    // Every probe client kept its endpoint throughout (sessions to B drained).
    for (i, seen) in tags.iter().enumerate() {
        assert_eq!(seen.len(), 1, "probe client {i} moved: {seen:?}");
    }
}

#[test]
fn an_invalid_pool_change_is_logged_and_the_old_pools_keep_serving() {
    let a = Upstream::echo("a:");
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "gateway.toml", config(&[a.addr], "").as_bytes());
    let served = Served::start(&["--config", &path]);
    for (broken, why) in [
        (config(&[], ""), "empty"),
        (config(&[a.addr], "policy = \"fastest\"\n"), "fastest"),
        (config(&[a.addr], "idle_timeout = \"soon\"\n"), "idle_timeout"),
        (config(&[a.addr], "flavour = \"mint\"\n"), "flavour"),
    ] {
        replace(&path, &broken);
        let line = served
            .line_with(&["refused", "old pools keep serving"])
            .expect("a refusal line");
        assert!(line.contains(why), "{why}: {line}");
        assert_eq!(ask(&client(), served.addr, b"x"), b"a:x");
    }
}

/// Asks each of `keys` through a token router at `gateway` and returns, per key,
/// which of `ups` received it.
fn owners(gateway: SocketAddr, ups: &[Upstream], keys: usize) -> Vec<SocketAddr> {
    let c = client();
    for k in 0..keys {
        let token = format!("{k:08}");
        let reply = ask(&c, gateway, format!("{token}{k}").as_bytes());
        assert!(reply.ends_with(k.to_string().as_bytes()));
    }
    let mut owner = HashMap::new();
    for u in ups {
        for (data, _) in u.received() {
            owner.insert(String::from_utf8(data).unwrap(), u.addr);
        }
    }
    (0..keys).map(|k| owner[&k.to_string()]).collect()
}

fn router(endpoints: &[SocketAddr]) -> Served {
    let list: Vec<String> = endpoints.iter().map(ToString::to_string).collect();
    Served::start(&[
        "--listen",
        "127.0.0.1:0",
        "--module",
        &example(TOKEN_ROUTER),
        "--upstream",
        &format!("backend={}", list.join(",")),
    ])
}

#[test]
fn two_processes_agree_on_1000_keys_and_removing_one_of_four_moves_only_its_keys() {
    const KEYS: usize = 1000;
    let ups: Vec<Upstream> = (0..4).map(|i| Upstream::echo(&format!("u{i}:"))).collect();
    let addrs: Vec<SocketAddr> = ups.iter().map(|u| u.addr).collect();
    let run = |endpoints: Vec<SocketAddr>| -> Vec<usize> {
        ups.iter().for_each(Upstream::clear);
        let served = router(&endpoints);
        owners(served.addr, &ups, KEYS)
            .iter()
            .map(|o| addrs.iter().position(|a| a == o).unwrap())
            .collect()
    };
    let first = run(addrs.clone());
    // Another process, listing the same endpoints in the reverse order.
    let second = run(addrs.iter().rev().copied().collect());
    assert_eq!(first, second, "two processes disagree on some keys");
    let per: Vec<usize> = (0..4).map(|i| first.iter().filter(|&&o| o == i).count()).collect();
    assert!(per.iter().all(|&n| (150..=350).contains(&n)), "uneven spread: {per:?}");

    // A third process without endpoint 2: only endpoint 2's keys move.
    let third = run(addrs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 2)
        .map(|(_, a)| *a)
        .collect());
    let mut moved = 0;
    for k in 0..KEYS {
        if first[k] == 2 {
            assert_ne!(third[k], 2);
            moved += 1;
        } else {
            assert_eq!(first[k], third[k], "key {k} moved though its endpoint stayed");
        }
    }
    let fraction = moved as f64 / KEYS as f64;
    println!("removing one of 4 endpoints moved {moved} of {KEYS} keys ({fraction:.3})");
    assert!((0.15..=0.35).contains(&fraction), "{fraction}");
}

/// The open file descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

#[test]
fn idle_sessions_close_their_sockets() {
    let a = Upstream::echo("a:");
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        dir.path(),
        "gateway.toml",
        config(&[a.addr], "idle_timeout = \"300ms\"\n").as_bytes(),
    );
    let served = Served::start(&["--config", &path]);
    let pid = served.child.id();
    let before = open_fds(pid);
    let clients: Vec<UdpSocket> = (0..50).map(|_| client()).collect();
    for c in &clients {
        assert_eq!(ask(c, served.addr, b"x"), b"a:x");
    }
    let during = open_fds(pid);
    assert!(during >= before + 50, "a socket per session: {before} then {during}");
    wait_until("the sessions' sockets to close", || open_fds(pid) <= before);
    // And they are opened again on demand.
    assert_eq!(ask(&clients[0], served.addr, b"y"), b"a:y");
}

#[test]
fn sigterm_delivers_upstream_replies_already_on_their_way() {
    // An upstream that answers 300 ms late.
    let slow = UdpSocket::bind("127.0.0.1:0").unwrap();
    let slow_addr = slow.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = slow.recv_from(&mut buf) {
            std::thread::sleep(Duration::from_millis(300));
            let _ = slow.send_to(&buf[..n], from);
        }
    });
    let mut served = router_like_forward(slow_addr);
    let c = client();
    c.send_to(b"late", served.addr).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let status = signal_and_wait(&mut served.child, "TERM", Duration::from_secs(3));
    assert!(status.success(), "{status}");
    let mut buf = [0u8; 64];
    let (n, from) = c
        .recv_from(&mut buf)
        .expect("the late reply was delivered during shutdown");
    assert_eq!((&buf[..n], from), (&b"late"[..], served.addr));
}

fn router_like_forward(upstream: SocketAddr) -> Served {
    Served::start(&[
        "--listen",
        "127.0.0.1:0",
        "--module",
        &example(FORWARD),
        "--upstream",
        &format!("backend={upstream}"),
    ])
}

#[test]
fn wasmgate_send_works_through_a_forwarding_gateway() {
    let a = Upstream::echo("a:");
    let served = router_like_forward(a.addr);
    let (code, stdout, stderr) = common::run_to_end(&["send", &served.addr.to_string(), "one", "two"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "a:one\na:two\n");
}

#[test]
fn under_a_low_open_file_limit_max_sessions_is_scaled_down_with_a_warning_and_enforced() {
    let a = Upstream::echo("a:");
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "gateway.toml", config(&[a.addr], "").as_bytes());
    // The hard limit 600 leaves 344 sockets for sessions (256 are kept for the rest).
    let served = Served::start_program(
        Path::new("/bin/sh"),
        &[
            "-c",
            "ulimit -Sn 600 && ulimit -Hn 600 && exec \"$0\" \"$@\"",
            env!("CARGO_BIN_EXE_wasmgate"),
            "--config",
            &path,
            "--metrics",
            "127.0.0.1:0",
        ],
        "info",
    );
    let warning = served
        .preamble
        .iter()
        .find(|l| l.contains("scaled down to fit"))
        .unwrap_or_else(|| panic!("no warning: {:#?}", served.preamble));
    assert!(
        warning.contains("open_files=600") && warning.contains("max_sessions=10000"),
        "{warning}"
    );
    // 344 sessions at most (two workers, 172 each): none beyond the budget is
    // opened, and the gateway serves on. (None of these clients talks on after
    // its answer, so a new one may take an earlier one's session: most are
    // answered, some are refused or lose their session before the answer.)
    let before = open_fds(served.child.id());
    let clients: Vec<UdpSocket> = (0..400).map(|_| client()).collect();
    for c in &clients {
        c.send_to(b"x", served.addr).unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut answered = 0;
    for c in &clients {
        c.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 16];
        if c.recv_from(&mut buf).is_ok() {
            answered += 1;
        }
    }
    assert!(
        (300..=400).contains(&answered),
        "{answered} of 400 clients were answered"
    );
    // The sessions' sockets, and no more: the hard limit itself is no evidence,
    // since the process cannot pass it anyway.
    let after = open_fds(served.child.id());
    assert!(after <= before + 344, "{before} descriptors before, {after} after");
    let body = common::scrape(served.metrics_addr());
    let active = common::sample(&body, "wasmgate_sessions_active{listener=\"fwd\"}");
    assert!(active <= 344.0, "{active} sessions open");
}

#[test]
fn a_forwarding_module_on_a_listener_without_pools_is_warned_about() {
    let served = Served::start(&["--listen", "127.0.0.1:0", "--module", &example(FORWARD)]);
    let line = served
        .line_with(&["imports wasmgate.forward", "no upstream pools"])
        .expect("a warning");
    assert!(line.contains("WARN") && line.contains("--upstream"), "{line}");
    // And every datagram is dropped as unknown_pool, with the gateway serving on.
    let c = client();
    c.send_to(b"x", served.addr).unwrap();
    common::assert_silent(&c, Duration::from_millis(200));
}

#[test]
fn host_names_are_looked_up_every_resolve_every_including_names_a_reload_added() {
    // Before: the interval was fixed at start, from the names present then, so
    // a name that a reload brought in was never looked up again.
    let a = Upstream::echo("a:");
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "gateway.toml", config(&[a.addr], "").as_bytes());
    let served = Served::start_logging(&["--config", &path], "info,wasmgate::service=debug");
    let named = format!(
        "[[listener]]\nname = \"fwd\"\nlisten = \"127.0.0.1:0\"\nmodule = \"{}\"\nworkers = 2\n\n\
         [upstreams.backend]\nendpoints = [\"localhost:{}\"]\nresolve_every = \"1s\"\n",
        example(FORWARD),
        a.addr.port()
    );
    replace(&path, &named);
    served
        .line_with(&["the config file changed", "pools reloaded"])
        .expect("the reload");
    // Then the name is looked up again every second (unchanged, so debug lines).
    for _ in 0..2 {
        served
            .line_with(&["host names are due to be looked up again"])
            .expect("a look-up within 10 s");
    }
    assert_eq!(ask(&client(), served.addr, b"hi"), b"a:hi");
}

#[test]
fn pools_added_to_a_listener_started_without_them_are_refused_with_a_reason() {
    // Before: ignored without a word.
    let dir = tempfile::tempdir().unwrap();
    let plain = format!(
        "[[listener]]\nname = \"plain\"\nlisten = \"127.0.0.1:0\"\nmodule = \"{}\"\n",
        example("examples/echo.wat")
    );
    let path = write_file(dir.path(), "gateway.toml", plain.as_bytes());
    let served = Served::start(&["--config", &path]);
    let a = Upstream::echo("a:");
    replace(
        &path,
        &format!("{plain}\n[upstreams.backend]\nendpoints = [\"{}\"]\n", a.addr),
    );
    let line = served
        .line_with(&["restart it to add some"])
        .expect("an error naming the restart");
    assert!(line.contains("ERROR") && line.contains("plain"), "{line}");
    // It serves on, as it was.
    assert_eq!(ask(&client(), served.addr, b"still"), b"still");
}
