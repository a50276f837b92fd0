//! The PROXY protocol, version 2, in its datagram mode (HAProxy's
//! `proxy-protocol.txt`, section 2.2): a binary header in front of every
//! datagram naming the client a proxy received it from. Reading one
//! ([`parse`]) checks every byte it relies on and never reads past the
//! datagram; writing one ([`write`]) is what a pool that speaks it sends.
//! Pure: no socket, so every malformed header is a unit test and a fuzz case.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

/// The twelve bytes every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The fixed part: signature, version and command, family and transport,
/// and the length of what follows.
const FIXED: usize = 16;

/// Version 2 in the high nibble.
const VERSION: u8 = 0x20;
const LOCAL: u8 = 0x0;
const PROXY: u8 = 0x1;

const UNSPEC: u8 = 0x0;
const INET: u8 = 0x1;
const INET6: u8 = 0x2;
const DGRAM: u8 = 0x2;

/// The address block's size for IPv4 and IPv6 (source, destination, ports).
const INET_LEN: usize = 12;
const INET6_LEN: usize = 36;

/// What a valid header says, and the datagram after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// The proxy relayed a client's datagram: `source` is the client,
    /// `destination` the address the client sent to.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
        payload: &'a [u8],
    },
    /// The proxy speaks for itself (`LOCAL`, a health check say) or names
    /// no address (`UNSPEC`): the datagram is the proxy's own.
    Local { payload: &'a [u8] },
}

/// Why a datagram does not start with a usable v2 header; each is a label
/// in the drop counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// Shorter than the fixed part, or than the length it gives.
    Truncated,
    /// Not the v2 signature (a v1 text header, or no header at all).
    Signature,
    /// A version other than 2.
    Version,
    /// A command other than `LOCAL` or `PROXY`.
    Command,
    /// An address family other than IPv4 or IPv6 (`AF_UNIX`, or unknown).
    Family,
    /// A transport other than datagram for a proxied client.
    Transport,
    /// The length is too short for the family's addresses.
    Length,
    /// A TLV that runs past the header's end.
    Tlv,
}

impl HeaderError {
    pub const ALL: [Self; 8] = [
        Self::Truncated,
        Self::Signature,
        Self::Version,
        Self::Command,
        Self::Family,
        Self::Transport,
        Self::Length,
        Self::Tlv,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::Signature => "signature",
            Self::Version => "version",
            Self::Command => "command",
            Self::Family => "family",
            Self::Transport => "transport",
            Self::Length => "length",
            Self::Tlv => "tlv",
        }
    }
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = match self {
            Self::Truncated => "the datagram ends inside the PROXY header",
            Self::Signature => "no PROXY v2 signature",
            Self::Version => "a PROXY header of a version other than 2",
            Self::Command => "a PROXY command other than LOCAL or PROXY",
            Self::Family => "a PROXY address family other than IPv4 or IPv6",
            Self::Transport => "a PROXY header for a transport other than datagrams",
            Self::Length => "a PROXY header too short for its addresses",
            Self::Tlv => "a PROXY TLV that runs past the header",
        };
        f.write_str(why)
    }
}

impl std::error::Error for HeaderError {}

/// Reads the v2 header at the start of `datagram`.
pub fn parse(datagram: &[u8]) -> Result<Parsed<'_>, HeaderError> {
    let Some(fixed) = datagram.get(..FIXED) else {
        // A short datagram that is not even the signature's start is not a header.
        let n = datagram.len().min(SIGNATURE.len());
        return Err(if n > 0 && datagram[..n] == SIGNATURE[..n] {
            HeaderError::Truncated
        } else {
            HeaderError::Signature
        });
    };
    if fixed[..12] != SIGNATURE {
        return Err(HeaderError::Signature);
    }
    let (version, command) = (fixed[12] & 0xf0, fixed[12] & 0x0f);
    if version != VERSION {
        return Err(HeaderError::Version);
    }
    if command != LOCAL && command != PROXY {
        return Err(HeaderError::Command);
    }
    let (family, transport) = (fixed[13] >> 4, fixed[13] & 0x0f);
    let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    let Some(rest) = datagram.get(FIXED..FIXED + len) else {
        return Err(HeaderError::Truncated);
    };
    let payload = &datagram[FIXED + len..];
    // A LOCAL header's addresses, if any, mean nothing; it must still be whole.
    if command == LOCAL || family == UNSPEC {
        return Ok(Parsed::Local { payload });
    }
    let (source, destination, tlvs) = match family {
        INET => {
            let a = rest.get(..INET_LEN).ok_or(HeaderError::Length)?;
            let ip = |at: usize| IpAddr::V4(Ipv4Addr::new(a[at], a[at + 1], a[at + 2], a[at + 3]));
            let port = |at: usize| u16::from_be_bytes([a[at], a[at + 1]]);
            (
                SocketAddr::new(ip(0), port(8)),
                SocketAddr::new(ip(4), port(10)),
                &rest[INET_LEN..],
            )
        }
        INET6 => {
            let a = rest.get(..INET6_LEN).ok_or(HeaderError::Length)?;
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&a[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            let port = |at: usize| u16::from_be_bytes([a[at], a[at + 1]]);
            (
                SocketAddr::new(ip(0), port(32)),
                SocketAddr::new(ip(16), port(34)),
                &rest[INET6_LEN..],
            )
        }
        // AF_UNIX (3) names no client a datagram could be answered for; the rest are unknown.
        _ => return Err(HeaderError::Family),
    };
    if transport != DGRAM {
        return Err(HeaderError::Transport);
    }
    check_tlvs(tlvs)?;
    Ok(Parsed::Proxied {
        source: canonical(source),
        destination: canonical(destination),
        payload,
    })
}

/// Every TLV (type, 2-byte length, value) must end inside the header.
fn check_tlvs(mut tlvs: &[u8]) -> Result<(), HeaderError> {
    while !tlvs.is_empty() {
        let head = tlvs.get(..3).ok_or(HeaderError::Tlv)?;
        let len = usize::from(u16::from_be_bytes([head[1], head[2]]));
        tlvs = tlvs.get(3 + len..).ok_or(HeaderError::Tlv)?;
    }
    Ok(())
}

/// An IPv4 address sent as IPv4-mapped IPv6 is the IPv4 address it is.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Appends a `PROXY` header for a datagram from `source` to `destination` to
/// `out`. Both IPv4 (or IPv4 mapped into IPv6, as a dual-stack socket gives
/// them) gives an IPv4 header; otherwise both are written as IPv6 (an IPv4
/// address mapped), since a header has one family.
pub fn write(source: SocketAddr, destination: SocketAddr, out: &mut Vec<u8>) {
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (source, destination) = (canonical(source), canonical(destination));
    out.extend_from_slice(&SIGNATURE);
    out.push(VERSION | PROXY);
    match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push(INET << 4 | DGRAM);
            out.extend_from_slice(&(INET_LEN as u16).to_be_bytes());
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        _ => {
            let v6 = |a: SocketAddr| match a {
                SocketAddr::V4(v4) => SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0),
                SocketAddr::V6(v6) => v6,
            };
            let (s, d) = (v6(source), v6(destination));
            out.push(INET6 << 4 | DGRAM);
            out.extend_from_slice(&(INET6_LEN as u16).to_be_bytes());
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
    }
}

/// Appends a `LOCAL` header (the sender speaking for itself, no addresses) to `out`.
pub fn write_local(out: &mut Vec<u8>) {
    out.extend_from_slice(&SIGNATURE);
    out.extend_from_slice(&[VERSION | LOCAL, UNSPEC << 4, 0, 0]);
}

/// The length of the header [`write`] makes for these addresses.
pub fn header_len(source: SocketAddr, destination: SocketAddr) -> usize {
    match (source.ip().to_canonical(), destination.ip().to_canonical()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => FIXED + INET_LEN,
        _ => FIXED + INET6_LEN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn with_header(source: &str, destination: &str, payload: &[u8]) -> Vec<u8> {
        let mut d = Vec::new();
        write(addr(source), addr(destination), &mut d);
        d.extend_from_slice(payload);
        d
    }

    #[test]
    fn a_written_header_reads_back_with_its_payload_for_each_family() {
        for (source, destination) in [
            ("198.51.100.7:40000", "192.0.2.1:53"),
            ("[2001:db8::7]:40000", "[2001:db8::1]:53"),
            ("198.51.100.7:40000", "[2001:db8::1]:53"),
        ] {
            let d = with_header(source, destination, b"query");
            assert_eq!(d.len(), header_len(addr(source), addr(destination)) + 5);
            assert_eq!(
                parse(&d),
                Ok(Parsed::Proxied {
                    source: addr(source),
                    destination: addr(destination),
                    payload: b"query"
                }),
                "{source} -> {destination}"
            );
        }
        // An empty datagram, proxied, is still a datagram.
        let d = with_header("198.51.100.7:1", "192.0.2.1:2", b"");
        assert!(matches!(parse(&d), Ok(Parsed::Proxied { payload: b"", .. })));
    }

    #[test]
    fn local_and_unspec_headers_carry_the_proxys_own_datagram() {
        let mut d = SIGNATURE.to_vec();
        d.extend_from_slice(&[VERSION | LOCAL, UNSPEC, 0, 0]);
        d.extend_from_slice(b"ping");
        assert_eq!(parse(&d), Ok(Parsed::Local { payload: b"ping" }));
        let mut d = SIGNATURE.to_vec();
        d.extend_from_slice(&[VERSION | PROXY, UNSPEC << 4 | DGRAM, 0, 3, 1, 2, 3]);
        d.extend_from_slice(b"x");
        assert_eq!(
            parse(&d),
            Ok(Parsed::Local { payload: b"x" }),
            "addresses skipped by their length"
        );
    }

    #[test]
    fn every_malformed_header_is_refused_with_its_reason() {
        let good = with_header("198.51.100.7:40000", "192.0.2.1:53", b"q");
        let with = |at: usize, byte: u8| {
            let mut d = good.clone();
            d[at] = byte;
            d
        };
        let cases: Vec<(Vec<u8>, HeaderError)> = vec![
            (Vec::new(), HeaderError::Signature),
            (b"hello".to_vec(), HeaderError::Signature),
            (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(), HeaderError::Signature),
            (good[..10].to_vec(), HeaderError::Truncated),
            (good[..20].to_vec(), HeaderError::Truncated),
            (with(0, b'x'), HeaderError::Signature),
            (with(12, 0x11), HeaderError::Version),
            (with(12, 0x22), HeaderError::Command),
            (with(13, 0x3 << 4 | DGRAM), HeaderError::Family), // AF_UNIX
            (with(13, 0x42), HeaderError::Family),
            (with(13, INET << 4 | 0x1), HeaderError::Transport),
            // A length that lies: longer than the datagram.
            (with(15, 200), HeaderError::Truncated),
            // Shorter than IPv4's addresses.
            (with(15, 4), HeaderError::Length),
            (with(13, INET6 << 4 | DGRAM), HeaderError::Length),
        ];
        for (datagram, why) in cases {
            assert_eq!(parse(&datagram), Err(why), "{datagram:?}");
        }
    }

    #[test]
    fn tlvs_are_skipped_when_whole_and_refused_when_they_run_past_the_header() {
        let mut d = with_header("198.51.100.7:40000", "192.0.2.1:53", b"");
        // A TLV of 3 bytes (type 0x04, NOOP) and its length in the header's.
        d.extend_from_slice(&[0x04, 0, 3, 1, 2, 3]);
        d[15] = (INET_LEN + 6) as u8;
        d.extend_from_slice(b"q");
        assert!(matches!(parse(&d), Ok(Parsed::Proxied { payload: b"q", .. })));
        // The same TLV claiming 4 bytes: past the end of the header.
        d[FIXED + INET_LEN + 2] = 4;
        assert_eq!(parse(&d), Err(HeaderError::Tlv));
        // Two bytes of a TLV's head only.
        let mut d = with_header("198.51.100.7:40000", "192.0.2.1:53", b"");
        d.extend_from_slice(&[0x04, 0]);
        d[15] = (INET_LEN + 2) as u8;
        assert_eq!(parse(&d), Err(HeaderError::Tlv));
    }

    #[test]
    fn every_reason_has_its_own_label() {
        let mut labels: Vec<_> = HeaderError::ALL.iter().map(|e| e.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), HeaderError::ALL.len());
    }
}
