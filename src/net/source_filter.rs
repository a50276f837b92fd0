//! Which client sources a listener never answers, so that one spoofed datagram
//! cannot start a loop (the "Loop DoS" class, CVE-2024-2169): a gateway answering
//! itself, another listener of this process, its own session sockets, an endpoint
//! of its own pools, or a service on a well-known port that answers everything.
//!
//! The check runs before the guest, costs a bit test and a hash lookup, and
//! touches the system only for a source on one of our own ports (to learn whether
//! its address is one of this host's). Other processes' servers on this host
//! (another gateway above all) are learnt from `/proc/net/udp` and `udp6`,
//! read at start and again, by a thread of their own and at most once a
//! second, when a local source on a server port not known yet asks for it.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering::Relaxed};

/// Source ports refused by default: the well-known ports, where the services
/// that answer anything live (echo, chargen, daytime, DNS, NTP, TFTP, …), and
/// port 0, which no real client sends from.
pub const DEFAULT_DENIED_PORTS: &str = "0-1023";

/// A set of UDP ports, as `--deny-source-ports` gives it: `0-1023,5353`, or `none`.
#[derive(Clone, PartialEq, Eq)]
pub struct PortSet {
    bits: Box<[u64; 1024]>,
}

impl PortSet {
    /// No port.
    pub fn none() -> Self {
        Self {
            bits: Box::new([0; 1024]),
        }
    }

    pub fn insert(&mut self, port: u16) {
        self.bits[usize::from(port) / 64] |= 1 << (port % 64);
    }

    pub fn contains(&self, port: u16) -> bool {
        self.bits[usize::from(port) / 64] & (1 << (port % 64)) != 0
    }

    /// The set as ranges, lowest first.
    fn ranges(&self) -> Vec<(u16, u16)> {
        let mut out: Vec<(u16, u16)> = Vec::new();
        for port in 0..=u16::MAX {
            if !self.contains(port) {
                continue;
            }
            match out.last_mut() {
                Some((_, end)) if u32::from(*end) + 1 == u32::from(port) => *end = port,
                _ => out.push((port, port)),
            }
        }
        out
    }
}

impl Default for PortSet {
    /// [`DEFAULT_DENIED_PORTS`].
    fn default() -> Self {
        let mut set = Self::none();
        for port in 0..1024 {
            set.insert(port);
        }
        set
    }
}

impl FromStr for PortSet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut set = Self::none();
        let s = s.trim();
        if s == "none" || s.is_empty() {
            return Ok(set);
        }
        for item in s.split(',').map(str::trim) {
            let port = |p: &str| {
                p.trim()
                    .parse::<u16>()
                    .map_err(|_| format!("`{}` is not a port (0 to 65535)", crate::text::cut(p, 40)))
            };
            let (first, last) = match item.split_once('-') {
                Some((a, b)) => (port(a)?, port(b)?),
                None => (port(item)?, port(item)?),
            };
            if first > last {
                return Err(format!("`{item}` is an empty range: give LOW-HIGH"));
            }
            for p in first..=last {
                set.insert(p);
            }
        }
        Ok(set)
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ranges = self.ranges();
        if ranges.is_empty() {
            return f.write_str("none");
        }
        for (i, (a, b)) in ranges.into_iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if a == b {
                write!(f, "{a}")?;
            } else {
                write!(f, "{a}-{b}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PortSet({self})")
    }
}

/// How many open sockets of ours are bound to each port, and, for connected
/// ones, the IPv4 address they send from; read on the datagram path without a
/// lock.
pub struct PortCounts {
    counts: Box<[AtomicU16]>,
    /// The one IPv4 address the sockets on a port send from; 0 when it is not
    /// known (IPv6, a socket added by port, or several): then any local
    /// address on that port is taken for ours.
    sources: Box<[AtomicU32]>,
}

impl Default for PortCounts {
    fn default() -> Self {
        Self {
            counts: (0..=u16::MAX).map(|_| AtomicU16::new(0)).collect(),
            sources: (0..=u16::MAX).map(|_| AtomicU32::new(0)).collect(),
        }
    }
}

impl PortCounts {
    /// A socket on `port`, whatever address it sends from.
    pub fn add(&self, port: u16) {
        self.counts[usize::from(port)].fetch_add(1, Relaxed);
        self.sources[usize::from(port)].store(0, Relaxed);
    }

    /// A connected socket whose local address is `local`: a local source on
    /// its port but another address (a client on 127.0.0.2 with the port a
    /// session has on 127.0.0.1) is not it.
    pub fn add_socket(&self, local: SocketAddr) {
        let i = usize::from(local.port());
        let ip = match local.ip().to_canonical() {
            IpAddr::V4(v4) if !v4.is_unspecified() => u32::from(v4),
            _ => 0,
        };
        if self.counts[i].fetch_add(1, Relaxed) == 0 {
            self.sources[i].store(ip, Relaxed);
        } else if self.sources[i].load(Relaxed) != ip {
            self.sources[i].store(0, Relaxed);
        }
    }

    pub fn remove(&self, port: u16) {
        let i = usize::from(port);
        if self.counts[i].fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1)) == Ok(1) {
            self.sources[i].store(0, Relaxed);
        }
    }

    pub fn contains(&self, port: u16) -> bool {
        self.counts[usize::from(port)].load(Relaxed) > 0
    }

    /// Whether `from` may be one of these sockets: its port has one, sending
    /// from `from`'s address (or from an address not known).
    pub fn holds(&self, from: SocketAddr) -> bool {
        let i = usize::from(from.port());
        if self.counts[i].load(Relaxed) == 0 {
            return false;
        }
        match self.sources[i].load(Relaxed) {
            0 => true,
            ip => from.ip().to_canonical() == IpAddr::V4(Ipv4Addr::from(ip)),
        }
    }
}

/// The listening ports of every gateway in this process: a listener never
/// answers another (two gateways answering each other is a loop).
pub fn listening_ports() -> &'static PortCounts {
    static PORTS: std::sync::LazyLock<PortCounts> = std::sync::LazyLock::new(PortCounts::default);
    &PORTS
}

/// The UDP ports a server socket of this host is bound to, whatever process
/// holds it: unconnected sockets outside the ephemeral port range (clients
/// send from ephemeral ports; servers, another gateway's listener above all,
/// are bound to a port of their choosing). Read from `/proc/net/udp` and
/// `udp6` when first needed, and again only when asked ([`HostPorts::ask`]),
/// at most once a second: reading them is slow with many sockets open (69 ms
/// with 10,000 measured here), so a gateway whose clients all send from
/// ephemeral ports or other hosts never reads them again.
pub struct HostPorts {
    bits: [AtomicU64; 1024],
    /// `net.ipv4.ip_local_port_range`, which IPv6 uses too.
    ephemeral: std::ops::RangeInclusive<u16>,
    /// A worker saw a local source on a server port not known yet.
    asked: AtomicBool,
    /// The thread that reads the tables again, woken by [`HostPorts::ask`].
    reader: std::sync::OnceLock<std::thread::Thread>,
}

/// The shortest time between two readings of the host's server ports.
const HOST_PORTS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl HostPorts {
    /// The process's one view, read now and again when asked.
    pub fn watched() -> &'static Self {
        static HOST: std::sync::LazyLock<HostPorts> = std::sync::LazyLock::new(|| {
            let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
                .ok()
                .and_then(|t| {
                    let mut n = t.split_whitespace().map(|w| w.parse::<u16>().ok());
                    Some(n.next()??..=n.next()??)
                })
                .unwrap_or(32768..=60999);
            let host = HostPorts {
                bits: std::array::from_fn(|_| AtomicU64::new(0)),
                ephemeral,
                asked: AtomicBool::new(false),
                reader: std::sync::OnceLock::new(),
            };
            host.refresh();
            let spawned = std::thread::Builder::new()
                .name("wasmgate-host-ports".into())
                .spawn(|| {
                    loop {
                        std::thread::park();
                        if HOST.asked.swap(false, Relaxed) {
                            HOST.refresh();
                            std::thread::sleep(HOST_PORTS_EVERY);
                        }
                    }
                });
            match spawned {
                Ok(thread) => {
                    let _ = host.reader.set(thread.thread().clone());
                }
                Err(e) => tracing::warn!(
                    "cannot start the thread that learns this host's UDP servers ({e}): \
                     those started later are not known"
                ),
            }
            host
        });
        &HOST
    }

    /// Whether `port` is a server port of this host (never an ephemeral one).
    pub fn contains(&self, port: u16) -> bool {
        !self.ephemeral.contains(&port) && self.bits[usize::from(port / 64)].load(Relaxed) & (1 << (port % 64)) != 0
    }

    /// Whether `port` may be a server's: outside the ephemeral range.
    fn may_serve(&self, port: u16) -> bool {
        !self.ephemeral.contains(&port)
    }

    /// Asks for the tables to be read again (at most once a second), for a
    /// local source on a server port that is not known yet: a server started
    /// since, or a client bound to a port of its choosing.
    pub fn ask(&self) {
        if !self.asked.swap(true, Relaxed)
            && let Some(reader) = self.reader.get()
        {
            reader.unpark();
        }
    }

    fn refresh(&self) {
        let mut bits = [0u64; 1024];
        for table in ["/proc/net/udp", "/proc/net/udp6"] {
            if let Ok(text) = std::fs::read_to_string(table) {
                server_ports(&text, &self.ephemeral, &mut bits);
            }
        }
        for (word, new) in self.bits.iter().zip(bits) {
            word.store(new, Relaxed);
        }
    }
}

/// Sets in `bits` the local port of every unconnected socket of a
/// `/proc/net/udp` (or `udp6`) table whose port is outside `ephemeral`.
fn server_ports(table: &str, ephemeral: &std::ops::RangeInclusive<u16>, bits: &mut [u64; 1024]) {
    let port = |address: &str| u16::from_str_radix(address.rsplit(':').next()?, 16).ok();
    for line in table.lines().skip(1) {
        let mut fields = line.split_whitespace().skip(1);
        let (Some(local), Some(remote)) = (fields.next(), fields.next()) else {
            continue;
        };
        let (Some(local), Some(remote)) = (port(local), port(remote)) else {
            continue;
        };
        if remote == 0 && local != 0 && !ephemeral.contains(&local) {
            bits[usize::from(local / 64)] |= 1 << (local % 64);
        }
    }
}

/// One worker's view: the configured denied ports and a memo of which source
/// addresses are this host's own.
pub struct SourceFilter {
    denied: PortSet,
    /// The listener's own address (its IP may be unspecified).
    listen: SocketAddr,
    /// Whether an IP is one of this host's, as learnt by trying to bind it.
    local: HashMap<IpAddr, bool>,
    /// This host's servers, for a listener (not for replay, whose sources
    /// are a capture's).
    host: Option<&'static HostPorts>,
}

/// Entries the memo of local addresses may hold before it starts afresh.
const MAX_MEMO: usize = 256;

/// Why a source is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denied {
    /// Its port is in `deny_source_ports`.
    Port,
    /// It is one of this process's own sockets: a listener or a session.
    Own,
    /// It is an endpoint of one of the listener's pools, which answer on sessions only.
    Endpoint,
    /// It is a server socket of another process on this host.
    Host,
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Port => "its source port is denied (deny_source_ports)",
            Self::Own => "it comes from one of the gateway's own sockets (a loop)",
            Self::Endpoint => "it comes from an upstream endpoint, which may only answer on its session (a loop)",
            Self::Host => "it comes from a server socket of another process on this host (a loop between gateways)",
        })
    }
}

impl SourceFilter {
    pub fn new(denied: PortSet, listen: SocketAddr) -> Self {
        Self {
            denied,
            listen,
            local: HashMap::new(),
            host: None,
        }
    }

    /// Also refuses the server sockets of every process on this host.
    pub fn watching(mut self, host: &'static HostPorts) -> Self {
        self.host = Some(host);
        self
    }

    /// Whether a datagram from `from` (IPv4-mapped addresses already unmapped) must
    /// not be answered. `sessions` are the listener's session ports; `endpoint`
    /// says whether an address is one of its pools' endpoints.
    pub fn check(
        &mut self,
        from: SocketAddr,
        sessions: Option<&PortCounts>,
        endpoint: impl FnOnce(SocketAddr) -> bool,
    ) -> Result<(), Denied> {
        let port = from.port();
        if self.denied.contains(port) {
            return Err(Denied::Port);
        }
        let ours = listening_ports().contains(port) || sessions.is_some_and(|s| s.holds(from));
        if ours && self.is_local(from.ip()) {
            return Err(Denied::Own);
        }
        if endpoint(from) {
            return Err(Denied::Endpoint);
        }
        if let Some(host) = self.host
            && host.may_serve(port)
        {
            if host.contains(port) {
                if self.is_local(from.ip()) {
                    return Err(Denied::Host);
                }
            } else if from.ip().is_loopback() || from.ip() == self.listen.ip() {
                // Perhaps a server started since the tables were read: this
                // datagram is served, and the next ones are judged afresh.
                host.ask();
            }
        }
        Ok(())
    }

    fn is_local(&mut self, ip: IpAddr) -> bool {
        if ip.is_loopback() || ip.is_unspecified() || ip == self.listen.ip() {
            return true;
        }
        if let Some(&local) = self.local.get(&ip) {
            return local;
        }
        if self.local.len() >= MAX_MEMO {
            self.local.clear();
        }
        // Only an address of this host can be bound.
        let local = UdpSocket::bind((ip, 0)).is_ok();
        self.local.insert(ip, local);
        local
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_sets_parse_print_and_refuse_nonsense() {
        let set: PortSet = "0-1023, 5353,8008-8009".parse().unwrap();
        assert!(set.contains(0) && set.contains(1023) && !set.contains(1024));
        assert!(set.contains(5353) && set.contains(8009) && !set.contains(8010));
        assert_eq!(set.to_string(), "0-1023,5353,8008-8009");
        assert_eq!("none".parse::<PortSet>().unwrap().to_string(), "none");
        assert_eq!(PortSet::default().to_string(), DEFAULT_DENIED_PORTS);
        assert!("70000".parse::<PortSet>().unwrap_err().contains("not a port"));
        assert!("9-3".parse::<PortSet>().unwrap_err().contains("empty range"));
        assert!("53,x".parse::<PortSet>().unwrap_err().contains("`x`"));
    }

    #[test]
    fn the_host_servers_are_the_unconnected_sockets_outside_the_ephemeral_range() {
        // /proc/net/udp: a server on 127.0.0.1:8009, a client on an ephemeral
        // port, a connected socket on a low port (a session), and one on
        // 0.0.0.0:5300; then udp6's [::]:7000.
        let udp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  1: 0100007F:1F49 00000000:0000 07 00000000:00000000 00:00000000 00000000  1000        0 1 2 0000000000000000 0
  2: 0100007F:9C40 00000000:0000 07 00000000:00000000 00:00000000 00000000  1000        0 1 2 0000000000000000 0
  3: 0100007F:2710 0100007F:1F49 01 00000000:00000000 00:00000000 00000000  1000        0 1 2 0000000000000000 0
  4: 00000000:14B4 00000000:0000 07 00000000:00000000 00:00000000 00000000  1000        0 1 2 0000000000000000 0
garbage";
        let udp6 = "  sl  local_address                         remote_address                        st
  0: 00000000000000000000000000000000:1B58 00000000000000000000000000000000:0000 07";
        let mut bits = [0u64; 1024];
        server_ports(udp, &(32768..=60999), &mut bits);
        server_ports(udp6, &(32768..=60999), &mut bits);
        let host = HostPorts {
            bits: bits.map(AtomicU64::new),
            ephemeral: 32768..=60999,
            asked: AtomicBool::new(false),
            reader: std::sync::OnceLock::new(),
        };
        let found: Vec<u16> = (0..=u16::MAX).filter(|&p| host.contains(p)).collect();
        assert_eq!(found, [5300, 7000, 8009]);
        // A local source on one is refused; a remote one on the same port is not.
        let host: &'static HostPorts = Box::leak(Box::new(host));
        let mut filter = SourceFilter::new(PortSet::none(), "127.0.0.1:40000".parse().unwrap()).watching(host);
        let p = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(filter.check(p("127.0.0.1:8009"), None, |_| false), Err(Denied::Host));
        assert_eq!(filter.check(p("192.0.2.7:8009"), None, |_| false), Ok(()));
        assert_eq!(filter.check(p("127.0.0.1:40000"), None, |_| false), Ok(()));
    }

    #[test]
    fn a_source_on_a_denied_port_our_own_socket_or_an_endpoint_is_refused() {
        let listen: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let mut filter = SourceFilter::new(PortSet::default(), listen);
        let sessions = PortCounts::default();
        sessions.add(40001);
        let p = |s: &str| s.parse::<SocketAddr>().unwrap();
        let no_endpoint = |_| false;
        assert_eq!(filter.check(p("10.0.0.1:53"), None, no_endpoint), Err(Denied::Port));
        assert_eq!(filter.check(p("127.0.0.1:1"), None, no_endpoint), Err(Denied::Port));
        assert_eq!(filter.check(p("127.0.0.1:50000"), Some(&sessions), no_endpoint), Ok(()));
        // Our own session socket, on any loopback address.
        assert_eq!(
            filter.check(p("127.0.0.9:40001"), Some(&sessions), no_endpoint),
            Err(Denied::Own)
        );
        sessions.remove(40001);
        assert_eq!(filter.check(p("127.0.0.9:40001"), Some(&sessions), no_endpoint), Ok(()));
        // A remote host may use the same port number.
        sessions.add(40001);
        assert_eq!(filter.check(p("192.0.2.7:40001"), Some(&sessions), no_endpoint), Ok(()));
        // A connected socket is known by its whole address: a local client on
        // another loopback address with the same port is served.
        sessions.remove(40001);
        sessions.add_socket(p("127.0.0.1:40001"));
        assert_eq!(filter.check(p("127.0.0.3:40001"), Some(&sessions), no_endpoint), Ok(()));
        assert_eq!(
            filter.check(p("127.0.0.1:40001"), Some(&sessions), no_endpoint),
            Err(Denied::Own)
        );
        // Two sockets on one port from different addresses: any local one is ours.
        sessions.add_socket(p("10.9.8.7:40001"));
        assert_eq!(
            filter.check(p("127.0.0.3:40001"), Some(&sessions), no_endpoint),
            Err(Denied::Own)
        );
        let endpoint = p("127.0.0.1:5300");
        assert_eq!(filter.check(endpoint, None, |a| a == endpoint), Err(Denied::Endpoint));
        let mut open = SourceFilter::new(PortSet::none(), listen);
        assert_eq!(open.check(p("10.0.0.1:53"), None, no_endpoint), Ok(()));
    }
}
