//! Sending the datagrams of a turn on many connected sockets in one system
//! call, with io_uring: `sendmmsg` batches only on one socket, and a worker's
//! forwards each go out on their client's own session socket. Where io_uring
//! is missing or forbidden (old kernels, `kernel.io_uring_disabled`, seccomp in
//! containers), or `WASMGATE_IO_URING=off`, there is no ring and each datagram
//! goes out with its own `send`. docs/PERFORMANCE.md has what it saves.

use std::io;
use std::os::fd::RawFd;

use io_uring::{IoUring, opcode, types};

/// Submission queue entries: sends submitted per system call at most.
const ENTRIES: u32 = 256;

/// A ring for sends, and the bytes of the sends it has in flight: the ring
/// owns them, so that no send can read memory given back meanwhile.
pub struct SendRing {
    ring: IoUring,
    bytes: Vec<u8>,
    /// Where each pending send's datagram is in `bytes`, and its socket.
    pending: Vec<(RawFd, usize, usize)>,
}

/// What became of one send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendFate {
    Sent,
    /// The socket had an ICMP port unreachable to report.
    Refused,
    Failed,
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

    /// Sends what was pushed, in as few system calls as the ring holds, and
    /// says what became of each, in the order pushed. An error means the ring
    /// broke: drop it and send one at a time.
    pub fn submit(&mut self, mut fate: impl FnMut(usize, SendFate)) -> io::Result<()> {
        let pending = std::mem::take(&mut self.pending);
        let result = pending
            .chunks(ENTRIES as usize)
            .enumerate()
            .try_for_each(|(c, chunk)| self.submit_chunk(c * ENTRIES as usize, chunk, &mut fate));
        match result {
            Ok(()) => {
                self.bytes.clear();
                self.pending = pending;
                self.pending.clear();
            }
            // Sends may still be in flight and read `bytes`: never free them.
            Err(_) => std::mem::forget(std::mem::take(&mut self.bytes)),
        }
        result
    }

    fn submit_chunk(
        &mut self,
        first: usize,
        chunk: &[(RawFd, usize, usize)],
        fate: &mut impl FnMut(usize, SendFate),
    ) -> io::Result<()> {
        {
            let mut sq = self.ring.submission();
            for (i, &(fd, start, len)) in chunk.iter().enumerate() {
                // `bytes` no longer grows: the pointers stay valid until every
                // completion is reaped below (or `bytes` is leaked).
                let data = self.bytes[start..start + len].as_ptr();
                let entry = opcode::Send::new(types::Fd(fd), data, len as u32)
                    .build()
                    .user_data((first + i) as u64);
                // SAFETY: the buffer outlives the send (see above); the queue has
                // room for a chunk, since each chunk is reaped before the next.
                unsafe { sq.push(&entry) }.map_err(|_| io::Error::other("the submission queue is full"))?;
            }
        }
        let mut reaped = 0;
        while reaped < chunk.len() {
            match self.ring.submit_and_wait(chunk.len() - reaped) {
                Ok(_) => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
            for cqe in self.ring.completion() {
                reaped += 1;
                let result = cqe.result();
                let index = usize::try_from(cqe.user_data()).unwrap_or(usize::MAX);
                fate(
                    index,
                    match result {
                        r if r >= 0 => SendFate::Sent,
                        r if r == -libc::ECONNREFUSED => SendFate::Refused,
                        _ => SendFate::Failed,
                    },
                );
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
}
