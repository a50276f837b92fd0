//! A worker's session sockets: one connected UDP socket per session, registered
//! with the worker's poller under a token derived from the session id. It does
//! what the session table ([`crate::upstream::Sessions`]) asks and says how it
//! went; it decides nothing.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::sync::Arc;

use mio::{Interest, Registry, Token};

use crate::net::batch::RecvBatch;
use crate::net::source_filter::PortCounts;
use crate::net::uring::{SendFate, SendRing};
use crate::upstream::{Applied, Apply, Command, SessionId};

/// The token of the listener socket; session `id` has token `id + 1`.
pub const LISTENER: Token = Token(0);

/// The poller token of session `id`.
pub fn token(id: SessionId) -> Token {
    Token(usize::try_from(id.raw()).map_or(usize::MAX, |raw| raw.saturating_add(1)))
}

/// The session a poller token stands for (none for the listener's).
pub fn session_of(token: Token) -> Option<SessionId> {
    let raw = token.0.checked_sub(1)?;
    Some(SessionId::from_raw(raw as u64))
}

struct Socket {
    socket: mio::net::UdpSocket,
    /// Its local port, registered as one of the gateway's own.
    port: u16,
}

/// One worker's session sockets.
pub struct SessionSockets {
    registry: Registry,
    sockets: HashMap<SessionId, Socket>,
    /// The local ports of every session of the gateway (all workers): clients
    /// with those source ports are never answered.
    ports: Arc<PortCounts>,
    /// Sends the forwards of a turn in one system call: made on the worker's
    /// thread at its first batch of sends; none where io_uring cannot be had.
    ring: Ring,
}

enum Ring {
    Untried,
    Ready(Box<SendRing>),
    Unavailable,
}

impl SessionSockets {
    pub fn new(registry: Registry, ports: Arc<PortCounts>) -> Self {
        Self {
            registry,
            sockets: HashMap::new(),
            ports,
            ring: Ring::Untried,
        }
    }

    /// Whether no session socket is open.
    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// `datagram` on session `id`'s socket, with a `send` of its own.
    fn send(&self, id: SessionId, datagram: &[u8]) -> Applied {
        let Some(s) = self.sockets.get(&id) else {
            return Applied::Failed;
        };
        match s.socket.send(datagram) {
            Ok(_) => Applied::Done,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Applied::Refused,
            Err(_) => Applied::Failed,
        }
    }

    fn open(&mut self, id: SessionId, to: SocketAddr) -> io::Result<()> {
        let socket = connect(to)?;
        let local = socket.local_addr()?;
        let port = local.port();
        let mut socket = mio::net::UdpSocket::from_std(socket);
        self.registry.register(&mut socket, token(id), Interest::READABLE)?;
        self.ports.add_socket(local);
        self.sockets.insert(id, Socket { socket, port });
        Ok(())
    }

    /// Reads up to a batch of what session `id`'s socket holds into `rx` (one
    /// `recvmmsg`): `Ok(0)` when there is nothing more now or the session has no
    /// socket; `ConnectionRefused` when the endpoint answered with ICMP port
    /// unreachable. Other queued socket errors are read past.
    pub fn recv(&mut self, id: SessionId, rx: &mut RecvBatch) -> io::Result<usize> {
        let Some(s) = self.sockets.get(&id) else {
            return Ok(0);
        };
        let mut last = None;
        // A queued error (host unreachable, …) is given once and the next read
        // goes on; one that persists (no memory, a broken socket) is handed up
        // after a few tries rather than tried for ever.
        for _ in 0..RECV_TRIES {
            match rx.recv(&s.socket) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no receive tried")))
    }
}

impl Ring {
    /// The ring, made on its first use (so, on the worker's thread).
    fn get(&mut self) -> Option<&mut SendRing> {
        if matches!(self, Self::Untried) {
            *self = match SendRing::new() {
                Ok(ring) => Self::Ready(Box::new(ring)),
                Err(e) => {
                    tracing::debug!(error = %e, "no io_uring: session datagrams go out one send at a time");
                    Self::Unavailable
                }
            };
        }
        match self {
            Self::Ready(ring) => Some(ring),
            _ => None,
        }
    }
}

impl Apply for SessionSockets {
    /// Does what `command` asks.
    fn apply(&mut self, command: Command<'_>) -> Applied {
        match command {
            Command::Open { id, to } => match self.open(id, to) {
                Ok(()) => Applied::Done,
                Err(_) => Applied::Failed,
            },
            Command::Send { id, datagram } => self.send(id, datagram),
            Command::Close { id } => {
                if let Some(mut s) = self.sockets.remove(&id) {
                    let _ = self.registry.deregister(&mut s.socket);
                    self.ports.remove(s.port);
                }
                Applied::Done
            }
        }
    }

    /// Two sends or more go out in one system call through the ring.
    fn send_all<'b>(
        &mut self,
        sends: impl ExactSizeIterator<Item = (SessionId, &'b [u8])> + Clone,
        fates: &mut Vec<Applied>,
    ) {
        let ring = if sends.len() > 1 { self.ring.get() } else { None };
        let Some(ring) = ring else {
            fates.extend(sends.map(|(id, datagram)| self.send(id, datagram)));
            return;
        };
        let first = fates.len();
        for (id, datagram) in sends {
            // A session without a socket gets a descriptor that fails (EBADF),
            // so that every send keeps its place.
            ring.push(self.sockets.get(&id).map_or(-1, |s| s.socket.as_raw_fd()), datagram);
            fates.push(Applied::Failed);
        }
        let told = ring.submit(|i, fate| {
            if let Some(f) = fates.get_mut(first + i) {
                *f = match fate {
                    SendFate::Sent => Applied::Done,
                    SendFate::Refused => Applied::Refused,
                    SendFate::Failed => Applied::Failed,
                };
            }
        });
        if let Err(e) = told {
            tracing::warn!(error = %e, "io_uring failed: session datagrams go out one send at a time from now on");
            self.ring = Ring::Unavailable;
        }
    }
}

/// Reads of one session socket in a row that may fail with an error other
/// than "refused" before the error is handed up.
const RECV_TRIES: usize = 4;

/// A non-blocking UDP socket connected to `addr`, so that it receives only what
/// `addr` sends and the kernel reports ICMP errors from it.
pub(crate) fn connect(addr: SocketAddr) -> io::Result<UdpSocket> {
    let local: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local)?;
    socket.connect(addr)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use std::os::fd::{FromRawFd as _, IntoRawFd as _};
    use std::time::Duration;

    use super::*;

    #[test]
    fn an_error_that_persists_is_handed_up_after_a_few_tries_not_retried_for_ever() {
        // Before: any error but "refused" was read past, for ever. No UDP
        // socket can be made to fail every receive on demand, so the session's
        // socket here is the read end of a pipe: every recvmmsg fails (ENOTSOCK).
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let poll = mio::Poll::new().unwrap();
            let mut sockets = SessionSockets::new(poll.registry().try_clone().unwrap(), Arc::default());
            let (read, write) = std::io::pipe().unwrap();
            // SAFETY: the descriptor is open and owned from here on (closed on drop).
            let socket = unsafe { UdpSocket::from_raw_fd(read.into_raw_fd()) };
            let id = SessionId::from_raw(7);
            sockets.sockets.insert(
                id,
                Socket {
                    socket: mio::net::UdpSocket::from_std(socket),
                    port: 0,
                },
            );
            let mut rx = RecvBatch::new(4, 2048);
            let result = sockets.recv(id, &mut rx);
            drop(write);
            let _ = done.send(result.map_err(|e| e.raw_os_error()));
        });
        let result = finished
            .recv_timeout(Duration::from_secs(10))
            .expect("the receive loop never ended");
        assert_eq!(result, Err(Some(libc::ENOTSOCK)));
    }
}
