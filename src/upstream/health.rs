//! Active health checks, decided without a socket: every endpoint of a pool
//! with a `health` table has a schedule of its own (jittered) and a streak of
//! probes passed or failed. What the probes find takes the endpoint out of, or
//! puts it back into, every worker's choices at once (its shared health),
//! never the pool's last healthy endpoint. [`Checks`] says which probes are
//! due and takes what became of them; `net::prober` sends them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::pools::{Configured, EndpointCounters, Pools};
use crate::config::HealthSpec;
use crate::net::proxy_v2;

/// Why a probe failed; each is counted per endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No answer within the timeout.
    Timeout,
    /// An answer that is not what was expected.
    Mismatch,
    /// ICMP port unreachable, or the probe could not be sent.
    Refused,
}

impl Failure {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "no answer within the timeout",
            Self::Mismatch => "an answer other than expected",
            Self::Refused => "refused (ICMP port unreachable) or not sent",
        }
    }
}

/// A guest that writes probes (its `probe` and `probe_reply` exports), for
/// the pools whose `health` table says `probe = "guest"`.
pub trait ProbeWriter {
    /// Whether the module serving now writes probes; while it does not,
    /// `send` and `expect` serve.
    fn writes_probes(&mut self) -> bool;

    /// The probe datagram for `endpoint` (`POOL/ip:port`); `None` when the
    /// guest wrote none (it returned -1, trapped or ran out of time): the probe
    /// fails, never passes.
    fn probe(&mut self, endpoint: &str) -> Option<Vec<u8>>;

    /// Whether the guest judges `answer` from `endpoint` healthy (a trap or a
    /// timeout is a no).
    fn healthy(&mut self, endpoint: &str, answer: &[u8]) -> bool;
}

/// No guest writes probes: `send` and `expect` always serve.
pub struct NoWriter;

impl ProbeWriter for NoWriter {
    fn writes_probes(&mut self) -> bool {
        false
    }

    fn probe(&mut self, _: &str) -> Option<Vec<u8>> {
        None
    }

    fn healthy(&mut self, _: &str, _: &[u8]) -> bool {
        false
    }
}

/// One endpoint's checks.
#[derive(Debug)]
struct Check {
    /// Stays the same while the endpoint is checked: the prober's handle.
    id: u64,
    pool: String,
    addr: SocketAddr,
    spec: HealthSpec,
    /// Probes go with a `LOCAL` header when the pool speaks the PROXY protocol.
    proxy_protocol: bool,
    /// When the next probe is due.
    next: Instant,
    /// A probe is out, failed if not answered by then.
    waiting: Option<Instant>,
    passed: u32,
    failed: u32,
    /// Failed enough to go, but kept as the pool's last healthy endpoint.
    spared: bool,
}

impl Check {
    /// The endpoint as a guest's probe calls see it: `POOL/ip:port`.
    fn endpoint(&self) -> String {
        format!("{}/{}", self.pool, self.addr)
    }
}

/// Every endpoint's checks, of one listener.
#[derive(Debug)]
pub struct Checks {
    checks: Vec<Check>,
    next_id: u64,
    /// xorshift state for the jitter: spreading probes, not secrets.
    rng: u64,
}

impl Default for Checks {
    fn default() -> Self {
        Self::new()
    }
}

impl Checks {
    pub fn new() -> Self {
        let seed = std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 0u8);
        Self {
            checks: Vec::new(),
            next_id: 0,
            rng: seed | 1,
        }
    }

    /// Checks the endpoints of `pools` that have a `health` table: an endpoint
    /// already checked keeps its streak; one gone (or whose settings changed)
    /// is dropped. A new one gets its first probe within one interval, at a
    /// random point, so that probes spread out.
    pub fn sync(&mut self, pools: &Pools, now: Instant) {
        self.checks.retain(|check| {
            pools.pools.iter().any(|c| {
                c.spec.name == check.pool
                    && c.spec.health.as_ref() == Some(&check.spec)
                    && c.spec.proxy_protocol == check.proxy_protocol
                    && c.pool.position(check.addr).is_some()
            })
        });
        for c in &pools.pools {
            let Some(spec) = &c.spec.health else { continue };
            for e in c.pool.endpoints() {
                if self.checks.iter().any(|k| k.pool == c.spec.name && k.addr == e.addr) {
                    continue;
                }
                let first = self.jitter(spec.interval, 1.0);
                self.checks.push(Check {
                    id: self.next_id,
                    pool: c.spec.name.clone(),
                    addr: e.addr,
                    spec: spec.clone(),
                    proxy_protocol: c.spec.proxy_protocol,
                    next: now + first,
                    waiting: None,
                    passed: 0,
                    failed: 0,
                    spared: false,
                });
                self.next_id += 1;
            }
        }
    }

    /// A random time up to `share` × `interval`.
    fn jitter(&mut self, interval: Duration, share: f64) -> Duration {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        interval.mul_f64(share * (self.rng % 1_000_000) as f64 / 1_000_000.0)
    }

    /// The probes to send now, each as (check id, endpoint, datagram): those
    /// due, and those a passive signal (a refusal on a session) asked for.
    /// Each is counted as sent and waited for from now. A probe the guest
    /// failed to write fails at once.
    pub fn due(
        &mut self,
        pools: &Pools,
        now: Instant,
        writer: &mut dyn ProbeWriter,
    ) -> Vec<(u64, SocketAddr, Vec<u8>)> {
        let mut out = Vec::new();
        let mut unwritten = Vec::new();
        for check in &mut self.checks {
            if check.waiting.is_some() {
                continue;
            }
            let asked = find(pools, &check.pool, check.addr).is_some_and(|(c, i)| c.pool.take_probe_request(i));
            if now < check.next && !asked {
                continue;
            }
            check.waiting = Some(now + check.spec.timeout);
            let written = if check.spec.guest && writer.writes_probes() {
                writer.probe(&check.endpoint())
            } else {
                Some(check.spec.send.clone())
            };
            let Some(probe) = written else {
                unwritten.push(check.id);
                continue;
            };
            let mut datagram = Vec::with_capacity(probe.len() + 16);
            if check.proxy_protocol {
                proxy_v2::write_local(&mut datagram);
            }
            datagram.extend_from_slice(&probe);
            if let Some(counters) = counters(pools, &check.pool, check.addr) {
                counters.probes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            out.push((check.id, check.addr, datagram));
        }
        for id in unwritten {
            self.failed(pools, id, Failure::Mismatch, now);
        }
        out
    }

    /// Check `id`'s endpoint answered `answer`: passed when it starts with what
    /// is expected (after a PROXY header, for a pool that speaks it). An answer
    /// when no probe is out is late, and ignored.
    pub fn answered(&mut self, pools: &Pools, id: u64, answer: &[u8], now: Instant, writer: &mut dyn ProbeWriter) {
        let Some(check) = self.checks.iter().find(|k| k.id == id && k.waiting.is_some()) else {
            return;
        };
        let mut payload = answer;
        if check.proxy_protocol && answer.starts_with(&proxy_v2::SIGNATURE) {
            payload = match proxy_v2::parse(answer) {
                Ok(proxy_v2::Parsed::Proxied { payload, .. } | proxy_v2::Parsed::Local { payload }) => payload,
                Err(_) => return self.failed(pools, id, Failure::Mismatch, now),
            };
        }
        let healthy = if check.spec.guest && writer.writes_probes() {
            writer.healthy(&check.endpoint(), payload)
        } else {
            payload.starts_with(&check.spec.expect)
        };
        if healthy {
            self.passed(pools, id, now);
        } else {
            self.failed(pools, id, Failure::Mismatch, now);
        }
    }

    /// Fails every probe out past its timeout.
    pub fn timed_out(&mut self, pools: &Pools, now: Instant) {
        let late: Vec<u64> = self
            .checks
            .iter()
            .filter(|k| k.waiting.is_some_and(|deadline| now >= deadline))
            .map(|k| k.id)
            .collect();
        for id in late {
            self.failed(pools, id, Failure::Timeout, now);
        }
    }

    /// Check `id`'s probe is over, `passed` or not: its streak moves on and
    /// its next probe is scheduled.
    fn settle(&mut self, id: u64, passed: bool, now: Instant) -> Option<&mut Check> {
        let delay = self.next_delay(id);
        let check = self.checks.iter_mut().find(|k| k.id == id)?;
        check.waiting = None;
        check.next = now + delay;
        if passed {
            (check.passed, check.failed, check.spared) = (check.passed.saturating_add(1), 0, false);
        } else {
            (check.passed, check.failed) = (0, check.failed.saturating_add(1));
        }
        Some(check)
    }

    fn passed(&mut self, pools: &Pools, id: u64, now: Instant) {
        let Some(check) = self.settle(id, true, now) else {
            return;
        };
        let Some((c, i)) = find(pools, &check.pool, check.addr) else {
            return;
        };
        if c.pool.probe_down(i) && check.passed >= check.spec.healthy_after {
            c.pool.set_probe_down(i, false, now);
            tracing::info!(
                pool = check.pool,
                endpoint = %check.addr,
                passed = check.passed,
                slow_start = ?check.spec.slow_start,
                "endpoint healthy again: it passed its health checks (its share of new clients grows over slow_start)"
            );
        }
    }

    /// Check `id`'s probe failed for `why`.
    pub fn failed(&mut self, pools: &Pools, id: u64, why: Failure, now: Instant) {
        let Some(check) = self.settle(id, false, now) else {
            return;
        };
        let Some((c, i)) = find(pools, &check.pool, check.addr) else {
            return;
        };
        let counters = &c.counters[i][0];
        let counter = match why {
            Failure::Timeout => &counters.probes_timeout,
            Failure::Mismatch => &counters.probes_mismatch,
            Failure::Refused => &counters.probes_refused,
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if c.pool.probe_down(i) || check.failed < check.spec.unhealthy_after {
            return;
        }
        if c.pool.others_healthy(i, now) {
            c.pool.set_probe_down(i, true, now);
            counters
                .probe_ejections
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(
                pool = check.pool,
                endpoint = %check.addr,
                failed = check.failed,
                last = why.as_str(),
                "endpoint unhealthy: it failed its health checks; its clients move to the healthy endpoints"
            );
        } else if !check.spared {
            check.spared = true;
            counters.probe_spared.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(
                pool = check.pool,
                endpoint = %check.addr,
                failed = check.failed,
                last = why.as_str(),
                "endpoint fails its health checks but is the pool's last healthy one: kept in use (panic mode)"
            );
        }
    }

    /// The interval of check `id`, give or take a tenth at random.
    fn next_delay(&mut self, id: u64) -> Duration {
        let Some(interval) = self.checks.iter().find(|k| k.id == id).map(|k| k.spec.interval) else {
            return Duration::ZERO;
        };
        interval.mul_f64(0.9) + self.jitter(interval, 0.2)
    }

    /// When something is next due: a probe to send or one to give up on.
    pub fn next_wake(&self) -> Option<Instant> {
        self.checks.iter().map(|k| k.waiting.unwrap_or(k.next)).min()
    }

    /// The ids of the checks kept now (the prober closes the sockets of others).
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.checks.iter().map(|k| k.id)
    }

    pub fn is_empty(&self) -> bool {
        self.checks.is_empty()
    }
}

/// Pool `name` and the position of its endpoint `addr`.
fn find<'a>(pools: &'a Pools, name: &str, addr: SocketAddr) -> Option<(&'a Configured, usize)> {
    let c = pools.pools.iter().find(|c| c.spec.name == name)?;
    Some((c, c.pool.position(addr)?))
}

/// The counters the prober counts endpoint `addr`'s probes in: the first
/// worker's (they are summed over workers).
fn counters<'a>(pools: &'a Pools, name: &str, addr: SocketAddr) -> Option<&'a EndpointCounters> {
    let (c, i) = find(pools, name, addr)?;
    c.counters.get(i)?.first().map(|a| &**a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PoolSpec;

    fn pools(health: HealthSpec, endpoints: &[&str]) -> Pools {
        let mut spec = PoolSpec::new("p", endpoints.iter().map(|e| e.to_string()).collect());
        spec.health = Some(health);
        Pools::new(&[spec], 2).unwrap()
    }

    fn spec() -> HealthSpec {
        HealthSpec {
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(200),
            healthy_after: 2,
            unhealthy_after: 3,
            send: b"ping".to_vec(),
            expect: b"pong".to_vec(),
            guest: false,
            slow_start: Duration::ZERO,
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn healthy(pools: &Pools, a: &str, now: Instant) -> bool {
        let (c, i) = find(pools, "p", addr(a)).unwrap();
        c.pool.is_healthy(i, now)
    }

    /// Runs the checks from `t0` for `secs` seconds in 10 ms steps; `answer`
    /// says what each endpoint answers at a time (None: silence).
    fn run(
        checks: &mut Checks,
        pools: &Pools,
        t0: Instant,
        secs: f64,
        answer: &dyn Fn(SocketAddr, Instant) -> Option<&'static [u8]>,
    ) -> Instant {
        let mut now = t0;
        let end = t0 + Duration::from_secs_f64(secs);
        while now < end {
            for (id, to, datagram) in checks.due(pools, now, &mut NoWriter) {
                assert_eq!(datagram, b"ping");
                if let Some(a) = answer(to, now) {
                    checks.answered(pools, id, a, now + Duration::from_millis(5), &mut NoWriter);
                }
            }
            checks.timed_out(pools, now);
            now += Duration::from_millis(10);
        }
        now
    }

    #[test]
    fn a_silent_endpoint_goes_within_its_bound_and_comes_back_within_the_symmetric_one() {
        let t0 = Instant::now();
        let p = pools(spec(), &["127.0.0.1:7001", "127.0.0.1:7002"]);
        let mut checks = Checks::new();
        checks.sync(&p, t0);
        let silent_until = t0 + Duration::from_secs(10);
        let answer = |to: SocketAddr, now: Instant| -> Option<&'static [u8]> {
            (to != addr("127.0.0.1:7002") || now >= silent_until).then_some(b"pong".as_slice())
        };
        // Ejected within interval × unhealthy_after + timeout (+ the first
        // probe's offset, at most one interval, and the jitter).
        let mut now = t0;
        let mut out_at = None;
        while now < t0 + Duration::from_secs(9) {
            now = run(&mut checks, &p, now, 0.01, &answer);
            if out_at.is_none() && !healthy(&p, "127.0.0.1:7002", now) {
                out_at = Some(now - t0);
            }
        }
        let out_at = out_at.expect("the silent endpoint went");
        assert!(
            out_at <= Duration::from_millis(1000 + 3 * 1100 + 200 + 20),
            "{out_at:?}"
        );
        assert!(healthy(&p, "127.0.0.1:7001", now), "the answering one stays");
        // Back within timeout + interval × healthy_after (+ jitter) of
        // answering again: a probe sent just before it answers again times
        // out first, and the next is scheduled from then.
        let mut back_at = None;
        while now < t0 + Duration::from_secs(14) {
            now = run(&mut checks, &p, now, 0.01, &answer);
            if back_at.is_none() && healthy(&p, "127.0.0.1:7002", now) {
                back_at = Some(now - silent_until);
            }
        }
        let back_at = back_at.expect("it came back");
        assert!(back_at <= Duration::from_millis(200 + 2 * 1100 + 20), "{back_at:?}");
        let (c, i) = find(&p, "p", addr("127.0.0.1:7002")).unwrap();
        let counters = &c.counters[i][0];
        assert_eq!(counters.probe_ejections.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert!(counters.probes_timeout.load(std::sync::atomic::Ordering::Relaxed) >= 3);
    }

    #[test]
    fn a_wrong_answer_fails_and_the_last_healthy_endpoint_is_kept_in_panic_mode() {
        let t0 = Instant::now();
        let p = pools(spec(), &["127.0.0.1:7001", "127.0.0.1:7002"]);
        let mut checks = Checks::new();
        checks.sync(&p, t0);
        let now = run(&mut checks, &p, t0, 8.0, &|_, _| Some(b"nope".as_slice()));
        let up: Vec<bool> = ["127.0.0.1:7001", "127.0.0.1:7002"]
            .iter()
            .map(|a| healthy(&p, a, now))
            .collect();
        assert_eq!(up.iter().filter(|u| **u).count(), 1, "one is kept: {up:?}");
        let spared: u64 = p.pools[0]
            .counters
            .iter()
            .map(|w| w[0].probe_spared.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        let mismatched: u64 = p.pools[0]
            .counters
            .iter()
            .map(|w| w[0].probes_mismatch.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        assert_eq!(spared, 1, "panic mode counted once");
        assert!(mismatched >= 6);
    }

    #[test]
    fn a_refusal_asks_for_a_probe_at_once_and_ejects_nothing_by_itself() {
        let t0 = Instant::now();
        let p = pools(spec(), &["127.0.0.1:7001", "127.0.0.1:7002"]);
        let mut checks = Checks::new();
        checks.sync(&p, t0);
        let (c, i) = find(&p, "p", addr("127.0.0.1:7001")).unwrap();
        for _ in 0..100 {
            c.pool.refused(i, 3, t0, t0 + Duration::from_secs(10));
        }
        assert!(c.pool.is_healthy(i, t0), "forged refusals eject nothing");
        let due = checks.due(&p, t0, &mut NoWriter);
        assert_eq!(due.len(), 1, "one probe now, before its schedule");
        assert_eq!(due[0].1, addr("127.0.0.1:7001"));
        checks.answered(&p, due[0].0, b"pong", t0, &mut NoWriter);
        assert!(c.pool.is_healthy(i, t0));
    }

    #[test]
    fn a_session_that_went_idle_unanswered_asks_for_a_probe_too() {
        let t0 = Instant::now();
        let p = pools(spec(), &["127.0.0.1:7001", "127.0.0.1:7002"]);
        let mut checks = Checks::new();
        checks.sync(&p, t0);
        let mut pool = p.pools[0].pool.clone();
        let i = pool.position(addr("127.0.0.1:7002")).unwrap();
        pool.session_opened(i);
        pool.session_closed(i, false);
        assert!(
            checks.due(&p, t0, &mut NoWriter).is_empty(),
            "an answered session asks nothing"
        );
        pool.session_opened(i);
        pool.session_closed(i, true);
        let due = checks.due(&p, t0, &mut NoWriter);
        assert_eq!(due.iter().map(|d| d.1).collect::<Vec<_>>(), [addr("127.0.0.1:7002")]);
    }

    #[test]
    fn a_late_answer_counts_for_nothing_and_a_reload_keeps_the_streak_of_kept_endpoints() {
        let t0 = Instant::now();
        let p = pools(spec(), &["127.0.0.1:7001", "127.0.0.1:7002"]);
        let mut checks = Checks::new();
        checks.sync(&p, t0);
        let due = checks.due(&p, t0 + Duration::from_secs(2), &mut NoWriter);
        assert_eq!(due.len(), 2);
        checks.timed_out(&p, t0 + Duration::from_secs(3));
        checks.answered(&p, due[0].0, b"pong", t0 + Duration::from_secs(3), &mut NoWriter);
        assert!(checks.checks.iter().all(|k| k.passed == 0 && k.failed == 1));
        // A reload that drops one endpoint keeps the other's check as it was.
        let mut spec1 = PoolSpec::new("p", vec!["127.0.0.1:7001".into()]);
        spec1.health = Some(spec());
        let reloaded = p.rebuilt(&[spec1]).unwrap();
        checks.sync(&reloaded, t0 + Duration::from_secs(3));
        assert_eq!(checks.checks.len(), 1);
        assert_eq!(
            (checks.checks[0].addr, checks.checks[0].failed),
            (addr("127.0.0.1:7001"), 1)
        );
    }
}
