//! Clients behind a trusted proxy (PROXY protocol v2 in): which sources are
//! trusted to name the client, and, for each client a proxy named, the proxy
//! its answers go back through. Socket-free: a worker asks it what a datagram
//! from the wire means ([`Proxied::accept`]) and where an answer goes
//! ([`Proxied::route`]).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::proxy_v2::{self, HeaderError, Parsed};

/// The sources whose datagrams must start with a PROXY v2 header naming the
/// client (`proxy_protocol_from`): CIDR blocks, empty for none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `ip` (an IPv4 address mapped into IPv6 is the IPv4 address)
    /// is one of the trusted proxies.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// From the config file's list of CIDR blocks (a bare address is its own /32 or /128).
    pub fn from_list<S: AsRef<str>>(items: &[S]) -> Result<Self, String> {
        let mut nets = Vec::new();
        for item in items {
            let item = item.as_ref().trim();
            let net = match item.parse::<IpNet>() {
                Ok(net) => net,
                Err(_) => match item.parse::<IpAddr>() {
                    Ok(ip) => IpNet::from(ip),
                    Err(_) => {
                        return Err(format!(
                            "`{item}` is not a CIDR block (such as 10.0.0.0/8 or 2001:db8::/32) or an address"
                        ));
                    }
                },
            };
            // 10.1.2.3/8 is taken as 10.0.0.0/8: what was meant, and what is shown.
            nets.push(net.trunc());
        }
        Ok(Self(nets))
    }
}

/// `--proxy-protocol-from`: CIDR blocks separated by commas.
impl FromStr for TrustedProxies {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let items: Vec<&str> = s.split(',').filter(|i| !i.trim().is_empty()).collect();
        if items.is_empty() {
            return Err("no CIDR block given".into());
        }
        Self::from_list(&items)
    }
}

impl fmt::Display for TrustedProxies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, net) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{net}")?;
        }
        Ok(())
    }
}

/// How many clients a worker remembers the proxy of; past it, a datagram
/// naming a new client is dropped (and counted) rather than forgetting a
/// client whose answers may still be on their way.
pub const MAX_PROXIED_CLIENTS: usize = 65_536;

/// Where the answers to a proxied client go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Via {
    /// The proxy that relayed the client's datagrams.
    pub proxy: SocketAddr,
    /// The address the client sent to, as the proxy's header said: the
    /// source of the header on each answer.
    pub service: SocketAddr,
    seen: Instant,
}

/// What a datagram from the wire is.
#[derive(Debug, PartialEq, Eq)]
pub enum Accepted<'a> {
    /// From `client`, whose payload is this (after any header).
    Client { client: SocketAddr, payload: &'a [u8] },
    /// From a trusted proxy, with no usable header: dropped.
    BadHeader(HeaderError),
    /// A new client past [`MAX_PROXIED_CLIENTS`]: dropped.
    Full,
}

/// One worker's view of its trusted proxies and the clients they relay.
#[derive(Debug)]
pub struct Proxied {
    trusted: TrustedProxies,
    clients: HashMap<SocketAddr, Via>,
    /// Clients in the order they were last known seen, for expiry: an entry
    /// may be older than its client's `seen`, and is queued again then.
    order: VecDeque<(SocketAddr, Instant)>,
    /// How long a client is remembered after its last datagram or answer.
    ttl: Duration,
    cap: usize,
}

impl Proxied {
    /// `ttl` must outlast the sessions' idle timeout: an answer to a client
    /// whose proxy was forgotten would go to the client's address directly.
    pub fn new(trusted: TrustedProxies, ttl: Duration) -> Self {
        Self::with_cap(trusted, ttl, MAX_PROXIED_CLIENTS)
    }

    fn with_cap(trusted: TrustedProxies, ttl: Duration, cap: usize) -> Self {
        Self {
            trusted,
            clients: HashMap::new(),
            order: VecDeque::new(),
            ttl,
            cap,
        }
    }

    /// A datagram `from` the wire: from a trusted proxy it must start with a
    /// v2 header, whose client it is from (and is remembered with the proxy);
    /// from anyone else the bytes are the payload, header or not.
    pub fn accept<'a>(&mut self, now: Instant, from: SocketAddr, datagram: &'a [u8]) -> Accepted<'a> {
        if !self.trusted.contains(from.ip()) {
            return Accepted::Client {
                client: from,
                payload: datagram,
            };
        }
        match proxy_v2::parse(datagram) {
            Err(e) => Accepted::BadHeader(e),
            // The proxy's own datagram: answered as any client's.
            Ok(Parsed::Local { payload }) => Accepted::Client { client: from, payload },
            Ok(Parsed::Proxied {
                source,
                destination,
                payload,
            }) => {
                let via = Via {
                    proxy: from,
                    service: destination,
                    seen: now,
                };
                if let Some(known) = self.clients.get_mut(&source) {
                    *known = via;
                } else {
                    if self.clients.len() >= self.cap {
                        self.expire(now);
                        if self.clients.len() >= self.cap {
                            return Accepted::Full;
                        }
                    }
                    self.clients.insert(source, via);
                    self.order.push_back((source, now));
                }
                Accepted::Client {
                    client: source,
                    payload,
                }
            }
        }
    }

    /// The proxy an answer to `client` goes back through, if a proxy named
    /// it; the client counts as seen, since its session is alive.
    pub fn route(&mut self, now: Instant, client: SocketAddr) -> Option<Via> {
        let via = self.clients.get_mut(&client)?;
        via.seen = now;
        Some(*via)
    }

    /// Forgets the clients not seen for the time to live.
    pub fn expire(&mut self, now: Instant) {
        while let Some(&(client, queued)) = self.order.front() {
            if now.saturating_duration_since(queued) < self.ttl {
                break;
            }
            self.order.pop_front();
            match self.clients.get(&client) {
                Some(via) if now.saturating_duration_since(via.seen) >= self.ttl => {
                    self.clients.remove(&client);
                }
                Some(via) => self.order.push_back((client, via.seen)),
                None => {}
            }
        }
    }

    /// Clients remembered now.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn trusted(s: &str) -> TrustedProxies {
        s.parse().unwrap()
    }

    fn header(source: &str, destination: &str, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        proxy_v2::write(addr(source), addr(destination), &mut out);
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn cidr_lists_parse_and_match_mapped_addresses() {
        let t = trusted("10.0.0.0/8, 192.0.2.7,2001:db8::/32");
        assert!(t.contains("10.200.1.1".parse().unwrap()));
        assert!(
            t.contains("::ffff:10.1.1.1".parse().unwrap()),
            "a mapped IPv4 address is the address"
        );
        assert!(t.contains("192.0.2.7".parse().unwrap()));
        assert!(!t.contains("192.0.2.8".parse().unwrap()));
        assert!(t.contains("2001:db8::1".parse().unwrap()));
        assert!(!t.contains("11.0.0.1".parse().unwrap()));
        assert_eq!(trusted("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert!("".parse::<TrustedProxies>().is_err());
        let e = "10.0.0.0/33".parse::<TrustedProxies>().unwrap_err();
        assert!(e.contains("10.0.0.0/33") && e.contains("CIDR"), "{e}");
    }

    #[test]
    fn a_trusted_proxy_names_the_client_and_answers_go_back_through_it() {
        let now = Instant::now();
        let mut p = Proxied::new(trusted("127.0.0.0/8"), Duration::from_secs(60));
        let proxy = addr("127.0.0.9:4000");
        let d = header("198.51.100.7:5353", "203.0.113.1:53", b"query");
        let Accepted::Client { client, payload } = p.accept(now, proxy, &d) else {
            panic!("accepted")
        };
        assert_eq!((client, payload), (addr("198.51.100.7:5353"), &b"query"[..]));
        let via = p.route(now, client).unwrap();
        assert_eq!((via.proxy, via.service), (proxy, addr("203.0.113.1:53")));
        assert_eq!(
            p.route(now, addr("198.51.100.8:1")),
            None,
            "a client no proxy named goes direct"
        );
    }

    #[test]
    fn an_untrusted_source_is_its_own_client_even_with_a_header() {
        let now = Instant::now();
        let mut p = Proxied::new(trusted("10.0.0.0/8"), Duration::from_secs(60));
        let d = header("198.51.100.7:5353", "203.0.113.1:53", b"query");
        let from = addr("127.0.0.1:4000");
        assert_eq!(
            p.accept(now, from, &d),
            Accepted::Client {
                client: from,
                payload: &d
            }
        );
        assert!(p.is_empty(), "nothing remembered");
    }

    #[test]
    fn a_trusted_source_without_a_valid_header_is_refused_with_the_reason() {
        let now = Instant::now();
        let mut p = Proxied::new(trusted("127.0.0.1"), Duration::from_secs(60));
        let from = addr("127.0.0.1:4000");
        assert_eq!(
            p.accept(now, from, b"plain payload"),
            Accepted::BadHeader(HeaderError::Signature)
        );
        let d = header("198.51.100.7:5353", "203.0.113.1:53", b"q");
        assert_eq!(
            p.accept(now, from, &d[..20]),
            Accepted::BadHeader(HeaderError::Truncated)
        );
    }

    #[test]
    fn clients_expire_after_their_last_datagram_or_answer_and_the_cap_refuses_new_ones() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        let mut p = Proxied::with_cap(trusted("127.0.0.1"), ttl, 2);
        let proxy = addr("127.0.0.1:4000");
        let a = header("198.51.100.1:1", "203.0.113.1:53", b"");
        let b = header("198.51.100.2:1", "203.0.113.1:53", b"");
        let c = header("198.51.100.3:1", "203.0.113.1:53", b"");
        assert!(matches!(p.accept(t0, proxy, &a), Accepted::Client { .. }));
        assert!(matches!(p.accept(t0, proxy, &b), Accepted::Client { .. }));
        assert_eq!(p.accept(t0, proxy, &c), Accepted::Full, "the cap keeps live clients");
        // An answer to `a` keeps it; `b` is forgotten after the ttl.
        assert!(p.route(t0 + Duration::from_secs(8), addr("198.51.100.1:1")).is_some());
        let later = t0 + Duration::from_secs(11);
        assert!(matches!(p.accept(later, proxy, &c), Accepted::Client { .. }));
        assert!(p.route(later, addr("198.51.100.2:1")).is_none(), "b expired");
        assert!(p.route(later, addr("198.51.100.1:1")).is_some(), "a was seen at 8 s");
        p.expire(t0 + Duration::from_secs(30));
        assert!(p.is_empty());
    }

    #[test]
    fn the_proxys_own_datagram_is_its_own() {
        let mut p = Proxied::new(trusted("127.0.0.1"), Duration::from_secs(60));
        let mut d = Vec::new();
        proxy_v2::write_local(&mut d);
        d.extend_from_slice(b"ping");
        let from = addr("127.0.0.1:4000");
        assert_eq!(
            p.accept(Instant::now(), from, &d),
            Accepted::Client {
                client: from,
                payload: b"ping"
            }
        );
        assert!(p.is_empty());
    }
}
