//! The cluster scope of the shared state: gateway processes (the built binary)
//! sharing `limit` buckets, counters and penalties through a real
//! `redis-server` on loopback, and what happens when Redis stops and comes back. `.ci/run` installs Debian's
//! redis-server; without it these tests say SKIPPED and check nothing (in CI,
//! where `CI` is set, they fail instead).

use crate::common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Served, ask, client, sample, scrape, wait_until, write_file};

/// Replies 1 when `limit("shared", RATE, BURST)` allows the datagram, else 0.
fn limiter(rate: u32, burst: u32) -> String {
    format!(
        r#"(module
  (import "wasmgate" "limit" (func $limit (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 1000) "shared")
  (func (export "alloc") (param i32) (result i32) i32.const 0)
  (func (export "handle") (param $p i32) (param $len i32) (result i64)
    (i32.store8 (i32.const 2000) (call $limit (i32.const 1000) (i32.const 6) (i32.const {rate}) (i32.const {burst})))
    (i64.const 0x000007D000000001)))"#
    )
}

/// By the datagram's first byte: `i` adds 1 to the counter `hits` and `r`
/// reads it (adding 0), both replying its 8 bytes; `p` penalizes `bad` for
/// 60 s, `l` lifts it, `q` replies whether it is penalized (1 byte).
const SHARER: &str = r#"(module
  (import "wasmgate" "state_incr" (func $incr (param i32 i32 i64 i64) (result i64)))
  (import "wasmgate" "penalize" (func $penalize (param i32 i32 i64) (result i32)))
  (import "wasmgate" "penalized" (func $penalized (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 1000) "hits")
  (data (i32.const 1100) "bad")
  (func (export "alloc") (param i32) (result i32) i32.const 0)
  (func (export "handle") (param $p i32) (param $len i32) (result i64)
    (local $op i32)
    (local.set $op (i32.load8_u (i32.const 0)))
    (if (i32.eq (local.get $op) (i32.const 0x69))
      (then (i64.store (i32.const 2000) (call $incr (i32.const 1000) (i32.const 4) (i64.const 1) (i64.const 60000)))
            (return (i64.const 0x000007D000000008))))
    (if (i32.eq (local.get $op) (i32.const 0x72))
      (then (i64.store (i32.const 2000) (call $incr (i32.const 1000) (i32.const 4) (i64.const 0) (i64.const 60000)))
            (return (i64.const 0x000007D000000008))))
    (if (i32.eq (local.get $op) (i32.const 0x70))
      (then (drop (call $penalize (i32.const 1100) (i32.const 3) (i64.const 60000)))))
    (if (i32.eq (local.get $op) (i32.const 0x6C))
      (then (drop (call $penalize (i32.const 1100) (i32.const 3) (i64.const 0)))))
    (i32.store8 (i32.const 2000) (call $penalized (i32.const 1100) (i32.const 3)))
    (i64.const 0x000007D000000001)))"#;

fn count(socket: &std::net::UdpSocket, to: SocketAddr, op: &[u8]) -> i64 {
    // As long as the reply: a larger reply would be dropped as amplification.
    let mut asked = [b' '; 8];
    asked[..op.len()].copy_from_slice(op);
    let reply = ask(socket, to, &asked);
    i64::from_le_bytes(reply.try_into().expect("a counter is 8 bytes"))
}

/// A `redis-server` on a loopback port, killed when dropped.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    /// `None` (and a SKIPPED line) when redis-server is not installed.
    fn start() -> Option<Self> {
        let port = TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        Self::on(port)
    }

    fn on(port: u16) -> Option<Self> {
        Self::with_args(port, &[])
    }

    /// One that asks clients for `password` (AUTH).
    fn with_password(password: &str) -> Option<Self> {
        let port = TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        Self::with_args(port, &["--requirepass", password])
    }

    fn with_args(port: u16, extra: &[&str]) -> Option<Self> {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(child) = child else {
            common::skip("redis-server is not installed (Debian: apt install redis-server)");
            return None;
        };
        let redis = Self { child, port };
        wait_until("redis-server to listen", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Some(redis)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn stop(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn gateway(module: &str, redis: &str, extra: &[&str]) -> Served {
    let mut args = vec![
        "--module",
        module,
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--state-redis",
        redis,
        "--metrics",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    Served::start(&args)
}

fn metric(gw: &Served, name: &str) -> f64 {
    sample(&scrape(gw.metrics_addr()), &format!("{name}{{listener=\"default\"}}"))
}

fn allowed(socket: &std::net::UdpSocket, to: SocketAddr) -> bool {
    ask(socket, to, b"q") == [1]
}

#[test]
fn two_gateways_share_a_limit_through_redis_within_the_documented_error() {
    let Some(redis) = Redis::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (rate, burst) = (20.0, 10.0);
    let module = write_file(dir.path(), "limit.wat", limiter(20, 10).as_bytes());
    let a = gateway(&module, &redis.url(), &[]);
    let b = gateway(&module, &redis.url(), &[]);
    wait_until("both gateways to see each other", || {
        metric(&a, "wasmgate_state_cluster_gateways") == 2.0 && metric(&b, "wasmgate_state_cluster_gateways") == 2.0
    });
    // 2 s of traffic, spread over both gateways and several clients.
    let clients: Vec<_> = (0..4).map(|_| client()).collect();
    let started = Instant::now();
    let mut total = 0usize;
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(2) {
        let to = if i % 2 == 0 { a.addr } else { b.addr };
        total += usize::from(allowed(&clients[i % clients.len()], to));
        i += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    let elapsed = started.elapsed().as_secs_f64();
    // One bucket for both: its burst, then its rate. Alone, each gateway would
    // allow that much itself, twice as many in all.
    let shared = burst + rate * elapsed;
    eprintln!("{total} of {i} allowed in {elapsed:.2} s through two gateways; one shared bucket allows {shared:.1}");
    assert!(i as f64 > 3.0 * shared, "enough traffic to exhaust the bucket: {i}");
    assert!(
        (total as f64 - shared).abs() <= 6.0,
        "{total} allowed in {elapsed:.2} s; one shared bucket allows {shared:.0} (two alone: {:.0})",
        2.0 * shared
    );
    assert!(metric(&a, "wasmgate_state_redis_up") == 1.0);
    assert_eq!(metric(&a, "wasmgate_state_redis_errors_total"), 0.0);
}

#[test]
fn two_gateways_share_counters_and_penalties_through_redis() {
    let Some(redis) = Redis::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let module = write_file(dir.path(), "sharer.wat", SHARER.as_bytes());
    let a = gateway(&module, &redis.url(), &["--state-redis-flush-ms", "5"]);
    let b = gateway(&module, &redis.url(), &["--state-redis-flush-ms", "5"]);
    let c = client();
    for _ in 0..5 {
        count(&c, a.addr, b"i");
    }
    for _ in 0..3 {
        count(&c, b.addr, b"i");
    }
    // Each counts its own at once, and the other's once a flush brings it.
    wait_until("both gateways to count all 8", || {
        count(&c, a.addr, b"r") == 8 && count(&c, b.addr, b"r") == 8
    });
    assert_eq!(count(&c, b.addr, b"i"), 9);

    assert_eq!(ask(&c, b.addr, b"q"), [0]);
    assert_eq!(ask(&c, a.addr, b"p"), [1], "penalized here at once");
    wait_until("the penalty to reach the other gateway", || {
        ask(&c, b.addr, b"q") == [1]
    });
    assert_eq!(ask(&c, b.addr, b"l"), [0], "lifted there");
    wait_until("the lifting to reach the first", || ask(&c, a.addr, b"q") == [0]);

    // A gateway joining later learns the penalties running.
    assert_eq!(ask(&c, a.addr, b"p"), [1]);
    let late = gateway(&module, &redis.url(), &[]);
    wait_until("the late gateway to learn the penalty", || {
        ask(&c, late.addr, b"q") == [1]
    });
    wait_until("the late gateway to learn the count", || {
        count(&c, late.addr, b"r") == 9
    });
}

#[test]
fn a_key_redis_refuses_is_skipped_and_the_rest_is_shared() {
    let Some(redis) = Redis::start() else { return };
    // Something else wrote a string where the counter's total goes.
    let mut r = redis::Client::open(redis.url())
        .and_then(|c| c.get_connection())
        .expect("redis-server answers");
    let () = redis::cmd("SET")
        .arg("wasmgate:default:count:hits")
        .arg("not a number")
        .query(&mut r)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let module = write_file(dir.path(), "sharer.wat", SHARER.as_bytes());
    let a = gateway(&module, &redis.url(), &[]);
    let b = gateway(&module, &redis.url(), &[]);
    let c = client();
    assert_eq!(count(&c, a.addr, b"i"), 1, "counted here all the same");
    assert!(a.line_with(&["Redis refused a key's flush", "key=hits"]).is_some());
    // The rest still goes through: a penalty reaches the other gateway.
    assert_eq!(ask(&c, a.addr, b"p"), [1]);
    wait_until("the penalty to reach the other gateway", || {
        ask(&c, b.addr, b"q") == [1]
    });
    assert_eq!(
        metric(&a, "wasmgate_state_redis_up"),
        1.0,
        "Redis is not taken for down"
    );
    // Each later flush of that key is refused again: counted every time,
    // said no more.
    for _ in 0..3 {
        count(&c, a.addr, b"i");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(metric(&a, "wasmgate_state_redis_errors_total") >= 4.0);
    let again: Vec<String> = a.log.try_iter().filter(|l| l.contains("Redis refused")).collect();
    assert!(again.is_empty(), "said again: {again:#?}");
}

#[test]
fn redis_stopped_and_restarted_mid_traffic_fails_open_or_closed_as_configured() {
    let Some(redis) = Redis::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    // A large quota: the limit itself never denies here.
    let module = write_file(dir.path(), "limit.wat", limiter(0, 100_000).as_bytes());
    let open = gateway(&module, &redis.url(), &[]);
    let closed = gateway(&module, &redis.url(), &["--state-redis-failure", "closed"]);
    let c = client();
    wait_until("both gateways to flush", || {
        metric(&open, "wasmgate_state_cluster_gateways") == 2.0
    });
    assert!(allowed(&c, open.addr) && allowed(&c, closed.addr));
    // Both tokens reach this Redis before it stops (else they would be sent
    // to the next one, and the count below would not be exact).
    let mut first = redis::Client::open(redis.url())
        .and_then(|c| c.get_connection())
        .expect("redis-server answers");
    wait_until("the two tokens to reach Redis", || {
        let spent: Option<i64> = redis::cmd("GET")
            .arg("wasmgate:default:limit:shared")
            .query(&mut first)
            .unwrap_or(None);
        spent == Some(2)
    });
    drop(first);

    let port = redis.stop();
    let down = open.line_with(&["Redis is unreachable", "failing open"]);
    assert!(down.is_some(), "the open gateway says Redis went, once");
    assert!(closed.line_with(&["Redis is unreachable", "failing closed"]).is_some());
    assert_eq!(metric(&open, "wasmgate_state_redis_up"), 0.0);
    for _ in 0..20 {
        assert!(allowed(&c, open.addr), "fail open: the gateway limits alone");
        assert!(!allowed(&c, closed.addr), "fail closed: every limit denies");
    }
    // Retried every second and counted; logged once, not per retry.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(metric(&open, "wasmgate_state_redis_errors_total") >= 2.0);

    let _redis = Redis::on(port).expect("redis-server ran a moment ago");
    // Said once when it went, and once when it came back: not per retry.
    for gw in [&open, &closed] {
        let lines = gw.lines_until(&["Redis is back"]).expect("a line when Redis is back");
        let again = lines.iter().filter(|l| l.contains("Redis is unreachable")).count();
        assert_eq!(again, 0, "said again while down: {lines:#?}");
    }
    wait_until("the closed gateway to allow again", || allowed(&c, closed.addr));
    assert_eq!(metric(&closed, "wasmgate_state_redis_up"), 1.0);
    assert!(allowed(&c, open.addr));
    // What the open gateway spent while Redis was down was kept and sent: 20
    // during, then 1 after, and the closed gateway's 1 after (the new Redis
    // starts empty, so what was flushed before it stopped is not there).
    let mut redis = redis::Client::open(_redis.url())
        .and_then(|c| c.get_connection())
        .expect("redis-server answers");
    let mut spent = || -> Option<i64> {
        redis::cmd("GET")
            .arg("wasmgate:default:limit:shared")
            .query(&mut redis)
            .unwrap_or(None)
    };
    wait_until("the spending to reach Redis", || spent().is_some_and(|n| n >= 22));
    // A backlog sent twice would count 20 more. (Each of the two tokens spent
    // before the stop may count once more here: Redis can die between applying
    // a flush and answering it, and the unanswered flush is sent again. At
    // least once: a limit can only get stricter by it, never looser.)
    std::thread::sleep(Duration::from_millis(300));
    let total = spent().unwrap_or(0);
    assert!((22..=24).contains(&total), "{total} spent, 22 expected");
}

/// Takes a token from the bucket named by the whole datagram (rate 0, burst
/// 1,000), and replies 1 or 0.
const PER_KEY: &str = r#"(module
  (import "wasmgate" "limit" (func $limit (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "alloc") (param i32) (result i32) i32.const 0)
  (func (export "handle") (param $p i32) (param $len i32) (result i64)
    (i32.store8 (i32.const 2000) (call $limit (local.get $p) (local.get $len) (i32.const 0) (i32.const 1000)))
    (i64.const 0x000007D000000001)))"#;

#[test]
fn a_silent_redis_with_many_keys_to_flush_is_noticed_within_a_round_trip() {
    // Before: each reply had its own 500 ms read timeout and the pipeline read
    // on after a failure, so with 100 keys a blackholed Redis took 105 s to be
    // noticed. A "Redis" that accepts connections and never answers:
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://{}", silent.local_addr().unwrap());
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = std::sync::Arc::clone(&held);
    std::thread::spawn(move || {
        for conn in silent.incoming().flatten() {
            keep.lock().unwrap().push(conn);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let module = write_file(dir.path(), "per-key.wat", PER_KEY.as_bytes());
    // Failing open, so that each bucket is kept here and waits to be flushed.
    let gw = gateway(&module, &url, &[]);
    let c = client();
    // Said at the first contact, before serving, or just after.
    assert!(
        gw.preamble.iter().any(|l| l.contains("Redis is unreachable"))
            || gw.line_with(&["Redis is unreachable"]).is_some()
    );
    // 100 buckets to flush on every try from now on.
    for i in 0..100 {
        ask(&c, gw.addr, format!("client-{i}").as_bytes());
    }
    let errors = metric(&gw, "wasmgate_state_redis_errors_total");
    // A try a second (the retry), each ended by one 500 ms deadline.
    std::thread::sleep(Duration::from_secs(5));
    let more = metric(&gw, "wasmgate_state_redis_errors_total") - errors;
    assert!(more >= 2.0, "only {more} failed tries in 5 s: each try waits too long");
    assert_eq!(metric(&gw, "wasmgate_state_redis_up"), 0.0);
    // Fail open: each gateway limits alone meanwhile.
    assert_eq!(ask(&c, gw.addr, b"client-new"), [1]);
    drop(held);
}

#[test]
fn a_password_reaches_redis_as_auth_and_never_the_log() {
    let Some(redis) = Redis::with_password("s3cret-pass") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let module = write_file(dir.path(), "limit.wat", limiter(0, 100_000).as_bytes());
    // A wrong password: Redis refuses, the gateway says so without the password.
    let wrong = format!("redis://:not-it-either@127.0.0.1:{}", redis.port);
    let refused = gateway(&module, &wrong, &[]);
    let early = refused
        .preamble
        .iter()
        .find(|l| l.contains("Redis is unreachable"))
        .cloned();
    let line = early
        .or_else(|| refused.line_with(&["Redis is unreachable"]))
        .expect("a failure line");
    assert!(!line.contains("not-it-either") && line.contains(":***@"), "{line}");
    // The right one: AUTH, and the limit is shared.
    let right = format!("redis://:s3cret-pass@127.0.0.1:{}", redis.port);
    let gw = gateway(&module, &right, &[]);
    wait_until("a flush", || metric(&gw, "wasmgate_state_redis_up") == 1.0);
    assert!(allowed(&client(), gw.addr));
    assert!(
        gw.preamble.iter().all(|l| !l.contains("s3cret-pass")),
        "{:?}",
        gw.preamble
    );
}

#[test]
fn services_on_one_redis_share_only_within_their_namespace() {
    let Some(redis) = Redis::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    // A quota of 5, never refilled.
    let module = write_file(dir.path(), "quota.wat", limiter(0, 5).as_bytes());
    let a = gateway(&module, &redis.url(), &["--state-redis-namespace", "svc-a"]);
    let b = gateway(&module, &redis.url(), &["--state-redis-namespace", "svc-b"]);
    let c = client();
    for _ in 0..5 {
        assert!(allowed(&c, a.addr));
    }
    assert!(!allowed(&c, a.addr), "A's quota is spent");
    let mut conn = redis::Client::open(redis.url())
        .and_then(|c| c.get_connection())
        .expect("redis-server answers");
    let spent = |conn: &mut redis::Connection, key: &str| -> Option<i64> {
        redis::cmd("GET").arg(key).query(conn).unwrap_or(None)
    };
    wait_until("A's spending to reach Redis", || {
        spent(&mut conn, "wasmgate:svc-a:limit:shared") == Some(5)
    });
    // B's bucket of the same name is its own, flush after flush.
    for _ in 0..5 {
        assert!(allowed(&c, b.addr), "B shares A's bucket");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(spent(&mut conn, "wasmgate:default:limit:shared"), None);
    // Only a flag-started gateway left on the shared default name is warned.
    assert!(!a.preamble.iter().any(|l| l.contains("give --state-redis-namespace")));
    let plain = gateway(&module, &redis.url(), &[]);
    assert!(
        plain
            .preamble
            .iter()
            .any(|l| l.contains("give --state-redis-namespace")),
        "{:?}",
        plain.preamble
    );
    let (code, _, err) = common::run_to_end(&["--state-redis", &redis.url(), "--state-redis-namespace", "a:b"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not a namespace"), "{err}");
}

#[test]
fn a_gateway_joining_late_takes_only_its_share_of_a_quota_the_first_spent() {
    // Before: a gateway knew of the others only after its first flush, so one
    // that started after the first had spent a quota of 40 took itself for
    // alone and gave the whole burst again (totals of 63 to 79, over the
    // documented bound of 60).
    let Some(redis) = Redis::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let module = write_file(dir.path(), "quota.wat", limiter(0, 40).as_bytes());
    let a = gateway(&module, &redis.url(), &[]);
    let c = client();
    let first: usize = (0..50).filter(|_| allowed(&c, a.addr)).count();
    assert_eq!(first, 40, "alone, the first gateway has the whole quota");
    let b = gateway(&module, &redis.url(), &[]);
    let mut late = 0;
    for _ in 0..50 {
        late += usize::from(allowed(&c, b.addr));
        std::thread::sleep(Duration::from_millis(2));
    }
    // Its share (40 / 2) at most before its first flush, then the quota is
    // known spent: the documented bound, burst × (1 + (N − 1)/N) = 60.
    assert!(late <= 20, "the late gateway allowed {late}");
    assert!(first + late <= 60);
}

#[test]
fn a_gateway_that_stops_no_longer_counts_once_its_heartbeat_expires() {
    let Some(redis) = Redis::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let module = write_file(dir.path(), "limit.wat", limiter(20, 10).as_bytes());
    let a = gateway(&module, &redis.url(), &[]);
    let b = gateway(&module, &redis.url(), &[]);
    wait_until("both to count each other", || {
        metric(&a, "wasmgate_state_cluster_gateways") == 2.0
    });
    drop(b);
    // Silent for the 3 s heartbeat: not counted (and a new bucket's share is
    // the whole burst again).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while metric(&a, "wasmgate_state_cluster_gateways") != 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "still counted 10 s after it stopped"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_stopped_redis_is_noticed_like_a_silent_one_and_resumes_when_continued() {
    let Some(redis) = Redis::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let module = write_file(dir.path(), "limit.wat", limiter(0, 100_000).as_bytes());
    let gw = gateway(&module, &redis.url(), &["--state-redis-failure", "closed"]);
    let c = client();
    wait_until("a flush", || metric(&gw, "wasmgate_state_redis_up") == 1.0);
    assert!(allowed(&c, gw.addr));
    // SIGSTOP: the connection stays open and nothing answers.
    // SAFETY: plain system calls on the child's pid.
    unsafe { libc::kill(redis.child.id() as i32, libc::SIGSTOP) };
    let down = gw.line_with(&["Redis is unreachable", "failing closed"]);
    unsafe { libc::kill(redis.child.id() as i32, libc::SIGCONT) };
    assert!(down.is_some(), "a stopped Redis was not noticed");
    assert!(gw.line_with(&["Redis is back"]).is_some());
    wait_until("limits to be allowed again", || allowed(&c, gw.addr));
}

#[test]
fn a_bad_redis_url_is_refused_with_the_reason() {
    let (code, _, err) = common::run_to_end(&["--state-redis", "http://127.0.0.1:6379"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("--state-redis") && err.contains("not a Redis URL"),
        "{err}"
    );
    let (code, _, err) = common::run_to_end(&["--state-redis-failure", "closed"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--state-redis"), "{err}");
}

/// A "Redis" that answers every connection with what no flush asks for, in
/// turn: a 600 MB bulk string (sent in full while the peer reads), an array
/// claiming two billion elements, and a reply trickled a byte every 50 ms.
fn hostile_redis() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read as _, Write as _};
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let count = std::sync::Arc::clone(&accepted);
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let turn = count.fetch_add(1, Relaxed);
            std::thread::spawn(move || {
                let mut conn = conn;
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut request = [0u8; 4096];
                if conn.read(&mut request).unwrap_or(0) == 0 {
                    return;
                }
                let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
                let started = Instant::now();
                match turn % 3 {
                    0 => {
                        let _ = conn.write_all(b"$600000000\r\n");
                        let zeros = vec![0u8; 1 << 16];
                        // Bounded: 600 MB or 20 s, whichever comes first.
                        for _ in 0..(600_000_000 / zeros.len()) {
                            if started.elapsed() > Duration::from_secs(20) || conn.write_all(&zeros).is_err() {
                                break;
                            }
                        }
                    }
                    1 => {
                        let _ = conn.write_all(b"*2000000000\r\n");
                        for _ in 0..100_000 {
                            if started.elapsed() > Duration::from_secs(20) || conn.write_all(b":1\r\n").is_err() {
                                break;
                            }
                        }
                    }
                    _ => {
                        let _ = conn.write_all(b"$100000\r\n");
                        for _ in 0..400 {
                            std::thread::sleep(Duration::from_millis(50));
                            if conn.write_all(b"x").is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, accepted)
}

#[test]
fn a_hostile_redis_cannot_grow_memory_or_hold_the_link_up() {
    // Before: the crate's connection read what a reply claimed (a 600 MB bulk
    // string took RSS to 1.1 GiB) and a trickled reply kept `redis_up` at 1.
    let (addr, accepted) = hostile_redis();
    let dir = tempfile::tempdir().unwrap();
    let module = write_file(dir.path(), "limit.wat", limiter(0, 100_000).as_bytes());
    let mut gw = gateway(&module, &format!("redis://{addr}"), &[]);
    let c = client();
    let before = common::rss_kib(gw.child.id());
    let mut peak = before;
    // Each of the three replies, twice (a try a second).
    let deadline = Instant::now() + Duration::from_secs(30);
    while accepted.load(std::sync::atomic::Ordering::Relaxed) < 7 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        peak = peak.max(common::rss_kib(gw.child.id()));
        assert_eq!(
            metric(&gw, "wasmgate_state_redis_up"),
            0.0,
            "a hostile reply counted as Redis up"
        );
    }
    assert!(
        accepted.load(std::sync::atomic::Ordering::Relaxed) >= 7,
        "the gateway stopped trying"
    );
    assert!(metric(&gw, "wasmgate_state_redis_errors_total") >= 6.0);
    // The cap is 8 MiB a round trip; the parser's buffer may double it.
    eprintln!("RSS {before} KiB at start, {peak} KiB at most under hostile replies");
    assert!(
        peak < before + 40 * 1024,
        "RSS grew from {before} KiB to {peak} KiB on hostile replies"
    );
    // Failing open, and serving all along.
    assert!(allowed(&c, gw.addr));
    assert!(gw.child.try_wait().unwrap().is_none(), "the gateway died");
}

/// A CA and a certificate for 127.0.0.1 it signed, made with `openssl` in
/// `dir`: (ca.pem, server.pem, server.key). `None` without openssl.
fn certificates(dir: &std::path::Path) -> Option<[String; 3]> {
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let [ca_key, ca, key, csr, cert, ext] =
        ["ca.key", "ca.pem", "server.key", "server.csr", "server.pem", "ext.cnf"].map(path);
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n").unwrap();
    let steps: [&[&str]; 3] = [
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=wasmgate test CA",
            "-keyout",
            &ca_key,
            "-out",
            &ca,
        ],
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            &key,
            "-out",
            &csr,
        ],
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &cert,
        ],
    ];
    for step in steps {
        let Ok(out) = Command::new("openssl").args(step).output() else {
            common::skip("openssl is not installed (Debian: apt install openssl)");
            return None;
        };
        assert!(
            out.status.success(),
            "openssl {step:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Some([ca, cert, key])
}

#[test]
fn rediss_shares_limits_over_tls_and_refuses_a_server_it_cannot_trust() {
    let dir = tempfile::tempdir().unwrap();
    let Some([ca, cert, key]) = certificates(dir.path()) else {
        return;
    };
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let port_text = port.to_string();
    let tls = [
        "--port",
        "0",
        "--tls-port",
        &port_text,
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        "no",
        "--requirepass",
        "tls-pass",
    ];
    // `with_args` gives a plain port first; the later `--port 0` turns it off.
    let Some(_redis) = Redis::with_args(port, &tls) else {
        return;
    };
    let module = write_file(dir.path(), "limit.wat", limiter(0, 100_000).as_bytes());
    let url = format!("rediss://:tls-pass@127.0.0.1:{port}");

    // Trusting the CA that signed it: shared, through TLS and AUTH.
    let gw = gateway(&module, &url, &["--state-redis-ca", &ca]);
    wait_until("a flush over TLS", || metric(&gw, "wasmgate_state_redis_up") == 1.0);
    assert!(allowed(&client(), gw.addr));
    let mut redis_cli = Command::new("redis-cli");
    redis_cli.args([
        "--tls",
        "--cacert",
        &ca,
        "-p",
        &port_text,
        "-a",
        "tls-pass",
        "--no-auth-warning",
        "KEYS",
        "wasmgate:*",
    ]);
    if let Ok(out) = redis_cli.output() {
        let keys = String::from_utf8_lossy(&out.stdout);
        assert!(keys.contains("wasmgate:default:limit:shared"), "{keys}");
    }

    // Trusting another CA (the system's roots, which never signed it): refused, said why.
    let untrusted = gateway(&module, &url, &[]);
    let line = untrusted
        .preamble
        .iter()
        .find(|l| l.contains("Redis is unreachable"))
        .cloned()
        .or_else(|| untrusted.line_with(&["Redis is unreachable"]))
        .expect("a failure line");
    assert!(line.to_lowercase().contains("certificate"), "{line}");
    assert_eq!(metric(&untrusted, "wasmgate_state_redis_up"), 0.0);

    // A plain client on the TLS port gets nothing it can take for Redis.
    let plain = gateway(&module, &format!("redis://:tls-pass@127.0.0.1:{port}"), &[]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(metric(&plain, "wasmgate_state_redis_up"), 0.0);
}

#[test]
fn a_ca_file_needs_a_tls_url_and_must_hold_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let empty = write_file(dir.path(), "empty.pem", b"");
    let (code, _, err) = common::run_to_end(&["--state-redis", "redis://127.0.0.1:6379", "--state-redis-ca", &empty]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("rediss://"), "{err}");
    let module = write_file(dir.path(), "limit.wat", limiter(0, 1).as_bytes());
    let (code, _, err) = common::run_to_end(&[
        "--module",
        &module,
        "--listen",
        "127.0.0.1:0",
        "--state-redis",
        "rediss://127.0.0.1:6379",
        "--state-redis-ca",
        &empty,
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("empty.pem") && err.contains("no certificate"), "{err}");
}
