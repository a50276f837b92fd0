//! The active health checks' socket side: one thread per listener sends the
//! probes [`Checks`] finds due, each endpoint from a socket of its own
//! connected to it (a session socket in all but name: its port is one of the
//! gateway's own, never answered as a client), and hands back what came of
//! them. The verdicts are in the endpoints' shared health, which every
//! worker reads at once.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};

use crate::net::sessions::connect;
use crate::net::source_filter::PortCounts;
use crate::upstream::Pools;
use crate::upstream::health::{Checks, Failure, ProbeWriter};

/// How often the thread looks at the stop flag and at reloaded pools.
const LOOK_EVERY: Duration = Duration::from_millis(100);

/// One endpoint's probe socket.
struct ProbeSocket {
    socket: mio::net::UdpSocket,
    port: u16,
}

/// Starts the prober of a listener: `pools` gives the pools in use (they may
/// be reloaded), `ports` holds the gateway's own ports, and it ends once
/// `stopped` says so.
pub fn spawn(
    pools: impl Fn() -> Option<Arc<Pools>> + Send + 'static,
    ports: Arc<PortCounts>,
    stopped: impl Fn() -> bool + Send + 'static,
    mut writer: Box<dyn ProbeWriter + Send>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("wasmgate-prober".into())
        .spawn(move || {
            if let Err(e) = run(&pools, &ports, &stopped, &mut *writer) {
                tracing::error!(error = %e, "the health checker stopped: endpoints are no longer probed");
            }
        })
}

fn run(
    pools: &dyn Fn() -> Option<Arc<Pools>>,
    ports: &PortCounts,
    stopped: &dyn Fn() -> bool,
    writer: &mut dyn ProbeWriter,
) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(64);
    let mut checks = Checks::new();
    let mut sockets: HashMap<u64, ProbeSocket> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    while !stopped() {
        let Some(current) = pools() else { break };
        let now = Instant::now();
        checks.sync(&current, now);
        // Sockets of endpoints no longer checked are closed.
        let kept: std::collections::HashSet<u64> = checks.ids().collect();
        sockets.retain(|id, s| {
            let keep = kept.contains(id);
            if !keep {
                let _ = poll.registry().deregister(&mut s.socket);
                ports.remove(s.port);
            }
            keep
        });
        for (id, to, datagram) in checks.due(&current, now, writer) {
            let sent = match sockets.get(&id) {
                Some(s) => s.socket.send(&datagram).map(drop),
                None => open(&poll, id, to, ports).and_then(|s| {
                    let sent = s.socket.send(&datagram).map(drop);
                    sockets.insert(id, s);
                    sent
                }),
            };
            if sent.is_err() {
                checks.failed(&current, id, Failure::Refused, now);
            }
        }
        let wait = checks
            .next_wake()
            .map_or(LOOK_EVERY, |at| at.saturating_duration_since(now))
            .min(LOOK_EVERY);
        if let Err(e) = poll.poll(&mut events, Some(wait))
            && e.kind() != io::ErrorKind::Interrupted
        {
            return Err(e);
        }
        let now = Instant::now();
        for event in &events {
            let id = event.token().0 as u64;
            let Some(s) = sockets.get(&id) else { continue };
            loop {
                match s.socket.recv(&mut buf) {
                    Ok(n) => checks.answered(&current, id, &buf[..n], now, writer),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        checks.failed(&current, id, Failure::Refused, now);
                    }
                    Err(_) => break,
                }
            }
        }
        checks.timed_out(&current, now);
    }
    for s in sockets.values() {
        ports.remove(s.port);
    }
    Ok(())
}

fn open(poll: &Poll, id: u64, to: SocketAddr, ports: &PortCounts) -> io::Result<ProbeSocket> {
    let socket = connect(to)?;
    let local = socket.local_addr()?;
    let port = local.port();
    let mut socket = mio::net::UdpSocket::from_std(socket);
    let token = Token(usize::try_from(id).unwrap_or(usize::MAX));
    poll.registry().register(&mut socket, token, Interest::READABLE)?;
    ports.add_socket(local);
    Ok(ProbeSocket { socket, port })
}
