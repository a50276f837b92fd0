//! Sending the datagrams of a turn on many connected sockets in one system
//! call, with io_uring: `sendmmsg` batches only on one socket, and a worker's
//! forwards each go out on their client's own session socket. Where io_uring
//! is missing or forbidden (old kernels, `kernel.io_uring_disabled`, seccomp in
//! containers), or `WASMGATE_IO_URING=off`, there is no ring and each datagram
//! goes out with its own `send`. docs/PERFORMANCE.md has what it saves.

use std::io;
use std::os::fd::RawFd;

use io_uring::{IoUring, opcode, types};

use crate::net::gso::{self, Run};

/// Submission queue entries: sends submitted per system call at most.
const ENTRIES: u32 = 256;

/// A ring for sends, and the bytes of the sends it has in flight: the ring
/// owns them, so that no send can read memory given back meanwhile.
pub struct SendRing {
    ring: IoUring,
    bytes: Vec<u8>,
    /// Where each pending send's datagram is in `bytes`, and its socket.
    pending: Vec<(RawFd, usize, usize)>,
    /// The pending sends in sending order: each socket's together.
    order: Vec<usize>,
    /// Runs of `order` that go out as one send ([`gso`]).
    runs: Vec<Run>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::msghdr>,
    controls: Vec<u64>,
    /// Whether runs are sent; off once a refusal said no path takes them.
    gso: bool,
}

// SAFETY: the raw pointers in `iovecs` and `headers` point into the ring's own
// `bytes`, `iovecs` and `controls`; they are rebuilt by each submit before the
// kernel reads them, and a ring (made on the worker's thread) is only ever used
// by that thread. Between submits they are stale and nothing reads them.
unsafe impl Send for SendRing {}

/// What became of one send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendFate {
    Sent,
    /// The socket had an ICMP port unreachable to report.
    Refused,
    Failed,
}

impl SendFate {
    fn of(result: i32) -> Self {
        match result {
            r if r >= 0 => Self::Sent,
            r if r == -libc::ECONNREFUSED => Self::Refused,
            _ => Self::Failed,
        }
    }
}

impl SendRing {
    /// A ring for the calling thread alone, or why there is none (then send
    /// one at a time). Make it on the thread that submits: its completions are
    /// reaped only when that thread asks (`DEFER_TASKRUN`), never by
    /// interrupting it or another thread of the process (without these flags,
    /// blocking calls of other threads failed with EINTR).
    pub fn new() -> io::Result<Self> {
        if std::env::var("WASMGATE_IO_URING").is_ok_and(|v| v == "off" || v == "0") {
            return Err(io::Error::other("turned off by WASMGATE_IO_URING"));
        }
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(ENTRIES)?;
        Ok(Self {
            ring,
            bytes: Vec::new(),
            pending: Vec::new(),
            order: Vec::new(),
            runs: Vec::new(),
            iovecs: Vec::new(),
            headers: Vec::new(),
            controls: Vec::new(),
            gso: gso::enabled(),
        })
    }

    /// Sends `datagram` on the connected socket `fd` with the next [`SendRing::submit`].
    pub fn push(&mut self, fd: RawFd, datagram: &[u8]) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(datagram);
        self.pending.push((fd, start, datagram.len()));
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Sends what was pushed, each socket's datagrams in the order pushed and
    /// those of one size as runs, in as few system calls as the ring holds,
    /// and says what became of each by its place in the order pushed. An error
    /// means the ring broke: drop it and send one at a time.
    pub fn submit(&mut self, mut fate: impl FnMut(usize, SendFate)) -> io::Result<()> {
        self.plan();
        let mut result = Ok(());
        let mut first = 0;
        while first < self.runs.len() {
            let end = (first + ENTRIES as usize).min(self.runs.len());
            result = self.submit_runs(first..end, &mut fate);
            if result.is_err() {
                break;
            }
            first = end;
        }
        match result {
            Ok(()) => {
                self.bytes.clear();
                self.pending.clear();
            }
            // Sends may still be in flight and read `bytes`, the iovecs, the
            // headers: never free them.
            Err(_) => {
                std::mem::forget(std::mem::take(&mut self.bytes));
                std::mem::forget(std::mem::take(&mut self.iovecs));
                std::mem::forget(std::mem::take(&mut self.headers));
                std::mem::forget(std::mem::take(&mut self.controls));
            }
        }
        result
    }

    /// Orders the pending sends by socket (keeping each one's order), splits
    /// them into runs and builds a header for each run of two or more.
    fn plan(&mut self) {
        let Self {
            bytes,
            pending,
            order,
            runs,
            iovecs,
            headers,
            controls,
            gso,
            ..
        } = self;
        gso::plan(pending.len(), *gso, |i| pending[i].0, |i| pending[i].2, order, runs);
        iovecs.clear();
        iovecs.extend(order.iter().map(|&i| {
            let (_, start, len) = pending[i];
            libc::iovec {
                iov_base: bytes[start..start + len].as_ptr().cast_mut().cast(),
                iov_len: len,
            }
        }));
        let words = gso::control_words();
        controls.clear();
        controls.resize(runs.len() * words, 0);
        headers.clear();
        for (k, run) in runs.iter().enumerate() {
            // SAFETY: all-zero bytes are a valid msghdr (no name: connected sockets).
            let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
            header.msg_iov = std::ptr::from_ref(&iovecs[run.start]).cast_mut();
            header.msg_iovlen = run.count as _;
            if run.count > 1 {
                let segment = u16::try_from(run.segment).unwrap_or(u16::MAX);
                gso::set_segment(&mut header, &mut controls[k * words..(k + 1) * words], segment);
            }
            headers.push(header);
        }
    }

    fn submit_runs(&mut self, runs: std::ops::Range<usize>, fate: &mut impl FnMut(usize, SendFate)) -> io::Result<()> {
        {
            let mut sq = self.ring.submission();
            for k in runs.clone() {
                let run = self.runs[k];
                let fd = types::Fd(self.pending[self.order[run.start]].0);
                // Nothing grows until every completion is reaped below (or the
                // buffers are leaked): the pointers stay valid meanwhile.
                let entry = if run.count == 1 {
                    let iovec = self.iovecs[run.start];
                    opcode::Send::new(fd, iovec.iov_base.cast_const().cast(), iovec.iov_len as u32).build()
                } else {
                    opcode::SendMsg::new(fd, &raw const self.headers[k]).build()
                };
                // SAFETY: the buffers outlive the send (see above); the queue has
                // room for a chunk, since each chunk is reaped before the next.
                unsafe { sq.push(&entry.user_data(k as u64)) }
                    .map_err(|_| io::Error::other("the submission queue is full"))?;
            }
        }
        let mut reaped = 0;
        let mut failed_runs = Vec::new();
        while reaped < runs.len() {
            match self.ring.submit_and_wait(runs.len() - reaped) {
                Ok(_) => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
            for cqe in self.ring.completion() {
                reaped += 1;
                let Some(run) = usize::try_from(cqe.user_data()).ok().and_then(|k| self.runs.get(k)) else {
                    continue;
                };
                let result = cqe.result();
                if run.count > 1
                    && result < 0
                    && let Some(refusal) = gso::refusal(-result)
                {
                    failed_runs.push((*run, refusal));
                    continue;
                }
                for &i in &self.order[run.start..run.start + run.count] {
                    fate(i, SendFate::of(result));
                }
            }
        }
        // A run the path refused goes again, one send per datagram.
        for (run, refusal) in failed_runs {
            if refusal == gso::Refusal::Everywhere && self.gso {
                tracing::warn!("UDP segmentation offload refused: forwards go out one datagram at a time from now on");
                self.gso = false;
            }
            for j in run.start..run.start + run.count {
                let (fd, iovec) = (self.pending[self.order[j]].0, self.iovecs[j]);
                // SAFETY: the iovec points at this datagram's bytes in `bytes`.
                let sent = unsafe { libc::send(fd, iovec.iov_base, iovec.iov_len, 0) };
                let result = if sent < 0 {
                    -io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
                } else {
                    0
                };
                fate(self.order[j], SendFate::of(result));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd as _;
    use std::time::Duration;

    use super::*;
    use crate::net::gso::testing::{recv_run, set_int};

    #[test]
    fn sends_on_many_sockets_arrive_and_each_fate_is_told_in_order() {
        let Ok(mut ring) = SendRing::new() else {
            eprintln!("SKIPPED: io_uring is not available here");
            return;
        };
        // Two upstreams, so that each one's receive buffer holds its share.
        let upstreams: Vec<UdpSocket> = (0..2).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
        for u in &upstreams {
            u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        // A port nothing listens on: its socket learns so from ICMP.
        let closed = UdpSocket::bind("127.0.0.1:0").unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        let refusing = UdpSocket::bind("127.0.0.1:0").unwrap();
        refusing.connect(closed_addr).unwrap();
        refusing.send(b"x").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let sockets: Vec<UdpSocket> = (0..300)
            .map(|i| {
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                s.connect(upstreams[i % 2].local_addr().unwrap()).unwrap();
                s
            })
            .collect();
        // More than a chunk, a refusing socket among them, and a closed descriptor.
        for (i, s) in sockets.iter().enumerate() {
            ring.push(s.as_raw_fd(), format!("d{i}").as_bytes());
            if i == 10 {
                ring.push(refusing.as_raw_fd(), b"refused");
                ring.push(-1, b"no socket");
            }
        }
        let mut fates = Vec::new();
        ring.submit(|i, f| fates.push((i, f))).unwrap();
        fates.sort_by_key(|(i, _)| *i);
        assert_eq!(fates.len(), 302);
        assert_eq!(fates[11], (11, SendFate::Refused));
        assert_eq!(fates[12], (12, SendFate::Failed));
        assert!(
            fates
                .iter()
                .filter(|(i, _)| *i != 11 && *i != 12)
                .all(|(_, f)| *f == SendFate::Sent)
        );
        let mut seen = std::collections::HashSet::new();
        let mut buf = [0u8; 16];
        for u in &upstreams {
            for _ in 0..150 {
                let n = u.recv(&mut buf).unwrap();
                seen.insert(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        assert!((0..300).all(|i| seen.contains(&format!("d{i}"))));
        assert!(ring.is_empty(), "ready for the next turn");
    }

    #[test]
    fn a_sockets_datagrams_of_one_size_go_as_one_run_and_a_refused_run_goes_again_alone() {
        let Ok(mut ring) = SendRing::new() else {
            eprintln!("SKIPPED: io_uring is not available here");
            return;
        };
        ring.gso = true;
        // The upstream takes runs whole (UDP_GRO), which shows that one was sent.
        let upstream = UdpSocket::bind("127.0.0.1:0").unwrap();
        upstream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        set_int(&upstream, libc::SOL_UDP, libc::UDP_GRO, 1);
        let session = UdpSocket::bind("127.0.0.1:0").unwrap();
        session.connect(upstream.local_addr().unwrap()).unwrap();
        // A path whose MTU (1,280) is under the segment: its run is refused.
        let small = UdpSocket::bind("[::1]:0").unwrap();
        small.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let narrow = UdpSocket::bind("[::1]:0").unwrap();
        set_int(&narrow, libc::IPPROTO_IPV6, libc::IPV6_MTU, 1280);
        narrow.connect(small.local_addr().unwrap()).unwrap();
        for i in 0..3u8 {
            ring.push(session.as_raw_fd(), &[i; 8]);
            ring.push(narrow.as_raw_fd(), &[i; 1400]);
        }
        ring.push(session.as_raw_fd(), b"tail");
        let mut fates = Vec::new();
        ring.submit(|i, f| fates.push((i, f))).unwrap();
        fates.sort_by_key(|(i, _)| *i);
        assert_eq!(fates, (0..7).map(|i| (i, SendFate::Sent)).collect::<Vec<_>>());
        let (bytes, segment) = recv_run(&upstream);
        assert_eq!(segment, Some(8), "the session's four datagrams went as one run");
        assert_eq!(bytes, [&[0u8; 8][..], &[1; 8], &[2; 8], b"tail"].concat());
        let mut buf = [0u8; 2048];
        for i in 0..3u8 {
            let n = small.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], &[i; 1400][..], "sent again one at a time, in order");
        }
        assert!(ring.gso, "a refusal for one path leaves runs on for others");
    }
}
