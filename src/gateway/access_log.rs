//! The access log (`--access-log`): a JSON line per sampled client datagram,
//! written by a thread of the listener's own from a bounded queue, so that a
//! worker never waits on the disk; a full queue drops the line and counts
//! it. The file is created 0600, never opened through a symbolic link, and
//! opened again on SIGHUP (logrotate moves it away, then signals).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use serde::Serialize;

use crate::config::AccessLogSpec;
use crate::prove::capture::{chance, threshold};

/// Lines waiting for the writer; past it they are dropped and counted.
pub(crate) const QUEUE: usize = 8192;
/// How often the writer looks for a SIGHUP when no line comes.
const IDLE: Duration = Duration::from_millis(200);
/// How long a stopping listener waits for its queued lines to be written.
const DRAIN: Duration = Duration::from_secs(2);

/// One client datagram, as the worker hands it over: no formatting on the
/// datagram path, and an allocation only for an upstream or a note.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) at: SystemTime,
    pub(crate) client: SocketAddr,
    pub(crate) bytes_in: usize,
    pub(crate) bytes_out: usize,
    /// `reply`, `forward`, or the drop reason.
    pub(crate) verdict: &'static str,
    pub(crate) guest_ns: u64,
    /// The first forward's endpoint, `POOL/ip:port`.
    pub(crate) upstream: Option<Box<str>>,
    pub(crate) module: [u8; 32],
    /// `active`, or `candidate` for a canary client.
    pub(crate) role: &'static str,
    pub(crate) note: Option<Box<str>>,
}

/// A listener's access log: the queue to its writer.
pub(crate) struct AccessLog {
    tx: Option<SyncSender<Entry>>,
    threshold: u64,
    dropped: AtomicU64,
    written: Arc<AtomicU64>,
    reopen: Arc<AtomicBool>,
    /// Closed by the writer when it has written everything and stopped.
    done: Mutex<Receiver<()>>,
}

impl AccessLog {
    /// Opens `spec.path` (checking it can be written, now rather than at the
    /// first datagram) and starts the writer for listener `listener`.
    pub(crate) fn start(spec: &AccessLogSpec, listener: &str) -> anyhow::Result<Self> {
        let out = open(&spec.path).with_context(|| format!("access log {}", spec.path.display()))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let written = Arc::new(AtomicU64::new(0));
        let reopen = Arc::new(AtomicBool::new(false));
        let (finished, done) = std::sync::mpsc::channel();
        let writer = Writer {
            path: spec.path.clone(),
            listener: listener.to_owned(),
            out: Some(out),
            written: Arc::clone(&written),
            reopen: Arc::clone(&reopen),
        };
        std::thread::Builder::new()
            .name("wasmgate-access-log".into())
            .spawn(move || {
                writer.run(&rx);
                drop(finished);
            })
            .context("cannot start the access log's thread")?;
        Ok(Self {
            tx: Some(tx),
            threshold: threshold(spec.sample),
            dropped: AtomicU64::new(0),
            written,
            reopen,
            done: Mutex::new(done),
        })
    }

    /// Whether the next datagram is logged (`--access-log-sample`), by the
    /// worker's own random `state`.
    pub(crate) fn sampled(&self, state: &mut u64) -> bool {
        chance(state, self.threshold)
    }

    /// Queues `entry`, or drops and counts it if the writer is behind.
    pub(crate) fn log(&self, entry: Entry) {
        if let Some(tx) = &self.tx
            && let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = tx.try_send(entry)
        {
            self.dropped.fetch_add(1, Relaxed);
        }
    }

    /// Lines dropped because the queue was full.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }

    /// Lines written.
    pub(crate) fn written(&self) -> u64 {
        self.written.load(Relaxed)
    }

    /// Opens the file again before the next line (SIGHUP).
    pub(crate) fn reopen(&self) {
        self.reopen.store(true, Relaxed);
    }
}

impl Drop for AccessLog {
    /// Stops the writer once it has written what is queued, waiting for that
    /// at most [`DRAIN`]: a reader that stopped reading standard output must
    /// not hold up a shutdown.
    fn drop(&mut self) {
        self.tx = None;
        if let Ok(done) = self.done.get_mut() {
            let _ = done.recv_timeout(DRAIN);
        }
    }
}

/// Opens the log: standard output for `-`; else the file, appended to,
/// created 0600, and refused if it is a symbolic link (`O_NOFOLLOW`), so that
/// whoever can write the directory cannot point the log at another file.
fn open(path: &Path) -> io::Result<Box<dyn Write + Send>> {
    if path.as_os_str() == "-" {
        return Ok(Box::new(io::stdout()));
    }
    let file: File = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                io::Error::other("it is a symbolic link, which the access log never follows")
            } else {
                e
            }
        })?;
    Ok(Box::new(file))
}

struct Writer {
    path: PathBuf,
    listener: String,
    /// `None` after a failed reopen, until the next SIGHUP.
    out: Option<Box<dyn Write + Send>>,
    written: Arc<AtomicU64>,
    reopen: Arc<AtomicBool>,
}

/// A line as written.
#[derive(Serialize)]
struct Line<'a> {
    time: String,
    listener: &'a str,
    client: String,
    bytes_in: usize,
    bytes_out: usize,
    verdict: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    drop_reason: Option<&'a str>,
    guest_us: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream: Option<&'a str>,
    module: String,
    role: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<&'a str>,
}

impl Writer {
    fn run(mut self, rx: &Receiver<Entry>) {
        let mut batch = Vec::with_capacity(64 << 10);
        loop {
            let more = match rx.recv_timeout(IDLE) {
                Ok(entry) => {
                    self.format(&entry, &mut batch);
                    // Whatever else waits, in one write.
                    while batch.len() < 60 << 10 {
                        match rx.try_recv() {
                            Ok(entry) => self.format(&entry, &mut batch),
                            Err(_) => break,
                        }
                    }
                    true
                }
                Err(RecvTimeoutError::Timeout) => true,
                Err(RecvTimeoutError::Disconnected) => false,
            };
            if self.reopen.swap(false, Relaxed) {
                self.out = match open(&self.path) {
                    Ok(out) => Some(out),
                    Err(e) => {
                        tracing::error!(path = %self.path.display(), "access log: cannot open it again: {e}; lines are lost until the next SIGHUP");
                        None
                    }
                };
            }
            if !batch.is_empty() {
                let lines = batch.iter().filter(|&&b| b == b'\n').count() as u64;
                if let Some(out) = self.out.as_mut() {
                    match out.write_all(&batch).and_then(|()| out.flush()) {
                        Ok(()) => {
                            self.written.fetch_add(lines, Relaxed);
                        }
                        Err(e) => {
                            tracing::error!(path = %self.path.display(), "access log: cannot write: {e}; lines are lost until the next SIGHUP");
                            self.out = None;
                        }
                    }
                }
                batch.clear();
            }
            if !more {
                return;
            }
        }
    }

    fn format(&self, e: &Entry, out: &mut Vec<u8>) {
        let line = Line {
            time: rfc3339(e.at),
            listener: &self.listener,
            client: e.client.to_string(),
            bytes_in: e.bytes_in,
            bytes_out: e.bytes_out,
            verdict: match e.verdict {
                "reply" | "forward" => e.verdict,
                _ => "drop",
            },
            drop_reason: (!matches!(e.verdict, "reply" | "forward")).then_some(e.verdict),
            guest_us: e.guest_ns as f64 / 1000.0,
            upstream: e.upstream.as_deref(),
            module: crate::guest::short_hex(&e.module),
            role: e.role,
            note: e.note.as_deref(),
        };
        // Serializing plain strings and numbers into a Vec cannot fail.
        if serde_json::to_writer(&mut *out, &line).is_ok() {
            out.push(b'\n');
        }
    }
}

/// `at` as RFC 3339 in UTC with microseconds, `2026-12-07T21:42:09.123456Z`.
fn rfc3339(at: SystemTime) -> String {
    let since = at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        since.subsec_micros()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_in_utc() {
        let at = |secs: u64, micros: u64| SystemTime::UNIX_EPOCH + Duration::from_micros(secs * 1_000_000 + micros);
        assert_eq!(rfc3339(at(0, 0)), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339(at(951_782_400, 5)), "2000-02-29T00:00:00.000005Z");
        assert_eq!(rfc3339(at(1_796_679_729, 123_456)), "2026-12-07T21:42:09.123456Z");
        assert_eq!(rfc3339(at(4_102_444_799, 999_999)), "2099-12-31T23:59:59.999999Z");
    }
}
