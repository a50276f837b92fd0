//! UDP generic segmentation offload (`UDP_SEGMENT`, Linux 4.18+): a run of
//! datagrams of one size to one destination goes down the stack as one
//! buffer, and the kernel cuts it into the datagrams at the last moment (the
//! NIC, or the receiving socket on loopback), so each datagram after the first
//! costs a copy, not a trip through the stack. The receiver sees the datagrams
//! as sent. Where the path refuses a run (no checksum offload: `EIO`; a path
//! MTU under the segment: `EINVAL`), its datagrams go again one by one
//! ([`refusal`]).
//! `WASMGATE_GSO=off` sends every datagram alone.

use std::mem;

/// Datagrams per run at most (the kernel's limit was 64 before Linux 5.5).
pub const MAX_SEGMENTS: usize = 64;

/// The largest datagram sent in a run: one that fits a 1,500-byte MTU in IPv6
/// (1500 − 40 − 8), so that a run never needs IP fragments on Ethernet.
pub const MAX_SEGMENT: usize = 1452;

/// Bytes per run at most: under the 65,507 bytes one IPv4 datagram can carry.
pub const MAX_BYTES: usize = 65_000;

/// One run: `count` datagrams taken from `start` in the sending order, each of
/// `segment` bytes but the last, which may be shorter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub start: usize,
    pub count: usize,
    pub segment: usize,
}

/// Whether runs are sent: where the kernel knows `UDP_SEGMENT`, unless
/// `WASMGATE_GSO` says `off` or `0`. Asked once per process.
pub fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| {
        if std::env::var("WASMGATE_GSO").is_ok_and(|v| v == "off" || v == "0") {
            return false;
        }
        let known = kernel_knows_segments();
        if !known {
            tracing::debug!("the kernel has no UDP segmentation offload: every datagram goes out alone");
        }
        known
    })
}

/// Whether the kernel knows `UDP_SEGMENT` (Linux 4.18+). An older one would
/// not refuse the control message but ignore it, and send a run as one
/// datagram: so ask, rather than learn from a failed send.
fn kernel_knows_segments() -> bool {
    let Ok(socket) = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0)) else {
        return false;
    };
    let mut value: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid socket, and a pointer to an int with its size.
    let r = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            std::ptr::from_mut(&mut value).cast(),
            &raw mut len,
        )
    };
    r == 0
}

/// Puts `count` datagrams in sending order, each destination's together in
/// the order queued (a stable sort by `to`), and splits them into runs; with
/// runs off (`on` false), each datagram is a run of its own, in the order queued.
pub fn plan<K: Ord>(
    count: usize,
    on: bool,
    to: impl Fn(usize) -> K,
    len: impl Fn(usize) -> usize,
    order: &mut Vec<usize>,
    out: &mut Vec<Run>,
) {
    order.clear();
    order.extend(0..count);
    if on {
        order.sort_by_key(|&i| to(i));
        runs(order.iter().map(|&i| len(i)), |a, b| to(order[a]) == to(order[b]), out);
    } else {
        out.clear();
        out.extend(order.iter().map(|&i| Run {
            start: i,
            count: 1,
            segment: len(i),
        }));
    }
}

/// Splits datagrams, in sending order, into runs: consecutive datagrams that
/// `same` says share a destination, all `segment` bytes but a shorter last.
/// An empty datagram, or one over [`MAX_SEGMENT`], is a run of its own.
pub fn runs(lens: impl IntoIterator<Item = usize>, mut same: impl FnMut(usize, usize) -> bool, out: &mut Vec<Run>) {
    out.clear();
    let mut open: Option<(Run, usize)> = None;
    for (i, len) in lens.into_iter().enumerate() {
        if let Some((run, bytes)) = &mut open {
            // A run closes after a shorter datagram: only the last may be short.
            if *bytes == run.count * run.segment
                && len > 0
                && len <= run.segment
                && run.count < MAX_SEGMENTS
                && *bytes + len <= MAX_BYTES
                && same(run.start, i)
            {
                run.count += 1;
                *bytes += len;
                continue;
            }
            out.push(*run);
        }
        open = Some((
            Run {
                start: i,
                count: 1,
                segment: len,
            },
            len,
        ));
        if (len == 0 || len > MAX_SEGMENT)
            && let Some((run, _)) = open.take()
        {
            out.push(run);
        }
    }
    if let Some((run, _)) = open {
        out.push(run);
    }
}

/// u64 words of control-message room for one `UDP_SEGMENT` message, so that
/// an area made of them is aligned for a `cmsghdr`.
pub fn control_words() -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    (unsafe { libc::CMSG_SPACE(mem::size_of::<u16>() as u32) } as usize).div_ceil(8)
}

/// Writes the `UDP_SEGMENT` control message for `segment`-byte datagrams into
/// `area` and points `header` at it.
pub fn set_segment(header: &mut libc::msghdr, area: &mut [u64], segment: u16) {
    debug_assert!(area.len() >= control_words());
    header.msg_control = area.as_mut_ptr().cast();
    header.msg_controllen = (area.len() * 8) as _;
    // SAFETY: the header's control area is `area`, which CMSG_SPACE(u16) fits;
    // CMSG_FIRSTHDR is its start, and the u16 goes at CMSG_DATA, unaligned-safe.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(header);
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = libc::UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(mem::size_of::<u16>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment);
        header.msg_controllen = libc::CMSG_SPACE(mem::size_of::<u16>() as u32) as _;
    }
}

/// What a run's failure says about runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// This path takes none (an MTU under the segment): send its datagrams
    /// again one by one, and keep making runs for other paths.
    Path,
    /// No path from here takes any (no checksum offload, no support): send
    /// them again one by one, and make no more runs.
    Everywhere,
}

/// What a run's failure with `errno` says; `None` when it says nothing about
/// runs (the datagrams themselves could not go), so they are reported failed.
pub fn refusal(errno: i32) -> Option<Refusal> {
    match errno {
        libc::EINVAL | libc::EMSGSIZE => Some(Refusal::Path),
        libc::EIO | libc::ENOPROTOOPT | libc::EOPNOTSUPP => Some(Refusal::Everywhere),
        _ => None,
    }
}

/// Socket helpers for tests of runs.
#[cfg(test)]
pub(crate) mod testing {
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd as _;
    use std::{io, mem, ptr};

    pub(crate) fn set_int(socket: &UdpSocket, level: libc::c_int, name: libc::c_int, value: libc::c_int) {
        // SAFETY: a valid socket and a pointer to an int of the size given.
        let r = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                level,
                name,
                ptr::from_ref(&value).cast(),
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
    }

    /// One read from a socket that takes runs whole (`UDP_GRO`): the bytes,
    /// and the segment size the kernel reports if a run arrived.
    pub(crate) fn recv_run(socket: &UdpSocket) -> (Vec<u8>, Option<i32>) {
        let mut buf = vec![0u8; 65_536];
        let mut control = [0u64; 8];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: all-zero bytes are a valid msghdr; the pointers set below
        // target live locals, and recvmsg writes within the lengths given.
        let mut header: libc::msghdr = unsafe { mem::zeroed() };
        header.msg_iov = &raw mut iov;
        header.msg_iovlen = 1;
        header.msg_control = control.as_mut_ptr().cast();
        header.msg_controllen = mem::size_of_val(&control) as _;
        let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &raw mut header, 0) };
        assert!(n >= 0, "{}", io::Error::last_os_error());
        let mut segment = None;
        // SAFETY: the kernel filled `msg_controllen` bytes of `control`.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&raw const header);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == libc::UDP_GRO {
                    segment = Some(ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>()));
                }
                cmsg = libc::CMSG_NXTHDR(&raw const header, cmsg);
            }
        }
        buf.truncate(n as usize);
        (buf, segment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(lens: &[usize], dest: &[u8]) -> Vec<(usize, usize, usize)> {
        let mut out = Vec::new();
        runs(lens.iter().copied(), |a, b| dest[a] == dest[b], &mut out);
        out.iter().map(|r| (r.start, r.count, r.segment)).collect()
    }

    #[test]
    fn a_refusal_says_whether_one_path_or_every_path_takes_no_runs() {
        assert_eq!(refusal(libc::EINVAL), Some(Refusal::Path));
        assert_eq!(refusal(libc::EMSGSIZE), Some(Refusal::Path));
        assert_eq!(refusal(libc::EIO), Some(Refusal::Everywhere));
        assert_eq!(refusal(libc::EOPNOTSUPP), Some(Refusal::Everywhere));
        // A full buffer or a refused port is about the datagrams, not runs.
        assert_eq!(refusal(libc::ENOBUFS), None);
        assert_eq!(refusal(libc::ECONNREFUSED), None);
    }

    #[test]
    fn this_kernel_knows_segments() {
        // The project's machines run Linux 6: runs are on unless turned off.
        assert!(kernel_knows_segments());
    }

    #[test]
    fn equal_datagrams_to_one_destination_make_one_run_and_a_short_one_ends_it() {
        assert_eq!(split(&[64, 64, 64, 10, 64], &[0; 5]), [(0, 4, 64), (4, 1, 64)]);
    }

    #[test]
    fn a_new_destination_a_longer_datagram_or_an_empty_one_starts_a_new_run() {
        assert_eq!(
            split(&[64, 64, 64, 100, 0, 5, 5], &[0, 0, 1, 1, 1, 1, 1]),
            [(0, 2, 64), (2, 1, 64), (3, 1, 100), (4, 1, 0), (5, 2, 5)]
        );
    }

    #[test]
    fn runs_stop_at_the_segment_count_the_byte_limit_and_the_segment_size() {
        let many = vec![10; MAX_SEGMENTS + 1];
        assert_eq!(
            split(&many, &vec![0; many.len()]),
            [(0, MAX_SEGMENTS, 10), (MAX_SEGMENTS, 1, 10)]
        );
        let big = vec![MAX_SEGMENT; 50];
        let per_run = MAX_BYTES / MAX_SEGMENT;
        assert_eq!(
            split(&big, &[0; 50]),
            [(0, per_run, MAX_SEGMENT), (per_run, 50 - per_run, MAX_SEGMENT)]
        );
        let jumbo = [MAX_SEGMENT + 1, MAX_SEGMENT + 1];
        assert_eq!(
            split(&jumbo, &[0; 2]),
            [(0, 1, MAX_SEGMENT + 1), (1, 1, MAX_SEGMENT + 1)]
        );
    }
}
