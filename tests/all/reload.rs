//! Hot reload under live traffic. Each test serves a module that tags every reply
//! with one byte, changes the file the way deployments do, and keeps probe clients
//! sending uniquely numbered datagrams throughout. Every probe must be answered with
//! exactly the old or the new module's reply, and once a client has seen the new
//! module it must never see the old one again.

use crate::common;
use crate::common::fixtures::tagged;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{ask, client};
use sha2::Digest as _;
use wasmgate::config::Limits;
use wasmgate::gateway::Gateway;
use wasmgate::guest::Env;
use wasmgate::service::reload::Reloader;

/// A gateway and its reloader, both in this process.
struct Live {
    gateway: Gateway,
    _reloader: Reloader,
}

fn serve(path: &Path) -> Live {
    let env = Env::new(Limits::default()).unwrap();
    let bytes = std::fs::read(path).unwrap();
    let program = env.load(path.display().to_string(), &bytes).unwrap();
    let gateway = Gateway::start(&env, program, &common::config()).unwrap();
    let reloader = Reloader::start(env, path.to_path_buf(), gateway.publisher(), true).unwrap();
    Live {
        gateway,
        _reloader: reloader,
    }
}

/// Clients that send numbered probes one at a time (every ~2 ms) and check each reply.
struct Probes {
    stop: Arc<AtomicBool>,
    last_tags: Vec<Arc<AtomicU8>>,
    threads: Vec<JoinHandle<Vec<u8>>>,
}

impl Probes {
    /// `order` lists the tags the replies may carry, in the order modules are served.
    fn start(addr: SocketAddr, clients: usize, order: &'static [u8]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut last_tags = Vec::new();
        let mut threads = Vec::new();
        for id in 0..clients {
            let stop = Arc::clone(&stop);
            let last = Arc::new(AtomicU8::new(0));
            last_tags.push(Arc::clone(&last));
            threads.push(std::thread::spawn(move || {
                let c = client();
                c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut tags = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let payload = format!("probe {id}-{n}");
                    c.send_to(payload.as_bytes(), addr).unwrap();
                    let mut buf = [0u8; 128];
                    let len = match c.recv(&mut buf) {
                        Ok(len) => len,
                        Err(e) => panic!("probe {payload:?} was not answered: {e}"),
                    };
                    let reply = &buf[..len];
                    assert_eq!(&reply[1..], payload.as_bytes(), "reply to {payload:?} is corrupt");
                    let tag = reply[0];
                    let rank = order.iter().position(|&t| t == tag);
                    let prev = tags.last().and_then(|p| order.iter().position(|t| t == p));
                    assert!(rank.is_some(), "reply from an unexpected module {:?}", tag as char);
                    assert!(
                        rank >= prev,
                        "probe {payload:?} answered by {:?} after {:?} had answered",
                        tag as char,
                        order[prev.unwrap()] as char
                    );
                    tags.push(tag);
                    last.store(tag, Ordering::Relaxed);
                    n += 1;
                    std::thread::sleep(Duration::from_millis(2));
                }
                tags
            }));
        }
        Self {
            stop,
            last_tags,
            threads,
        }
    }

    /// Waits until every client has been answered by `tag`; returns how long that took.
    fn wait_for(&self, tag: u8, limit: Duration) -> Duration {
        let started = Instant::now();
        while !self.last_tags.iter().all(|t| t.load(Ordering::Relaxed) == tag) {
            assert!(
                started.elapsed() < limit,
                "module {:?} was not serving within {limit:?}",
                tag as char
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        started.elapsed()
    }

    /// Stops the clients and returns every tag each saw, in order.
    fn finish(self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|t| t.join().expect("a probe client failed"))
            .collect()
    }
}

const SWAP_LIMIT: Duration = Duration::from_secs(5);

fn module_path(dir: &Path) -> PathBuf {
    dir.join("guest.wat")
}

/// A gateway serving module A from a fresh folder, with `clients` probes already
/// answered by A; `order` is every tag the test will serve, in order.
fn serving_a(clients: usize, order: &'static [u8]) -> (tempfile::TempDir, PathBuf, Live, Probes) {
    let dir = tempfile::tempdir().unwrap();
    let path = module_path(dir.path());
    std::fs::write(&path, tagged(b'A')).unwrap();
    let live = serve(&path);
    let probes = Probes::start(live.gateway.local_addr(), clients, order);
    probes.wait_for(b'A', SWAP_LIMIT);
    (dir, path, live, probes)
}

#[test]
fn overwrite_in_place() {
    let (_dir, path, live, probes) = serving_a(2, b"AB");
    std::fs::write(&path, tagged(b'B')).unwrap();
    probes.wait_for(b'B', SWAP_LIMIT);
    let seen = probes.finish();
    assert!(seen.iter().all(|tags| tags.contains(&b'A') && tags.ends_with(b"B")));
    let stats = live.gateway.shutdown();
    assert_eq!((stats.reloads, stats.reload_failures), (1, 0), "{stats}");
    assert_eq!(stats.received, stats.replied, "every probe answered: {stats}");
}

#[test]
fn slow_partial_write_never_serves_the_half_file() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let path = module_path(dir.path());
    std::fs::write(&path, tagged(b'A')).unwrap();
    let live = serve(&path);
    let probes = Probes::start(live.gateway.local_addr(), 2, b"AB");
    let new = tagged(b'B');
    let serving_a = live.gateway.program().sha256();
    let (first, rest) = new.split_at(new.len() / 2);
    let mut file = std::fs::File::create(&path).unwrap();
    // The first half in ten quick pieces, each gap well inside the 50 ms debounce:
    // none of the pieces may be read on its own.
    for piece in first.chunks(first.len().div_ceil(10)) {
        file.write_all(piece).unwrap();
        file.flush().unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    // Longer than the debounce: the half file is read, refused, and A serves on.
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        live.gateway.program().sha256(),
        serving_a,
        "the half file was published"
    );
    assert_eq!(
        live.gateway.stats().reload_failures,
        1,
        "the half file must be refused once, and no piece before it read"
    );
    assert!(probes.last_tags.iter().all(|t| t.load(Ordering::Relaxed) == b'A'));
    file.write_all(rest).unwrap();
    drop(file);
    probes.wait_for(b'B', SWAP_LIMIT);
    probes.finish();
    assert_eq!(live.gateway.stats().reloads, 1);
}

#[test]
fn write_to_a_temporary_file_and_rename_over_the_module() {
    let (dir, path, live, probes) = serving_a(2, b"AB");
    let tmp = dir.path().join(".guest.wat.tmp");
    std::fs::write(&tmp, tagged(b'B')).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    probes.wait_for(b'B', SWAP_LIMIT);
    probes.finish();
    let stats = live.gateway.stats();
    assert_eq!((stats.reloads, stats.reload_failures), (1, 0), "{stats}");
}

#[test]
fn delete_keeps_the_last_good_module_and_recreating_loads_it() {
    let (_dir, path, live, probes) = serving_a(2, b"AB");
    std::fs::remove_file(&path).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(probes.last_tags.iter().all(|t| t.load(Ordering::Relaxed) == b'A'));
    std::fs::write(&path, tagged(b'B')).unwrap();
    probes.wait_for(b'B', SWAP_LIMIT);
    probes.finish();
    let stats = live.gateway.stats();
    assert_eq!(
        (stats.reloads, stats.reload_failures),
        (1, 0),
        "a missing file is not a failure: {stats}"
    );
}

#[test]
fn kubernetes_configmap_symlink_swap() {
    use std::os::unix::fs::symlink;
    // dir/guest.wat -> ..data/guest.wat, ..data -> ..v1: what a ConfigMap volume looks like.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("..v1")).unwrap();
    std::fs::write(d.join("..v1/guest.wat"), tagged(b'A')).unwrap();
    symlink("..v1", d.join("..data")).unwrap();
    symlink("..data/guest.wat", d.join("guest.wat")).unwrap();
    let path = module_path(d);
    let live = serve(&path);
    let probes = Probes::start(live.gateway.local_addr(), 2, b"ABC");
    probes.wait_for(b'A', SWAP_LIMIT);
    // The kubelet's update: a new directory, a new link, renamed over ..data atomically.
    for (version, tag) in [("..v2", b'B'), ("..v3", b'C')] {
        std::fs::create_dir(d.join(version)).unwrap();
        std::fs::write(d.join(version).join("guest.wat"), tagged(tag)).unwrap();
        symlink(version, d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        probes.wait_for(tag, SWAP_LIMIT);
    }
    std::fs::remove_dir_all(d.join("..v1")).unwrap();
    probes.finish();
    let stats = live.gateway.stats();
    assert_eq!((stats.reloads, stats.reload_failures), (2, 0), "{stats}");
}

#[test]
fn a_burst_of_writes_costs_few_compiles_and_the_last_one_wins() {
    let (_dir, path, live, probes) = serving_a(1, b"AabcdefghijklmnopqrstuvwxyZ");
    for tag in b'a'..=b'z' {
        std::fs::write(&path, tagged(tag)).unwrap();
    }
    std::fs::write(&path, tagged(b'Z')).unwrap();
    probes.wait_for(b'Z', SWAP_LIMIT);
    probes.finish();
    let stats = live.gateway.stats();
    assert!(stats.reloads <= 5, "27 quick writes cost {} compiles", stats.reloads);
    // Without the debounce a write caught half-way (truncated, then written) is read
    // and refused.
    assert_eq!(stats.reload_failures, 0, "a file was read mid-write: {stats}");
    let last: [u8; 32] = sha2::Sha256::digest(tagged(b'Z')).into();
    assert_eq!(
        live.gateway.program().sha256(),
        last,
        "the last write is not the one serving"
    );
}

#[test]
fn failed_reloads_leave_the_last_good_module_serving() {
    let (_dir, path, live, probes) = serving_a(2, b"AB");
    let bad: [&[u8]; 6] = [
        b"\x01\x02 not WebAssembly",
        br#"(module (memory (export "memory") 1))"#,
        br#"(module (import "wasi_snapshot_preview1" "proc_exit" (func (param i32)))
            (memory (export "memory") 1)
            (func (export "alloc") (param i32) (result i32) i32.const 0)
            (func (export "handle") (param i32 i32) (result i64) i64.const -1))"#,
        br#"(module (memory (export "memory") 1) (func $s unreachable) (start $s)
            (func (export "alloc") (param i32) (result i32) i32.const 0)
            (func (export "handle") (param i32 i32) (result i64) i64.const -1))"#,
        br#"(module (memory (export "memory") 1) (func $s (loop $l (br $l))) (start $s)
            (func (export "alloc") (param i32) (result i32) i32.const 0)
            (func (export "handle") (param i32 i32) (result i64) i64.const -1))"#,
        br#"(module (memory (export "memory") 65536)
            (func (export "alloc") (param i32) (result i32) i32.const 0)
            (func (export "handle") (param i32 i32) (result i64) i64.const -1))"#,
    ];
    for (i, module) in bad.iter().enumerate() {
        std::fs::write(&path, module).unwrap();
        let deadline = Instant::now() + SWAP_LIMIT;
        while live.gateway.stats().reload_failures < i as u64 + 1 {
            assert!(
                Instant::now() < deadline,
                "bad module {i} was not reported as a failed reload"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(probes.last_tags.iter().all(|t| t.load(Ordering::Relaxed) == b'A'));
    }
    // An over-size file is refused before it is read whole.
    let huge = std::fs::File::create(&path).unwrap();
    huge.set_len(wasmgate::engine::MAX_MODULE_BYTES as u64 + 1).unwrap();
    drop(huge);
    let deadline = Instant::now() + SWAP_LIMIT;
    while live.gateway.stats().reload_failures < bad.len() as u64 + 1 {
        assert!(Instant::now() < deadline, "the over-size module was not refused");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The next good version loads.
    std::fs::write(&path, tagged(b'B')).unwrap();
    probes.wait_for(b'B', SWAP_LIMIT);
    probes.finish();
    let stats = live.gateway.stats();
    assert_eq!(
        (stats.reloads, stats.reload_failures),
        (1, bad.len() as u64 + 1),
        "{stats}"
    );
}

#[test]
fn replaced_modules_are_freed() {
    let dir = tempfile::tempdir().unwrap();
    let path = module_path(dir.path());
    std::fs::write(&path, tagged(b'A')).unwrap();
    let live = serve(&path);
    let c = client();
    assert_eq!(ask(&c, live.gateway.local_addr(), b"x"), b"Ax");
    let old = Arc::downgrade(&live.gateway.program());
    std::fs::write(&path, tagged(b'B')).unwrap();
    let deadline = Instant::now() + SWAP_LIMIT;
    while ask(&c, live.gateway.local_addr(), b"x") != b"Bx" {
        assert!(Instant::now() < deadline, "B never served");
    }
    // Workers let go of the old program at their next datagram or idle poll (100 ms).
    let deadline = Instant::now() + Duration::from_secs(2);
    while old.upgrade().is_some() {
        assert!(Instant::now() < deadline, "the replaced module is still held");
        std::thread::sleep(Duration::from_millis(10));
    }
}
