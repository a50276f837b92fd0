//! Batched UDP I/O for Linux: many datagrams per `recvmmsg`/`sendmmsg` system call,
//! into and out of buffers allocated once per worker.
//!
//! Neither std nor socket2 offers these calls, and nix's `sendmmsg` cannot report
//! how many datagrams went out without reading uninitialised memory, so this module
//! calls libc directly. All of its `unsafe` is here, each block saying why it holds.

use std::io;
use std::mem;
use std::net::{SocketAddr, UdpSocket};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::ptr;

use socket2::{SockAddr, SockAddrStorage};

use crate::net::gso::{self, Run};

/// Receives up to `capacity` datagrams per call into preallocated slots.
///
/// Holds raw pointers into its own heap buffers, so it is built on the thread that
/// uses it and never moved across threads (it is `!Send`).
pub struct RecvBatch {
    slot: usize,
    bufs: Vec<u8>,
    names: Vec<libc::sockaddr_storage>,
    iovecs: Vec<libc::iovec>,
    /// One control-message area per datagram, for the `SO_RXQ_OVFL` drop count.
    /// u64s, so that every area is aligned for a `cmsghdr`.
    controls: Vec<u64>,
    headers: Vec<libc::mmsghdr>,
    received: usize,
}

/// Bytes of control-message room per datagram: one `SO_RXQ_OVFL` u32.
fn control_len() -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    unsafe { libc::CMSG_SPACE(mem::size_of::<u32>() as u32) as usize }
}

/// Raises the soft limit on open files (`RLIMIT_NOFILE`) to the hard limit, so
/// that upstream sessions (a socket each) are bounded by `max_sessions`, not by a
/// low default; returns the limit now in force.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok(limit.rlim_cur)
}

/// Asks the kernel to report, with each datagram, how many datagrams it has
/// dropped on this socket because its receive queue was full (`SO_RXQ_OVFL`).
pub fn report_queue_overflows(socket: &UdpSocket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket, option and pointer to an int of the size given.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RXQ_OVFL,
            ptr::from_ref(&on).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

impl RecvBatch {
    /// Datagrams one receive call may take.
    pub fn capacity(&self) -> usize {
        self.headers.len()
    }

    /// `capacity` slots of `slot` bytes each. Pages are only touched when a datagram
    /// that large arrives.
    pub fn new(capacity: usize, slot: usize) -> Self {
        let mut batch = Self {
            slot,
            bufs: vec![0; capacity * slot],
            // SAFETY: all-zero bytes are a valid sockaddr_storage, iovec and mmsghdr.
            names: vec![unsafe { mem::zeroed() }; capacity],
            iovecs: vec![unsafe { mem::zeroed() }; capacity],
            controls: vec![0; capacity * control_len().div_ceil(8)],
            headers: vec![unsafe { mem::zeroed() }; capacity],
            received: 0,
        };
        let control_words = control_len().div_ceil(8);
        // The pointers target the heap buffers of the Vecs above, which never
        // reallocate (nothing is pushed), so they stay valid for the batch's life.
        let base = batch.bufs.as_mut_ptr();
        for i in 0..capacity {
            batch.iovecs[i] = libc::iovec {
                // SAFETY: i * slot < capacity * slot, inside `bufs`.
                iov_base: unsafe { base.add(i * slot) }.cast(),
                iov_len: slot,
            };
            let hdr = &mut batch.headers[i].msg_hdr;
            hdr.msg_name = ptr::from_mut(&mut batch.names[i]).cast();
            hdr.msg_iov = ptr::from_mut(&mut batch.iovecs[i]);
            hdr.msg_iovlen = 1;
            hdr.msg_control = ptr::from_mut(&mut batch.controls[i * control_words]).cast();
        }
        batch
    }

    /// Blocks until at least one datagram arrives (or the socket's read timeout
    /// passes: `WouldBlock`), then takes every waiting datagram up to the capacity.
    pub fn recv(&mut self, socket: &impl AsRawFd) -> io::Result<usize> {
        self.recv_with(socket, libc::MSG_WAITFORONE)
    }

    /// Takes every waiting datagram up to the capacity, without waiting, even
    /// on a blocking socket (`WouldBlock` when there is none).
    pub fn try_recv(&mut self, socket: &impl AsRawFd) -> io::Result<usize> {
        self.recv_with(socket, libc::MSG_DONTWAIT)
    }

    fn recv_with(&mut self, socket: &impl AsRawFd, flags: libc::c_int) -> io::Result<usize> {
        for h in &mut self.headers {
            h.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_controllen = control_len() as _;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        // SAFETY: every header points at a name and an iovec of this batch, each
        // iovec at its own `slot` bytes of `bufs`; all outlive the call, and the
        // count is the headers' length.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                self.headers.as_mut_ptr(),
                self.headers.len() as libc::c_uint,
                flags,
                ptr::null_mut(),
            )
        };
        self.received = 0;
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        self.received = n as usize;
        Ok(self.received)
    }

    /// Datagram `i` of the last [`RecvBatch::recv`]: its bytes and sender. `None`
    /// for a sender that is not an IP address (which a UDP socket never reports).
    pub fn get(&self, i: usize) -> Option<(&[u8], SocketAddr)> {
        if i >= self.received {
            return None;
        }
        let header = &self.headers[i];
        let len = (header.msg_len as usize).min(self.slot);
        let mut storage = SockAddrStorage::zeroed();
        // SAFETY: sockaddr_storage is the platform type SockAddrStorage wraps.
        unsafe { *storage.view_as::<libc::sockaddr_storage>() = self.names[i] };
        // SAFETY: the kernel wrote a valid address of `msg_namelen` bytes.
        let addr = unsafe { SockAddr::new(storage, header.msg_hdr.msg_namelen) };
        let peer = addr.as_socket()?;
        Some((&self.bufs[i * self.slot..i * self.slot + len], peer))
    }
}

impl RecvBatch {
    /// The kernel's count of datagrams dropped on this socket for want of queue
    /// room, as reported with the last datagram received (see
    /// [`report_queue_overflows`]); `None` if it did not say.
    pub fn queue_overflows(&self) -> Option<u32> {
        let header = &self.headers[self.received.checked_sub(1)?].msg_hdr;
        // SAFETY: the kernel filled `msg_controllen` bytes of this header's own
        // control area; CMSG_FIRSTHDR/NXTHDR stay within it, and the data of an
        // SO_RXQ_OVFL message is one u32, read unaligned.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(header);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SO_RXQ_OVFL {
                    return Some(ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<u32>()));
                }
                cmsg = libc::CMSG_NXTHDR(header, cmsg);
            }
        }
        None
    }
}

/// Collects replies (copied out of guest memory) and sends them with one
/// `sendmmsg` call per flush; a flush's replies of one size to one client go
/// as one run ([`gso`]).
pub struct SendBatch {
    /// Replies queued before the batch counts as full and must be flushed.
    capacity: usize,
    data: Vec<u8>,
    entries: Vec<Entry>,
    /// The entries in sending order: each client's together, in the order queued.
    order: Vec<usize>,
    runs: Vec<Run>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
    /// One `UDP_SEGMENT` control area per run, in u64s for alignment.
    controls: Vec<u64>,
    /// Whether runs are sent; off once a refusal said no path takes them.
    gso: bool,
}

struct Entry {
    range: Range<usize>,
    /// `peer` as the kernel takes it: a header's name points here.
    addr: SockAddr,
    peer: SocketAddr,
}

/// What happened to one queued reply.
pub enum Sent {
    Ok { bytes: usize },
    Failed { peer: SocketAddr, error: io::Error },
}

impl SendBatch {
    /// Room for `capacity` replies of up to `max_len` bytes each.
    pub fn new(capacity: usize, max_len: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            data: Vec::with_capacity(capacity * max_len),
            entries: Vec::with_capacity(capacity),
            order: Vec::with_capacity(capacity),
            runs: Vec::with_capacity(capacity),
            iovecs: Vec::with_capacity(capacity),
            headers: Vec::with_capacity(capacity),
            controls: Vec::with_capacity(capacity * gso::control_words()),
            gso: gso::enabled(),
        }
    }

    /// Whether as many replies are queued as one flush is meant to send: the
    /// caller flushes before queueing more, so memory stays what `new` took.
    pub fn is_full(&self) -> bool {
        self.entries.len() >= self.capacity
    }

    /// Queues a copy of `reply` for `peer`.
    pub fn push(&mut self, reply: &[u8], peer: SocketAddr) {
        self.push_with(reply, peer, |_| {});
    }

    /// Queues `reply` to `peer` behind what `prefix` appends (a header).
    pub fn push_with(&mut self, reply: &[u8], peer: SocketAddr, prefix: impl FnOnce(&mut Vec<u8>)) {
        let start = self.data.len();
        prefix(&mut self.data);
        self.data.extend_from_slice(reply);
        self.entries.push(Entry {
            range: start..self.data.len(),
            addr: SockAddr::from(peer),
            peer,
        });
    }

    /// Sends everything queued, each client's replies in the order queued, and
    /// reports each reply's fate to `done`. A reply the kernel refuses is
    /// reported and skipped; the rest still go out.
    pub fn flush(&mut self, socket: &UdpSocket, mut done: impl FnMut(Sent)) {
        if self.entries.is_empty() {
            return;
        }
        self.plan();
        let mut next = 0;
        while next < self.runs.len() {
            // SAFETY: headers[next..] point at names in `entries`, iovecs into
            // `data` and control areas in `controls`, none of which change
            // until this loop ends.
            let sent = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    self.headers[next..].as_mut_ptr(),
                    (self.runs.len() - next) as libc::c_uint,
                    0,
                )
            };
            if sent < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // The first remaining run failed: its replies go again one by
                // one if it was a run the path refused, else are reported.
                let run = self.runs[next];
                let errno = error.raw_os_error().unwrap_or(0);
                let refusal = if run.count > 1 { gso::refusal(errno) } else { None };
                if let Some(refusal) = refusal {
                    if refusal == gso::Refusal::Everywhere && self.gso {
                        tracing::warn!(%error, "UDP segmentation offload refused: replies go out one datagram at a time from now on");
                        self.gso = false;
                    }
                    for &i in &self.order[run.start..run.start + run.count] {
                        let entry = &self.entries[i];
                        done(match socket.send_to(&self.data[entry.range.clone()], entry.peer) {
                            Ok(bytes) => Sent::Ok { bytes },
                            Err(error) => Sent::Failed {
                                peer: entry.peer,
                                error,
                            },
                        });
                    }
                } else {
                    for &i in &self.order[run.start..run.start + run.count] {
                        done(Sent::Failed {
                            peer: self.entries[i].peer,
                            error: io::Error::from_raw_os_error(errno),
                        });
                    }
                }
                next += 1;
            } else {
                for run in &self.runs[next..next + sent as usize] {
                    for &i in &self.order[run.start..run.start + run.count] {
                        done(Sent::Ok {
                            bytes: self.entries[i].range.len(),
                        });
                    }
                }
                next += sent as usize;
            }
        }
        self.data.clear();
        self.entries.clear();
    }

    /// Orders the queued replies by client (keeping each one's order), splits
    /// them into runs, and builds a header per run; done after all pushes,
    /// since `data` may have grown while queueing.
    fn plan(&mut self) {
        let Self {
            data,
            entries,
            order,
            runs,
            iovecs,
            headers,
            controls,
            gso,
            ..
        } = self;
        gso::plan(
            entries.len(),
            *gso,
            |i| entries[i].peer,
            |i| entries[i].range.len(),
            order,
            runs,
        );
        iovecs.clear();
        iovecs.extend(order.iter().map(|&i| libc::iovec {
            iov_base: data[entries[i].range.clone()].as_ptr().cast_mut().cast(),
            iov_len: entries[i].range.len(),
        }));
        let words = gso::control_words();
        controls.clear();
        controls.resize(runs.len() * words, 0);
        headers.clear();
        for (k, run) in runs.iter().enumerate() {
            let addr = &entries[order[run.start]].addr;
            // SAFETY: all-zero bytes are a valid mmsghdr.
            let mut header: libc::mmsghdr = unsafe { mem::zeroed() };
            // sendmmsg only reads the name, the data and the control message.
            header.msg_hdr.msg_name = addr.as_ptr().cast_mut().cast();
            header.msg_hdr.msg_namelen = addr.len();
            header.msg_hdr.msg_iov = ptr::from_ref(&iovecs[run.start]).cast_mut();
            header.msg_hdr.msg_iovlen = run.count as _;
            if run.count > 1 {
                // A run's segment is at most gso::MAX_SEGMENT, so it fits a u16.
                let segment = u16::try_from(run.segment).unwrap_or(u16::MAX);
                gso::set_segment(&mut header.msg_hdr, &mut controls[k * words..(k + 1) * words], segment);
            }
            headers.push(header);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::gso::testing::{recv_run, set_int};
    use std::time::Duration;

    fn pair() -> (UdpSocket, UdpSocket) {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (a, b)
    }

    fn recv(socket: &UdpSocket) -> Vec<u8> {
        let mut buf = [0u8; 64];
        let n = socket.recv(&mut buf).unwrap();
        buf[..n].to_vec()
    }

    #[test]
    fn a_batch_receives_several_datagrams_with_their_senders_and_boundaries() {
        let (server, client) = pair();
        let to = server.local_addr().unwrap();
        for msg in [&b"one"[..], b"", b"three"] {
            client.send_to(msg, to).unwrap();
        }
        let mut batch = RecvBatch::new(8, 16);
        let mut got = Vec::new();
        while got.len() < 3 {
            let n = batch.recv(&server).unwrap();
            for i in 0..n {
                let (data, peer) = batch.get(i).unwrap();
                assert_eq!(peer, client.local_addr().unwrap());
                got.push(data.to_vec());
            }
        }
        assert_eq!(got, [&b"one"[..], b"", b"three"]);
        assert!(batch.get(3).is_none());
    }

    #[test]
    fn a_batch_sends_each_reply_to_its_own_peer_in_order() {
        let (server, a) = pair();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut batch = SendBatch::new(4, 16);
        batch.push(b"to a 1", a.local_addr().unwrap());
        batch.push(b"to b", b.local_addr().unwrap());
        batch.push(b"", a.local_addr().unwrap());
        let mut sent = 0;
        batch.flush(&server, |s| {
            assert!(matches!(s, Sent::Ok { .. }));
            sent += 1;
        });
        assert_eq!(sent, 3);
        assert_eq!(recv(&a), b"to a 1");
        assert_eq!(recv(&a), b"");
        assert_eq!(recv(&b), b"to b");
    }

    #[test]
    fn replies_of_one_size_to_one_client_go_as_one_run_and_arrive_as_sent() {
        let (server, a) = pair();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // `b` takes runs whole, which shows that one was sent; `a` does not,
        // and gets each datagram on its own, in order.
        set_int(&b, libc::SOL_UDP, libc::UDP_GRO, 1);
        let (to_a, to_b) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let mut batch = SendBatch::new(16, 16);
        batch.gso = true;
        for i in 0..4u8 {
            batch.push(&[b'a', i], to_a);
            batch.push(&[b'b', i, 0], to_b);
        }
        batch.push(b"z", to_a);
        let mut sent = 0;
        batch.flush(&server, |s| {
            assert!(matches!(s, Sent::Ok { .. }));
            sent += 1;
        });
        assert_eq!(sent, 9);
        for i in 0..4u8 {
            assert_eq!(recv(&a), [b'a', i]);
        }
        assert_eq!(recv(&a), b"z");
        let (bytes, segment) = recv_run(&b);
        assert_eq!(segment, Some(3), "the four replies to b went as one run");
        assert_eq!(bytes, [b'b', 0, 0, b'b', 1, 0, b'b', 2, 0, b'b', 3, 0]);
    }

    #[test]
    fn a_run_the_path_refuses_goes_again_one_datagram_at_a_time() {
        // An IPv6 socket told its path MTU is 1,280 bytes: a run of 1,400-byte
        // segments is refused (EINVAL); one datagram alone goes in fragments.
        let server = UdpSocket::bind("[::1]:0").unwrap();
        set_int(&server, libc::IPPROTO_IPV6, libc::IPV6_MTU, 1280);
        let a = UdpSocket::bind("[::1]:0").unwrap();
        a.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut batch = SendBatch::new(4, 1400);
        batch.gso = true;
        for i in 0..3u8 {
            batch.push(&[i; 1400], a.local_addr().unwrap());
        }
        let mut bytes = Vec::new();
        batch.flush(&server, |s| match s {
            Sent::Ok { bytes: n } => bytes.push(n),
            Sent::Failed { error, .. } => panic!("a reply failed: {error}"),
        });
        assert_eq!(bytes, [1400; 3]);
        let mut buf = [0u8; 2048];
        for i in 0..3u8 {
            let n = a.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], &[i; 1400][..]);
        }
        assert!(batch.gso, "a refusal for this path leaves runs on for others");
    }

    #[test]
    fn a_refused_reply_is_reported_and_the_rest_still_go_out() {
        let (server, a) = pair();
        let mut batch = SendBatch::new(3, 70_000);
        // Over the 65,507-byte IPv4 limit: the kernel says EMSGSIZE.
        batch.push(&vec![0u8; 66_000], a.local_addr().unwrap());
        batch.push(b"after", a.local_addr().unwrap());
        let (mut ok, mut failed) = (0, 0);
        batch.flush(&server, |s| match s {
            Sent::Ok { .. } => ok += 1,
            Sent::Failed { .. } => failed += 1,
        });
        assert_eq!((ok, failed), (1, 1));
        assert_eq!(recv(&a), b"after");
    }
}
