//! Recording (`--record`) and the shadow (`--candidate` with a sample) as one
//! [`Tap`] on a worker's core: it samples exchanges, writes what it samples to
//! the recorder, and hands shadow samples to the shadow thread.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc::{SyncSender, TrySendError};

use crate::gateway::handler::Route;
use crate::gateway::shared::Shared;
use crate::gateway::tap::{ClientExchange, Tap, UpstreamExchange};
use crate::prove::candidate::{self, Job};
use crate::prove::capture::{self, Hop};

/// One worker's recording and shadow sampling.
pub(crate) struct Proving {
    shared: Arc<Shared>,
    /// The recorder's sampling state (`--record-sample`).
    sample_state: u64,
    /// Where shadow samples go (`--candidate` with `--shadow-sample` above 0,
    /// or a canary).
    shadow: Option<SyncSender<Job>>,
    shadow_threshold: u64,
    shadow_state: u64,
    /// What was decided for the exchange in hand.
    recording: bool,
    shadowed: bool,
    canaried: bool,
}

impl Proving {
    pub(crate) fn new(shared: Arc<Shared>, shadow: Option<SyncSender<Job>>, worker: usize) -> Self {
        let share = shared.spec.candidate.as_ref().map_or(0.0, |c| c.shadow_sample);
        Self {
            shared,
            sample_state: 0x9e37_79b9_7f4a_7c15 ^ worker as u64,
            shadow,
            shadow_threshold: capture::threshold(share),
            shadow_state: 0x2545_f491_4f6c_dd1d ^ worker as u64,
            recording: false,
            shadowed: false,
            canaried: false,
        }
    }

    /// Whether the next datagram is recorded (`--record-sample`).
    fn sampled(&mut self) -> bool {
        match &self.shared.recorder {
            Some(r) => r.sampled(&mut self.sample_state),
            None => false,
        }
    }

    /// Whether an exchange the active module serves goes to the shadow too:
    /// sampled, and only while a candidate is loaded.
    fn shadow_sampled(&mut self, route: Route) -> bool {
        route == Route::Active
            && self.shadow.is_some()
            && self.shared.candidate.load().is_some()
            && capture::chance(&mut self.shadow_state, self.shadow_threshold)
    }

    /// Records one datagram of the exchange being handled.
    fn record(
        &self,
        hop: Hop,
        src: SocketAddr,
        dst: SocketAddr,
        datagram: &[u8],
        verdict: Option<&'static str>,
        client: Option<SocketAddr>,
    ) {
        if let Some(r) = &self.shared.recorder {
            let module = self.shared.program.load().sha256();
            r.record(hop, src, dst, datagram, module, verdict, client);
        }
    }

    /// Hands a shadow sample to the shadow thread; a full queue skips it.
    fn send_shadow(&self, job: Job) {
        let Some(tx) = &self.shadow else { return };
        let bytes = job.bytes();
        if !self.shared.shadow.reserve(bytes) {
            return;
        }
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = tx.try_send(job) {
            self.shared.shadow.release(bytes);
            self.shared.shadow.skipped();
        }
    }
}

impl Tap for Proving {
    fn active(&self) -> bool {
        self.shared.recorder.is_some() || self.shadow.is_some()
    }

    fn watch_client(&mut self, _: SocketAddr, route: Route) -> bool {
        self.recording = self.sampled();
        self.shadowed = self.shadow_sampled(route);
        // A canaried datagram goes to the shadow thread with what the
        // candidate did, for the active module to run and compare.
        self.canaried = route == Route::Candidate && self.shadow.is_some();
        self.recording || self.shadowed || self.canaried
    }

    fn client(&mut self, exchange: ClientExchange<'_>) {
        let ClientExchange {
            now,
            client,
            datagram,
            verdict,
            mut replies,
            forwards,
        } = exchange;
        // For the candidate to run too (shadowed), or for the active to
        // (canaried, unless the candidate failed, which is judged already).
        let canary_sample = self.canaried && !candidate::failed(verdict);
        if self.shadowed || canary_sample {
            let replies = if self.recording {
                replies.clone()
            } else {
                std::mem::take(&mut replies)
            };
            self.send_shadow(Job::Client {
                at: now,
                client,
                datagram: datagram.to_vec(),
                verdict,
                replies,
                forwards,
                canaried: !self.shadowed,
            });
        }
        if self.recording {
            let local = self.shared.local;
            self.record(Hop::Client, client, local, datagram, Some(verdict), None);
            for reply in &replies {
                self.record(Hop::Reply, local, client, reply, None, None);
            }
        }
    }

    fn watch_upstream(&mut self, _: SocketAddr, route: Route) -> bool {
        self.recording = self.sampled();
        self.shadowed = self.shadow_sampled(route);
        self.recording || self.shadowed
    }

    fn upstream(&mut self, exchange: UpstreamExchange<'_>) {
        let local = self.shared.local;
        if self.recording {
            if let Some(endpoint) = exchange.endpoint {
                self.record(
                    Hop::Upstream,
                    endpoint,
                    local,
                    exchange.datagram,
                    None,
                    Some(exchange.client),
                );
            }
            for reply in &exchange.replies {
                self.record(Hop::Reply, local, exchange.client, reply, None, None);
            }
        }
        if self.shadowed {
            self.send_shadow(Job::Upstream {
                at: exchange.now,
                client: exchange.client,
                datagram: exchange.datagram.to_vec(),
                replies: exchange.replies,
            });
        }
    }

    fn watches_forwards(&self) -> bool {
        self.shared.recorder.is_some()
    }

    fn forwarded(&mut self, client: SocketAddr, endpoint: SocketAddr, datagram: &[u8]) {
        if self.sampled() {
            let local = self.shared.local;
            self.record(Hop::Forward, local, endpoint, datagram, None, Some(client));
        }
    }
}
