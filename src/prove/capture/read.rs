//! Reading a capture file into its UDP datagrams, in capture order.

use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use pcap_file::DataLink;
use pcap_file::pcap::PcapReader;
use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketOption;
use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionOption;
use pcap_file::pcapng::{Block, PcapNgReader};

use super::record::Hop;

/// One UDP datagram of a capture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram {
    /// When it was captured, since the Unix epoch.
    pub at: Duration,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
    /// What the recorder said of it (pcapng packet comment), when it came from `--record`.
    pub hop: Option<Hop>,
    /// The client a recorded forward or upstream hop belongs to.
    pub client: Option<SocketAddr>,
    /// What became of a recorded client datagram (`reply`, `forward`, a drop reason).
    pub verdict: Option<String>,
}

/// The largest capture [`read`] takes whole into memory; [`Reader`] streams
/// a capture of any size.
pub const MAX_CAPTURE_BYTES: usize = 256 << 20;

/// The UDP datagrams of a capture file, and what was passed over.
#[derive(Debug, Default)]
pub struct Capture {
    pub datagrams: Vec<Datagram>,
    pub skipped: Skipped,
}

/// The packets of a capture that held no datagram to replay.
#[derive(Debug, Default, Clone, Copy)]
pub struct Skipped {
    /// Packets that are not UDP over IP (ARP, TCP, ICMP, …).
    pub not_udp: u64,
    /// Packets cut short by the capture's snap length, and IP fragments (not reassembled).
    pub incomplete: u64,
}

/// Reads all of `path` (at most [`MAX_CAPTURE_BYTES`]) into memory.
pub fn read(path: &Path) -> anyhow::Result<Capture> {
    let file =
        crate::engine::compile::open_regular(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let size = file.metadata().map_or(0, |m| m.len());
    if size > MAX_CAPTURE_BYTES as u64 {
        bail!(
            "{}: it is over the {MAX_CAPTURE_BYTES} byte limit for captures read whole",
            path.display()
        );
    }
    let mut reader = Reader::new(file).with_context(|| format!("{}", path.display()))?;
    let mut datagrams = Vec::new();
    while let Some(d) = reader.next() {
        datagrams.push(d.with_context(|| format!("{}", path.display()))?);
    }
    if datagrams.is_empty() {
        bail!("{}: {}", path.display(), reader.nothing_in_it());
    }
    Ok(Capture {
        datagrams,
        skipped: reader.skipped,
    })
}

#[cfg(test)]
/// Parses capture bytes (the file name is the caller's to add).
pub(crate) fn parse(bytes: &[u8]) -> anyhow::Result<Capture> {
    let mut reader = Reader::new(bytes)?;
    let mut datagrams = Vec::new();
    while let Some(d) = reader.next() {
        datagrams.push(d?);
    }
    Ok(Capture {
        datagrams,
        skipped: reader.skipped,
    })
}

/// A capture's UDP datagrams, one at a time: pcap (microsecond or nanosecond)
/// or pcapng, over Ethernet, raw IP, loopback (`DLT_NULL`/`LOOP`) or Linux
/// cooked (`any`) links. It holds one packet at a time (pcap-file reads
/// through a fixed 8 MB buffer, so a packet claiming more is an error, not an
/// allocation).
pub struct Reader<R: Read> {
    source: Source<Input<R>>,
    /// Blocks or packets read so far, to say where a capture is damaged.
    n: u64,
    pub skipped: Skipped,
}

/// The input with its magic number, read to tell the format, put back in front.
type Input<R> = std::io::Chain<std::io::Cursor<[u8; 4]>, R>;

enum Source<R: Read> {
    Pcap(PcapReader<R>),
    /// Each interface's link type and timestamp units, as its block said.
    PcapNg(PcapNgReader<R>, Vec<(DataLink, u8)>),
}

impl<R: Read> Reader<R> {
    /// Reads the capture's header; the error says what it is if not a capture.
    pub fn new(mut input: R) -> anyhow::Result<Self> {
        let mut magic = [0u8; 4];
        let mut got = 0;
        while got < magic.len() {
            match input.read(&mut magic[got..]) {
                Ok(0) => bail!("not a capture: {got} bytes, shorter than any capture header"),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("cannot read"),
            }
        }
        let input = std::io::Cursor::new(magic).chain(input);
        let source = match magic {
            [0x0a, 0x0d, 0x0d, 0x0a] => Source::PcapNg(
                PcapNgReader::new(input).map_err(|e| anyhow::anyhow!("not a pcapng file: {e}"))?,
                Vec::new(),
            ),
            [0xa1, 0xb2, 0xc3, 0xd4]
            | [0xd4, 0xc3, 0xb2, 0xa1]
            | [0xa1, 0xb2, 0x3c, 0x4d]
            | [0x4d, 0x3c, 0xb2, 0xa1] => {
                Source::Pcap(PcapReader::new(input).map_err(|e| anyhow::anyhow!("not a pcap file: {e}"))?)
            }
            _ => bail!(
                "not a capture: it starts with {} where pcap or pcapng has its magic number",
                crate::text::escape_control(&String::from_utf8_lossy(&magic))
            ),
        };
        Ok(Self {
            source,
            n: 0,
            skipped: Skipped::default(),
        })
    }

    /// The next UDP datagram; `None` at the end of the capture. After an
    /// error (a damaged capture) there is nothing more to read.
    #[allow(clippy::should_implement_trait)] // it lends from its buffer
    pub fn next(&mut self) -> Option<anyhow::Result<Datagram>> {
        loop {
            self.n += 1;
            let n = self.n;
            let found = match &mut self.source {
                Source::Pcap(reader) => {
                    let link = reader.header().datalink;
                    let packet = match reader.next_packet()? {
                        Ok(p) => p,
                        Err(e) => return Some(Err(anyhow::anyhow!("truncated or corrupt at packet {n}: {e}"))),
                    };
                    let whole = packet.orig_len as usize == packet.data.len();
                    datagram(&mut self.skipped, link, packet.timestamp, &packet.data, whole, None)
                }
                Source::PcapNg(reader, interfaces) => {
                    let block = match reader.next_block()? {
                        Ok(b) => b,
                        Err(e) => return Some(Err(anyhow::anyhow!("truncated or corrupt at block {n}: {e}"))),
                    };
                    let packet = match block {
                        Block::SectionHeader(_) => {
                            interfaces.clear();
                            continue;
                        }
                        Block::InterfaceDescription(interface) => {
                            // pcap-file reads the raw timestamp as nanoseconds; it is in the
                            // interface's units (microseconds unless it says otherwise).
                            let resolution = interface.options.iter().find_map(|o| match o {
                                InterfaceDescriptionOption::IfTsResol(r) => Some(*r),
                                _ => None,
                            });
                            interfaces.push((interface.linktype, resolution.unwrap_or(6)));
                            continue;
                        }
                        Block::EnhancedPacket(packet) => packet,
                        _ => continue,
                    };
                    let Some(&(link, resolution)) = interfaces.get(packet.interface_id as usize) else {
                        return Some(Err(anyhow::anyhow!(
                            "block {n}: a packet of interface {} that was never described",
                            packet.interface_id
                        )));
                    };
                    let at = scaled(packet.timestamp.as_nanos(), resolution);
                    let comment = packet.options.iter().find_map(|o| match o {
                        EnhancedPacketOption::Comment(c) => Some(c.as_ref()),
                        _ => None,
                    });
                    let whole = packet.original_len as usize == packet.data.len();
                    datagram(&mut self.skipped, link, at, &packet.data, whole, comment)
                }
            };
            match found {
                Ok(Some(d)) => return Some(Ok(d)),
                Ok(None) => {}
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// Why a capture gave no datagram, for an error.
    pub fn nothing_in_it(&self) -> String {
        format!(
            "no UDP datagrams in it ({} other packets, {} incomplete)",
            self.skipped.not_udp, self.skipped.incomplete
        )
    }
}

/// A timestamp of `raw` units of the pcapng `if_tsresol` `resolution`.
fn scaled(raw: u128, resolution: u8) -> Duration {
    let raw = u64::try_from(raw).unwrap_or(u64::MAX);
    let exponent = u32::from(resolution & 0x7f);
    if resolution & 0x80 == 0 {
        let per_second = 10u64.checked_pow(exponent).unwrap_or(u64::MAX);
        let nanos = u128::from(raw % per_second) * 1_000_000_000 / u128::from(per_second);
        Duration::new(raw / per_second, u32::try_from(nanos).unwrap_or(0))
    } else {
        let per_second = 1u64.checked_shl(exponent).unwrap_or(u64::MAX);
        // A hostile resolution can put the time past what a Duration holds.
        Duration::try_from_secs_f64(raw as f64 / per_second as f64).unwrap_or(Duration::MAX)
    }
}

/// One packet's UDP datagram, if it holds one (else it is counted as skipped).
fn datagram(
    skipped: &mut Skipped,
    link: DataLink,
    at: Duration,
    data: &[u8],
    whole: bool,
    comment: Option<&str>,
) -> anyhow::Result<Option<Datagram>> {
    if !whole {
        skipped.incomplete += 1;
        return Ok(None);
    }
    let sliced = match link {
        DataLink::ETHERNET => SlicedPacket::from_ethernet(data),
        DataLink::RAW | DataLink::IPV4 | DataLink::IPV6 => SlicedPacket::from_ip(data),
        // A 4-byte address family (host order for NULL, network order for LOOP).
        DataLink::NULL | DataLink::LOOP => SlicedPacket::from_ip(data.get(4..).unwrap_or_default()),
        DataLink::LINUX_SLL => SlicedPacket::from_linux_sll(data),
        // The 20-byte SLL2 header starts with the protocol type.
        DataLink::LINUX_SLL2 => SlicedPacket::from_ip(data.get(20..).unwrap_or_default()),
        other => bail!("link type {other:?} is not supported (Ethernet, raw IP, loopback and Linux cooked are)"),
    };
    let Ok(packet) = sliced else {
        skipped.not_udp += 1;
        return Ok(None);
    };
    let (src, dst, fragmented) = match &packet.net {
        Some(NetSlice::Ipv4(ip)) => (
            IpAddr::from(ip.header().source_addr()),
            IpAddr::from(ip.header().destination_addr()),
            ip.is_payload_fragmented(),
        ),
        Some(NetSlice::Ipv6(ip)) => (
            IpAddr::from(ip.header().source_addr()),
            IpAddr::from(ip.header().destination_addr()),
            ip.is_payload_fragmented(),
        ),
        _ => {
            skipped.not_udp += 1;
            return Ok(None);
        }
    };
    if fragmented {
        skipped.incomplete += 1;
        return Ok(None);
    }
    let Some(TransportSlice::Udp(udp)) = &packet.transport else {
        skipped.not_udp += 1;
        return Ok(None);
    };
    let (hop, client, verdict) = comment.map(Hop::parse_comment).unwrap_or_default();
    Ok(Some(Datagram {
        at,
        src: SocketAddr::new(src, udp.source_port()),
        dst: SocketAddr::new(dst, udp.destination_port()),
        payload: udp.payload().to_vec(),
        hop,
        client,
        verdict,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_not_a_capture_is_named_as_such() {
        let e = parse(b"hello world").unwrap_err();
        assert!(format!("{e:#}").contains("not a capture"), "{e:#}");
        let e = parse(b"ab").unwrap_err();
        assert!(format!("{e:#}").contains("shorter than any capture header"), "{e:#}");
    }

    /// A small pcap: one UDP datagram over raw IPv4.
    fn one_datagram_pcap() -> Vec<u8> {
        let mut packet = Vec::new();
        etherparse::PacketBuilder::ipv4([127, 0, 0, 1], [127, 0, 0, 1], 64)
            .udp(4000, 8008)
            .write(&mut packet, b"hello")
            .unwrap();
        let header = pcap_file::pcap::PcapHeader {
            datalink: DataLink::RAW,
            ..Default::default()
        };
        let mut writer = pcap_file::pcap::PcapWriter::with_header(Vec::new(), header).unwrap();
        let p = pcap_file::pcap::PcapPacket::new(Duration::from_secs(1), packet.len() as u32, &packet);
        writer.write_packet(&p).unwrap();
        writer.into_writer()
    }

    /// A pcap of one UDP datagram over the link type `link`, its IP packet
    /// behind `header`.
    fn pcap_over(link: DataLink, header: &[u8]) -> Vec<u8> {
        let mut packet = header.to_vec();
        etherparse::PacketBuilder::ipv4([127, 0, 0, 1], [127, 0, 0, 1], 64)
            .udp(4000, 8008)
            .write(&mut packet, b"over the link")
            .unwrap();
        let header = pcap_file::pcap::PcapHeader {
            datalink: link,
            ..Default::default()
        };
        let mut writer = pcap_file::pcap::PcapWriter::with_header(Vec::new(), header).unwrap();
        let p = pcap_file::pcap::PcapPacket::new(Duration::from_secs(1), packet.len() as u32, &packet);
        writer.write_packet(&p).unwrap();
        writer.into_writer()
    }

    #[test]
    fn loopback_and_linux_cooked_captures_give_their_datagrams() {
        // tcpdump -i lo (DLT_NULL: the address family, host order), OpenBSD's
        // loop (DLT_LOOP: network order), and -i any (Linux cooked v1 and v2).
        let mut sll = vec![0, 0, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0];
        sll.extend_from_slice(&0x0800u16.to_be_bytes());
        let mut sll2 = 0x0800u16.to_be_bytes().to_vec();
        sll2.extend_from_slice(&[0; 18]);
        for (link, header) in [
            (DataLink::NULL, 2u32.to_ne_bytes().to_vec()),
            (DataLink::LOOP, 2u32.to_be_bytes().to_vec()),
            (DataLink::LINUX_SLL, sll),
            (DataLink::LINUX_SLL2, sll2),
        ] {
            let capture = parse(&pcap_over(link, &header)).unwrap();
            assert_eq!(capture.datagrams.len(), 1, "{link:?}");
            let d = &capture.datagrams[0];
            assert_eq!(
                (d.src.port(), d.dst.port(), &d.payload[..]),
                (4000, 8008, &b"over the link"[..]),
                "{link:?}"
            );
        }
    }

    #[test]
    fn a_pcap_gives_its_udp_datagram() {
        let capture = parse(&one_datagram_pcap()).unwrap();
        assert_eq!(capture.datagrams.len(), 1);
        let d = &capture.datagrams[0];
        assert_eq!(
            (d.src.port(), d.dst.port(), &d.payload[..]),
            (4000, 8008, &b"hello"[..])
        );
    }

    #[test]
    fn damaged_captures_are_errors_or_skipped_packets_never_a_panic() {
        let good = one_datagram_pcap();
        let mut state = 0x1234_5678_9abc_def0u64;
        for _ in 0..20_000 {
            let mut bytes = good.clone();
            for _ in 0..1 + state % 4 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let i = (state % bytes.len() as u64) as usize;
                bytes[i] = (state >> 32) as u8;
            }
            if state.is_multiple_of(3) {
                bytes.truncate((state >> 40) as usize % bytes.len());
            }
            let _ = parse(&bytes);
        }
    }

    #[test]
    fn pcapng_timestamps_follow_the_interface_resolution() {
        assert_eq!(scaled(1_500_000, 6), Duration::from_millis(1500));
        assert_eq!(scaled(1_500_000_000, 9), Duration::from_millis(1500));
        assert_eq!(scaled(3 << 20, 0x80 | 20), Duration::from_secs(3));
        // Hostile resolutions are the end of time, never a panic.
        assert_eq!(scaled(u128::from(u64::MAX), 0x80), Duration::MAX);
        assert!(scaled(u128::from(u64::MAX), 0x7f) <= Duration::from_secs(1));
    }
}
