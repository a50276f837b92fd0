//! `--record`: a listener's datagrams written to pcapng by a thread of their
//! own. Workers only copy a sampled datagram into a bounded queue; when the
//! queue is full the datagram is not recorded and counted, so recording never
//! makes a worker wait.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;

use crate::config::RecordSpec;
use etherparse::PacketBuilder;
use pcap_file::DataLink;
use pcap_file::pcapng::PcapNgWriter;
use pcap_file::pcapng::blocks::enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption};
use pcap_file::pcapng::blocks::interface_description::{InterfaceDescriptionBlock, InterfaceDescriptionOption};

/// Datagrams waiting for the writer; past this they are dropped and counted.
const QUEUE: usize = 4096;

/// Which leg of the gateway a recorded datagram travelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hop {
    /// Client to gateway.
    Client,
    /// Gateway to client.
    Reply,
    /// Gateway to an upstream.
    Forward,
    /// Upstream to gateway.
    Upstream,
}

impl Hop {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Reply => "reply",
            Self::Forward => "forward",
            Self::Upstream => "upstream",
        }
    }

    /// The hop, client and verdict named by a recorder's packet comment
    /// (`wasmgate hop=upstream client=198.51.100.7:4000 …`); nothing for other comments.
    pub(crate) fn parse_comment(comment: &str) -> (Option<Self>, Option<SocketAddr>, Option<String>) {
        let mut words = comment.split_ascii_whitespace();
        if words.next() != Some("wasmgate") {
            return (None, None, None);
        }
        let (mut hop, mut client, mut verdict) = (None, None, None);
        for word in words {
            match word.split_once('=') {
                Some(("hop", h)) => {
                    hop = [Self::Client, Self::Reply, Self::Forward, Self::Upstream]
                        .into_iter()
                        .find(|k| k.as_str() == h);
                }
                Some(("client", c)) => client = c.parse().ok(),
                Some(("verdict", v)) => verdict = Some(v.to_string()),
                _ => {}
            }
        }
        (hop, client, verdict)
    }
}

/// One datagram for the writer.
#[derive(Clone)]
struct Entry {
    at: SystemTime,
    hop: Hop,
    src: SocketAddr,
    dst: SocketAddr,
    payload: Vec<u8>,
    module: [u8; 32],
    /// What became of a client datagram (`reply`, `forward`, a drop reason).
    verdict: Option<&'static str>,
    /// The client an upstream hop belongs to.
    client: Option<SocketAddr>,
}

/// A listener's recorder, shared by its workers.
pub struct Recorder {
    /// Taken when the recorder is dropped, which ends the writer.
    tx: Option<SyncSender<Entry>>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// Sampled when a uniform `u64` falls below this.
    threshold: u64,
    /// Set when the file reached its size cap or could not be written.
    stopped: Arc<AtomicBool>,
    dropped: AtomicU64,
}

impl Recorder {
    /// Creates the file (an error names it) and starts the writer thread.
    pub fn start(spec: &RecordSpec) -> anyhow::Result<Self> {
        let writer = create(&spec.path).with_context(|| format!("--record {}", spec.path.display()))?;
        let (tx, rx) = sync_channel(QUEUE);
        let stopped = Arc::new(AtomicBool::new(false));
        let path = spec.path.clone();
        let (max_bytes, flag) = (spec.max_bytes, Arc::clone(&stopped));
        let writer = std::thread::Builder::new()
            .name("wasmgate-record".into())
            .spawn(move || write_all(&rx, writer, &path, max_bytes, &flag))
            .context("cannot start the recording thread")?;
        let threshold = threshold(spec.sample);
        Ok(Self {
            tx: Some(tx),
            writer: Some(writer),
            threshold,
            stopped,
            dropped: AtomicU64::new(0),
        })
    }

    /// Whether to record the next exchange; `state` is the caller's own
    /// generator state (any non-zero seed).
    pub fn sampled(&self, state: &mut u64) -> bool {
        if self.stopped.load(Relaxed) {
            return false;
        }
        chance(state, self.threshold)
    }

    /// Queues one datagram; a full queue drops it (counted).
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        hop: Hop,
        src: SocketAddr,
        dst: SocketAddr,
        payload: &[u8],
        module: [u8; 32],
        verdict: Option<&'static str>,
        client: Option<SocketAddr>,
    ) {
        let entry = Entry {
            at: SystemTime::now(),
            hop,
            src,
            dst,
            payload: payload.to_vec(),
            module,
            verdict,
            client,
        };
        let Some(tx) = &self.tx else { return };
        match tx.try_send(entry) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Relaxed);
            }
        }
    }

    /// Datagrams not recorded because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }
}

/// Dropping the recorder (with the last worker) writes out what is queued.
impl Drop for Recorder {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// The writer thread: entries to pcapng until every worker's sender is gone,
/// flushing whenever the queue runs dry so the file is readable while serving.
fn write_all(
    rx: &Receiver<Entry>,
    mut writer: PcapNgWriter<BufWriter<File>>,
    path: &std::path::Path,
    max_bytes: u64,
    stopped: &AtomicBool,
) {
    let mut written = 0u64;
    let mut packet = Vec::with_capacity(65_600);
    loop {
        let entry = match rx.try_recv() {
            Ok(entry) => entry,
            Err(TryRecvError::Empty) => {
                if let Err(e) = writer.get_mut().flush() {
                    tracing::error!(file = %path.display(), error = %e, "recording stopped: cannot write");
                    stopped.store(true, Relaxed);
                    return;
                }
                match rx.recv() {
                    Ok(entry) => entry,
                    Err(_) => return,
                }
            }
            Err(TryRecvError::Disconnected) => break,
        };
        packet.clear();
        if !ip_packet(&entry, &mut packet) {
            continue;
        }
        let block = block(&entry, &packet);
        match writer.write_pcapng_block(block) {
            Ok(n) => written += n as u64,
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "recording stopped: cannot write");
                stopped.store(true, Relaxed);
                return;
            }
        }
        if written >= max_bytes {
            stopped.store(true, Relaxed);
            tracing::warn!(
                file = %path.display(),
                bytes = written,
                "recording stopped: the file reached --record-max-bytes"
            );
            break;
        }
    }
    if let Err(e) = writer.get_mut().flush() {
        tracing::error!(file = %path.display(), error = %e, "recording: cannot write");
    }
}

/// The [`chance`] threshold that keeps `share` (0..=1) of draws.
pub(crate) fn threshold(share: f64) -> u64 {
    if share >= 1.0 {
        u64::MAX
    } else {
        (share.max(0.0) * u64::MAX as f64) as u64
    }
}

/// One sampling draw: true for a share `threshold / u64::MAX` of calls;
/// `state` is the caller's own generator state (any seed).
pub(crate) fn chance(state: &mut u64, threshold: u64) -> bool {
    if threshold == u64::MAX {
        return true;
    }
    // xorshift64*: sampling needs spread, not secrecy.
    let mut x = *state | 1;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_f491_4f6c_dd1d) < threshold
}

/// A new pcapng file (readable by the gateway's user only: client payloads
/// are in it) with its one interface, raw IP with nanosecond timestamps.
/// Made in its place at once, safely ([`super::output`]).
fn create(path: &Path) -> anyhow::Result<PcapNgWriter<BufWriter<File>>> {
    pcapng(super::output::create(path)?)
}

/// `file` as a pcapng file with its one interface.
fn pcapng(file: File) -> anyhow::Result<PcapNgWriter<BufWriter<File>>> {
    let mut writer = PcapNgWriter::new(BufWriter::new(file)).context("cannot write")?;
    let interface = InterfaceDescriptionBlock {
        linktype: DataLink::RAW,
        snaplen: 0,
        // Nanoseconds, which is how pcap-file writes timestamps.
        options: vec![InterfaceDescriptionOption::IfTsResol(9)],
    };
    writer.write_pcapng_block(interface).context("cannot write")?;
    Ok(writer)
}

/// An entry as a packet block; `packet` is its IP packet.
fn block<'a>(entry: &Entry, packet: &'a [u8]) -> EnhancedPacketBlock<'a> {
    EnhancedPacketBlock {
        interface_id: 0,
        timestamp: entry
            .at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO),
        original_len: u32::try_from(packet.len()).unwrap_or(u32::MAX),
        data: Cow::Borrowed(packet),
        options: vec![EnhancedPacketOption::Comment(Cow::Owned(comment(entry)))],
    }
}

/// How many mismatches `--shadow-mismatches` keeps.
pub const MISMATCHES: usize = 100;

/// How long the mismatch writer waits after a change, so that a burst of
/// mismatches costs one rewrite.
const MISMATCH_SETTLE: Duration = Duration::from_millis(100);

/// `--shadow-mismatches`: the last [`MISMATCHES`] client datagrams on which
/// the candidate differed from the active module, each with the active's
/// replies, rewritten whole to a pcapng file by a thread of its own shortly
/// after each change. Replaying the file with the candidate shows the
/// differences again.
pub struct MismatchLog {
    ring: Arc<Mutex<VecDeque<Vec<Entry>>>>,
    /// Wakes the writer; taken when the log is dropped, which ends it.
    tx: Option<SyncSender<()>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl MismatchLog {
    /// Creates the file (empty, an error names it) and starts the writer.
    pub fn start(path: &Path) -> anyhow::Result<Self> {
        let what = || format!("--shadow-mismatches {}", path.display());
        let mut file = create(path).with_context(what)?;
        file.get_mut().flush().with_context(what)?;
        let ring = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = sync_channel(1);
        let (path, shared) = (path.to_path_buf(), Arc::clone(&ring));
        let writer = std::thread::Builder::new()
            .name("wasmgate-mismatches".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    std::thread::sleep(MISMATCH_SETTLE);
                    while rx.try_recv().is_ok() {}
                    rewrite(&path, &shared);
                }
                rewrite(&path, &shared);
            })
            .context("cannot start the mismatch writer thread")?;
        Ok(Self {
            ring,
            tx: Some(tx),
            writer: Some(writer),
        })
    }

    /// Keeps one mismatch: the client's datagram (with the active module's
    /// sha256 and verdict) and the active's replies to it.
    pub fn add(
        &self,
        client: SocketAddr,
        local: SocketAddr,
        datagram: &[u8],
        verdict: &'static str,
        replies: &[Vec<u8>],
        module: [u8; 32],
    ) {
        let at = SystemTime::now();
        let entry = |hop, src, dst, payload: &[u8], verdict| Entry {
            at,
            hop,
            src,
            dst,
            payload: payload.to_vec(),
            module,
            verdict,
            client: None,
        };
        let mut exchange = vec![entry(Hop::Client, client, local, datagram, Some(verdict))];
        exchange.extend(replies.iter().map(|r| entry(Hop::Reply, local, client, r, None)));
        {
            let mut ring = self.ring.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if ring.len() == MISMATCHES {
                ring.pop_front();
            }
            ring.push_back(exchange);
        }
        if let Some(tx) = &self.tx {
            // Full means a rewrite is due already.
            let _ = tx.try_send(());
        }
    }
}

impl Drop for MismatchLog {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// Writes the ring to `path` through a temporary file renamed over it, so a
/// reader never sees half a file.
fn rewrite(path: &Path, ring: &Mutex<VecDeque<Vec<Entry>>>) {
    let exchanges: Vec<Vec<Entry>> = ring
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .map(|e| e.iter().map(Entry::clone).collect())
        .collect();
    let result = (|| -> anyhow::Result<()> {
        let pending = super::output::beside(path)?;
        let written = (|| -> anyhow::Result<()> {
            let mut writer = pcapng(pending.file.try_clone()?)?;
            let mut packet = Vec::new();
            for entry in exchanges.iter().flatten() {
                packet.clear();
                if ip_packet(entry, &mut packet) {
                    writer.write_pcapng_block(block(entry, &packet))?;
                }
            }
            writer.get_mut().flush()?;
            Ok(())
        })();
        match written {
            Ok(()) => pending.publish(path).map(drop),
            Err(e) => {
                pending.discard();
                Err(e)
            }
        }
    })();
    if let Err(e) = result {
        tracing::error!(file = %path.display(), error = %format_args!("{e:#}"), "cannot write the shadow mismatches");
    }
}

/// The recorder's packet comment: hop, module, and verdict or client.
fn comment(entry: &Entry) -> String {
    use std::fmt::Write as _;
    let mut s = format!("wasmgate hop={} module=", entry.hop.as_str());
    for b in entry.module {
        let _ = write!(s, "{b:02x}");
    }
    if let Some(verdict) = entry.verdict {
        let _ = write!(s, " verdict={verdict}");
    }
    if let Some(client) = entry.client {
        let _ = write!(s, " client={client}");
    }
    s
}

/// The datagram as an IP packet (IPv4 when both ends are, else IPv6); false
/// when it cannot be one (too large for its header).
fn ip_packet(entry: &Entry, out: &mut Vec<u8>) -> bool {
    let (sp, dp) = (entry.src.port(), entry.dst.port());
    match (entry.src.ip(), entry.dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64)
            .udp(sp, dp)
            .write(out, &entry.payload)
            .is_ok(),
        (s, d) => PacketBuilder::ipv6(v6(s), v6(d), 64)
            .udp(sp, dp)
            .write(out, &entry.payload)
            .is_ok(),
    }
}

fn v6(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorder_comment_gives_back_its_hop_and_client() {
        let entry = Entry {
            at: SystemTime::now(),
            hop: Hop::Upstream,
            src: "192.0.2.1:53".parse().unwrap(),
            dst: "127.0.0.1:9".parse().unwrap(),
            payload: vec![],
            module: [0xab; 32],
            verdict: None,
            client: Some("198.51.100.7:4000".parse().unwrap()),
        };
        let text = comment(&entry);
        assert!(text.contains(&"ab".repeat(32)), "{text}");
        assert_eq!(
            Hop::parse_comment(&text),
            (Some(Hop::Upstream), Some("198.51.100.7:4000".parse().unwrap()), None)
        );
        assert_eq!(Hop::parse_comment("a comment from tshark"), (None, None, None));
    }

    #[test]
    fn sampling_keeps_about_its_share() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = RecordSpec::new(dir.path().join("r.pcapng"));
        spec.sample = 0.25;
        let recorder = Recorder::start(&spec).unwrap();
        let mut state = 7;
        let kept = (0..10_000).filter(|_| recorder.sampled(&mut state)).count();
        assert!((2_000..3_000).contains(&kept), "{kept} of 10,000 at 0.25");
    }
}
