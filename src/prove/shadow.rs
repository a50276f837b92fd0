//! A candidate module beside the active one (`--candidate`). Shadowed: the
//! workers hand sampled datagrams, with what the active module did about them,
//! over a bounded queue to a thread of the listener's own, where the candidate
//! runs them in an [`Offline`] core (side effects stubbed) and the verdicts are
//! compared; a full queue skips the sample, so a slow candidate never holds a
//! worker. Canaried: a share of clients, by a hash of their address, is served
//! by the candidate for real. Either way its record decides, by rule, whether
//! it is promoted to active or unloaded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use super::candidate::{Candidate, Job, Rules, ShadowResult};
use super::offline::{Offline, Outcome};
use crate::gateway::shared::{POLL_INTERVAL, Shared};
use crate::guest::Program;
use crate::verdict::DropReason;

/// How far below the workers the shadow thread runs: the candidate's work is
/// a proof, never worth a client's datagram (with the time budget in CPU time,
/// a starved shadow does not time its candidate out for it).
pub const SHADOW_NICE: i32 = 5;

/// The shadow thread: runs every sample through the candidate loaded now (and
/// every canaried datagram through the active module) and counts what it
/// shows, until the workers are gone.
pub(crate) fn run(shared: &Arc<Shared>, rx: &Receiver<Job>) {
    // SAFETY: a plain system call; on Linux it changes this thread only.
    if unsafe { libc::nice(SHADOW_NICE) } == -1 {
        tracing::debug!(
            "the shadow thread runs at the workers' priority: {}",
            std::io::Error::last_os_error()
        );
    }
    let epoch = Instant::now();
    let mut current: Option<(Arc<Candidate>, Offline)> = None;
    // The active module, stubbed, for canaried datagrams: made on the first,
    // and again when a reload or promotion changed the active.
    let mut active: Option<(Arc<Program>, Offline)> = None;
    loop {
        let job = match rx.recv_timeout(POLL_INTERVAL) {
            Ok(job) => {
                shared.shadow.release(job.bytes());
                job
            }
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let Some(candidate) = shared.candidate.load_full() else {
            current = None;
            continue;
        };
        if !current.as_ref().is_some_and(|(c, _)| Arc::ptr_eq(c, &candidate)) {
            current = None;
            match Offline::beside(shared, &candidate) {
                Ok(offline) => current = Some((Arc::clone(&candidate), offline)),
                Err(e) => {
                    tracing::error!(
                        candidate = candidate.program.origin(),
                        "cannot shadow the candidate: {e:#}"
                    );
                    continue;
                }
            }
        }
        let Some((candidate, offline)) = current.as_mut() else {
            continue;
        };
        let client_ip = match &job {
            Job::Client { client, .. } | Job::Upstream { client, .. } => client.ip(),
        };
        // Whether the candidate's datagram was counted in its failure window
        // already (a canaried one, counted by the worker that served it).
        let mut counted = false;
        let result = match job {
            Job::Client {
                at,
                client,
                datagram,
                verdict,
                replies,
                forwards,
                canaried: false,
            } => {
                let outcome = offline.client(since(epoch, at), &datagram, client);
                let result = compare(verdict, &replies, &forwards, &outcome);
                if result == ShadowResult::Mismatch {
                    keep_mismatch(shared, client, &datagram, verdict, &replies);
                }
                result
            }
            Job::Client {
                at,
                client,
                datagram,
                verdict,
                replies,
                forwards,
                canaried: true,
            } => {
                counted = true;
                let program = shared.program.load_full();
                if !active.as_ref().is_some_and(|(p, _)| Arc::ptr_eq(p, &program)) {
                    active = Some((Arc::clone(&program), Offline::active_beside(shared, candidate, program)));
                }
                let Some((_, active)) = active.as_mut() else { continue };
                let outcome = active.client(since(epoch, at), &datagram, client);
                // Roles swapped: the replies given are the candidate's, the
                // outcome the active's. Any difference is a mismatch, whichever
                // side failed.
                match compare(verdict, &replies, &forwards, &outcome) {
                    ShadowResult::Match => ShadowResult::Match,
                    _ => {
                        keep_mismatch(shared, client, &datagram, outcome.verdict(), &outcome.replies);
                        ShadowResult::Mismatch
                    }
                }
            }
            Job::Upstream {
                at,
                client,
                datagram,
                replies,
            } => {
                // None: the candidate did not forward for this client.
                let Some(outcome) = offline.answer(since(epoch, at), client, &datagram) else {
                    continue;
                };
                compare_answer(&replies, &outcome)
            }
        };
        shared.shadow.count(result);
        let failed = matches!(result, ShadowResult::CandidateTrap | ShadowResult::CandidateTimeout);
        let (clean, rules) = (result == ShadowResult::Match, Rules::of(&shared.spec));
        let action = if counted {
            candidate.judge(failed, clean, client_ip, &rules)
        } else {
            candidate.candidate_ran(failed, clean, client_ip, &rules)
        };
        if let Some(action) = action {
            shared.settle(candidate, action);
        }
    }
}

/// Keeps a client datagram the two modules answered differently, with the
/// active module's verdict and replies (`--shadow-mismatches`).
fn keep_mismatch(shared: &Shared, client: SocketAddr, datagram: &[u8], verdict: &'static str, replies: &[Vec<u8>]) {
    if let Some(log) = &shared.mismatches {
        let module = shared.program.load().sha256();
        log.add(client, shared.local, datagram, verdict, replies, module);
    }
}

fn since(epoch: Instant, at: Instant) -> Duration {
    at.saturating_duration_since(epoch)
}

/// What the candidate's run of a client datagram shows against the active's.
fn compare(verdict: &str, replies: &[Vec<u8>], forwards: &[Vec<u8>], outcome: &Outcome) -> ShadowResult {
    if let Some(result) = candidate_failed(verdict, outcome) {
        return result;
    }
    let theirs = outcome.verdict();
    // Forwards are compared by content: which endpoint of a pool takes them
    // is the balancer's choice, not the module's.
    let same_forwards =
        outcome.forwards.len() == forwards.len() && outcome.forwards.iter().zip(forwards).all(|((_, a), b)| a == b);
    if theirs == verdict && outcome.replies == replies && same_forwards {
        ShadowResult::Match
    } else {
        ShadowResult::Mismatch
    }
}

/// What the candidate's `on_reply` on an upstream answer shows against the active's.
fn compare_answer(replies: &[Vec<u8>], outcome: &Outcome) -> ShadowResult {
    match candidate_failed("", outcome) {
        Some(result) => result,
        None if outcome.replies == replies => ShadowResult::Match,
        None => ShadowResult::Mismatch,
    }
}

/// A trap or timeout of the candidate where the active had none.
fn candidate_failed(verdict: &str, outcome: &Outcome) -> Option<ShadowResult> {
    match outcome.dropped {
        Some(DropReason::Trap) if verdict != DropReason::Trap.as_str() => Some(ShadowResult::CandidateTrap),
        Some(DropReason::Timeout) if verdict != DropReason::Timeout.as_str() => Some(ShadowResult::CandidateTimeout),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mismatch_is_any_difference_in_verdict_replies_or_forwards() {
        let reply = Outcome {
            replies: vec![b"HI".to_vec()],
            ..Outcome::default()
        };
        assert_eq!(compare("reply", &[b"HI".to_vec()], &[], &reply), ShadowResult::Match);
        assert_eq!(compare("reply", &[b"hi".to_vec()], &[], &reply), ShadowResult::Mismatch);
        let forward = Outcome {
            forwards: vec![("127.0.0.1:53".parse().unwrap(), b"q".to_vec())],
            ..Outcome::default()
        };
        assert_eq!(compare("forward", &[], &[b"q".to_vec()], &forward), ShadowResult::Match);
        assert_eq!(
            compare("forward", &[], &[b"Q".to_vec()], &forward),
            ShadowResult::Mismatch
        );
        let trap = Outcome {
            dropped: Some(DropReason::Trap),
            ..Outcome::default()
        };
        assert_eq!(compare("reply", &[], &[], &trap), ShadowResult::CandidateTrap);
        assert_eq!(compare("trap", &[], &[], &trap), ShadowResult::Match);
    }
}
