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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
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

/// Bytes of datagrams waiting for the writer (each counted with
/// [`ENTRY_OVERHEAD`]); past this they are dropped and counted too, so that a
/// slow disk and large datagrams hold 16 MiB, not 4,096 × 64 KiB.
const QUEUE_BYTES: usize = 16 << 20;

/// What an entry costs beside its payload.
const ENTRY_OVERHEAD: usize = 128;

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
    /// Bytes queued for the writer now.
    queued: Arc<AtomicUsize>,
}

impl Recorder {
    /// Creates the file (an error names it) and starts the writer thread.
    pub fn start(spec: &RecordSpec) -> anyhow::Result<Self> {
        Self::start_held(spec, None)
    }

    /// As [`Recorder::start`]; the writer waits for `hold` to be released
    /// (sent to or dropped) before it writes anything, as a stalled disk would.
    fn start_held(spec: &RecordSpec, hold: Option<Receiver<()>>) -> anyhow::Result<Self> {
        let writer = create(&spec.path).with_context(|| format!("--record {}", spec.path.display()))?;
        let (tx, rx) = sync_channel(QUEUE);
        let stopped = Arc::new(AtomicBool::new(false));
        let path = spec.path.clone();
        let (max_bytes, flag) = (spec.max_bytes, Arc::clone(&stopped));
        let queued = Arc::new(AtomicUsize::new(0));
        let taken = Arc::clone(&queued);
        let writer = std::thread::Builder::new()
            .name("wasmgate-record".into())
            .spawn(move || {
                if let Some(hold) = hold {
                    let _ = hold.recv();
                }
                write_all(&rx, writer, &path, max_bytes, &flag, &taken);
            })
            .context("cannot start the recording thread")?;
        let threshold = threshold(spec.sample);
        Ok(Self {
            tx: Some(tx),
            writer: Some(writer),
            threshold,
            stopped,
            dropped: AtomicU64::new(0),
            queued,
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
        let cost = payload.len() + ENTRY_OVERHEAD;
        if self.queued.fetch_add(cost, Relaxed) + cost > QUEUE_BYTES {
            self.queued.fetch_sub(cost, Relaxed);
            self.dropped.fetch_add(1, Relaxed);
            return;
        }
        match tx.try_send(entry) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                self.queued.fetch_sub(cost, Relaxed);
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
    queued: &AtomicUsize,
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
        queued.fetch_sub(entry.payload.len() + ENTRY_OVERHEAD, Relaxed);
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

/// `--shadow-mismatches`: the client datagrams on which the candidate differed
/// from the active module, each with the active's replies, in a pcapng file
/// that holds at least the last [`MISMATCHES`] (and at most twice that).
/// Replaying the file with the candidate shows the differences again.
///
/// A thread of its own appends each mismatch to the file as it comes, and
/// once [`MISMATCHES`] were appended, writes the last [`MISMATCHES`] to a new
/// file put in the old one's place: every mismatch costs at most two writes,
/// however many come (rewriting the whole file after each one wrote 443 MB for
/// 3.2 MB of mismatches).
pub struct MismatchLog {
    /// Mismatches not yet written, at most [`MISMATCHES`] (older ones would be
    /// compacted away at once).
    pending: Arc<Mutex<VecDeque<Vec<Entry>>>>,
    /// Wakes the writer; taken when the log is dropped, which ends it.
    tx: Option<SyncSender<()>>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// Bytes written to the file (compactions included).
    written: Arc<AtomicU64>,
}

impl MismatchLog {
    /// Creates the file (empty, an error names it) and starts the writer.
    pub fn start(path: &Path) -> anyhow::Result<Self> {
        let what = || format!("--shadow-mismatches {}", path.display());
        let mut file = create(path).with_context(what)?;
        file.get_mut().flush().with_context(what)?;
        let pending = Arc::new(Mutex::new(VecDeque::new()));
        let written = Arc::new(AtomicU64::new(0));
        let (tx, rx) = sync_channel(1);
        let mut log = MismatchFile {
            path: path.to_path_buf(),
            file,
            ring: VecDeque::new(),
            appended: 0,
            written: Arc::clone(&written),
        };
        let shared = Arc::clone(&pending);
        let writer = std::thread::Builder::new()
            .name("wasmgate-mismatches".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    log.take(&shared);
                }
                log.take(&shared);
            })
            .context("cannot start the mismatch writer thread")?;
        Ok(Self {
            pending,
            tx: Some(tx),
            writer: Some(writer),
            written,
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
            let mut pending = self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if pending.len() == MISMATCHES {
                pending.pop_front();
            }
            pending.push_back(exchange);
        }
        if let Some(tx) = &self.tx {
            // Full means the writer is woken already.
            let _ = tx.try_send(());
        }
    }

    /// Bytes written to the file so far.
    pub fn bytes_written(&self) -> u64 {
        self.written.load(Relaxed)
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

/// The writer thread's side of the mismatch file.
struct MismatchFile {
    path: std::path::PathBuf,
    file: PcapNgWriter<BufWriter<File>>,
    /// The last [`MISMATCHES`] mismatches, for the next compaction.
    ring: VecDeque<Vec<Entry>>,
    /// Mismatches appended since the file was last made.
    appended: usize,
    written: Arc<AtomicU64>,
}

impl MismatchFile {
    /// Appends what is pending, compacting first when the file holds enough.
    fn take(&mut self, pending: &Mutex<VecDeque<Vec<Entry>>>) {
        let new: Vec<Vec<Entry>> = pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
            .collect();
        let result = (|| -> anyhow::Result<()> {
            for exchange in new {
                if self.appended >= MISMATCHES {
                    self.compact()?;
                }
                let mut packet = Vec::new();
                for entry in &exchange {
                    packet.clear();
                    if ip_packet(entry, &mut packet) {
                        let n = self.file.write_pcapng_block(block(entry, &packet))?;
                        self.written.fetch_add(n as u64, Relaxed);
                    }
                }
                if self.ring.len() == MISMATCHES {
                    self.ring.pop_front();
                }
                self.ring.push_back(exchange);
                self.appended += 1;
            }
            self.file.get_mut().flush()?;
            Ok(())
        })();
        if let Err(e) = result {
            tracing::error!(file = %self.path.display(), error = %format_args!("{e:#}"), "cannot write the shadow mismatches");
        }
    }

    /// Writes the last [`MISMATCHES`] to a new file in the old one's place,
    /// and appends to it from now on.
    fn compact(&mut self) -> anyhow::Result<()> {
        let pending = super::output::beside(&self.path)?;
        let written = (|| -> anyhow::Result<PcapNgWriter<BufWriter<File>>> {
            let mut writer = pcapng(pending.file.try_clone()?)?;
            let mut packet = Vec::new();
            for entry in self.ring.iter().flatten() {
                packet.clear();
                if ip_packet(entry, &mut packet) {
                    let n = writer.write_pcapng_block(block(entry, &packet))?;
                    self.written.fetch_add(n as u64, Relaxed);
                }
            }
            writer.get_mut().flush()?;
            Ok(writer)
        })();
        match written {
            Ok(writer) => {
                pending.publish(&self.path)?;
                self.file = writer;
                self.appended = 0;
                Ok(())
            }
            Err(e) => {
                pending.discard();
                Err(e)
            }
        }
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
    fn a_stalled_writer_fills_the_queue_to_its_count_or_byte_bound_and_the_rest_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stalled.pcapng");
        let (release, hold) = sync_channel(0);
        let recorder = Recorder::start_held(&RecordSpec::new(path.clone()), Some(hold)).unwrap();
        let (client, local) = ("192.0.2.7:4000".parse().unwrap(), "127.0.0.1:8008".parse().unwrap());
        // Small datagrams: the count bound.
        for i in 0..QUEUE as u32 + 1_000 {
            recorder.record(
                Hop::Client,
                client,
                local,
                &i.to_be_bytes(),
                [0; 32],
                Some("reply"),
                None,
            );
        }
        assert_eq!(recorder.dropped(), 1_000);
        drop(release);
        drop(recorder);
        let small = crate::prove::capture::read(&path).unwrap().datagrams;
        assert_eq!(small.len(), QUEUE);
        assert_eq!(small.last().unwrap().payload, (QUEUE as u32 - 1).to_be_bytes());

        // 60 KB datagrams: the byte bound, long before the count.
        let (release, hold) = sync_channel(0);
        let recorder = Recorder::start_held(&RecordSpec::new(path.clone()), Some(hold)).unwrap();
        let large = vec![b'L'; 60_000];
        for _ in 0..1_000 {
            recorder.record(Hop::Client, client, local, &large, [0; 32], Some("reply"), None);
        }
        let fit = QUEUE_BYTES / (large.len() + ENTRY_OVERHEAD);
        assert_eq!(recorder.dropped(), 1_000 - fit as u64);
        drop(release);
        drop(recorder);
        assert_eq!(crate::prove::capture::read(&path).unwrap().datagrams.len(), fit);
    }

    #[test]
    fn the_mismatch_file_keeps_the_last_hundred_and_writes_each_mismatch_at_most_twice() {
        // Before: the file was rewritten whole after each mismatch (3.2 MB of
        // mismatches wrote 443 MB).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mismatches.pcapng");
        let log = MismatchLog::start(&path).unwrap();
        let (client, local) = ("192.0.2.7:4000".parse().unwrap(), "127.0.0.1:8008".parse().unwrap());
        let payload = vec![b'x'; 1000];
        for i in 0..1_000u32 {
            let mut datagram = i.to_be_bytes().to_vec();
            datagram.extend_from_slice(&payload);
            log.add(
                client,
                local,
                &datagram,
                "reply",
                std::slice::from_ref(&datagram),
                [0; 32],
            );
            if i % 50 == 0 {
                // Let the writer run between bursts, as traffic would.
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
        drop(log);
        let capture = crate::prove::capture::read(&path).unwrap();
        let clients: Vec<u32> = capture
            .datagrams
            .iter()
            .filter(|d| d.hop == Some(Hop::Client))
            .map(|d| u32::from_be_bytes(d.payload[..4].try_into().unwrap()))
            .collect();
        assert!(
            (MISMATCHES..=2 * MISMATCHES).contains(&clients.len()),
            "{} kept",
            clients.len()
        );
        // The newest, in order, and every one of the last hundred.
        assert_eq!(clients.last(), Some(&999));
        assert!(clients.windows(2).all(|w| w[0] < w[1]));
        assert!(clients.contains(&900));
    }

    #[test]
    fn the_mismatch_log_writes_a_bounded_multiple_of_what_it_is_given() {
        let dir = tempfile::tempdir().unwrap();
        let log = MismatchLog::start(&dir.path().join("m.pcapng")).unwrap();
        let (client, local) = ("192.0.2.7:4000".parse().unwrap(), "127.0.0.1:8008".parse().unwrap());
        let datagram = vec![b'y'; 1000];
        for _ in 0..2_000 {
            log.add(
                client,
                local,
                &datagram,
                "reply",
                std::slice::from_ref(&datagram),
                [0; 32],
            );
            std::thread::yield_now();
        }
        let given = 2_000 * 2 * 1000;
        let written = {
            let log = log;
            // Dropping waits for the writer.
            let written = Arc::clone(&log.written);
            drop(log);
            written.load(Relaxed)
        };
        assert!(written <= 3 * given, "{written} bytes written for {given} given");
    }

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
