//! Captures of UDP traffic: reading the datagrams out of a pcap or pcapng file
//! (as tcpdump, tshark or `--record` write them) and recording a listener's
//! traffic to pcapng without slowing its workers.

mod output;
mod read;
mod record;

pub use read::{Capture, Datagram, MAX_CAPTURE_BYTES, Reader, Skipped, read};
pub use record::{Hop, MISMATCHES, MismatchLog, Recorder};
pub(crate) use record::{chance, threshold};
