//! Captures of UDP traffic: reading the datagrams out of a pcap or pcapng file
//! (as tcpdump, tshark or `--record` write them) and recording a listener's
//! traffic to pcapng without slowing its workers.

mod output;
mod read;
mod record;

use std::net::SocketAddr;
use std::time::Duration;

pub use read::{Capture, MAX_CAPTURE_BYTES, Reader, Skipped, read};
pub use record::{Hop, MISMATCHES, MismatchLog, Recorder};
pub(crate) use record::{chance, threshold};

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
