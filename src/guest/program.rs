//! A loaded module ([`Program`]): checked, linked for its kind, ready to
//! instantiate; what a reload publishes.

use std::fmt;
use std::time::Duration;

use super::kind::Kind;
use crate::config::Isolation;
use crate::guest::abi::GuestKind;

/// A module that passed every check, compiled and ready to instantiate. This is
/// what a reload publishes; instances made from it are cheap.
pub struct Program {
    pub(super) origin: String,
    pub(super) sha256: [u8; 32],
    pub(super) imports: Vec<String>,
    pub(super) pre: Box<dyn Kind>,
    pub(super) compile_time: Duration,
    /// Whether the module exports `on_reply`.
    pub(super) on_reply: bool,
    /// Whether the module writes health probes (`probe` and `probe_reply`).
    pub(super) probes: bool,
    /// A component's world, described by the component checker.
    pub(super) world: Option<String>,
    /// Orders the programs loaded by this process (a newer one's metric
    /// definitions replace an older one's).
    pub(super) serial: u64,
}

/// The next [`Program::serial`].
pub(super) fn next_serial() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The first 12 hex digits of a sha256, enough to tell modules apart in logs.
pub fn short_hex(sha256: &[u8; 32]) -> String {
    sha256[..6].iter().map(|b| format!("{b:02x}")).collect()
}

impl Program {
    /// Where the module came from: its path, or `<embedded uppercase>`.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The sha256 of the module's bytes, in hex.
    pub fn sha256_hex(&self) -> String {
        self.sha256.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The sha256 of the module's bytes.
    pub fn sha256(&self) -> [u8; 32] {
        self.sha256
    }

    /// The first 12 hex digits of the sha256, enough to tell modules apart in logs.
    pub fn short_sha256(&self) -> String {
        short_hex(&self.sha256)
    }

    /// Which ABI the module follows, and so how it is run.
    pub fn kind(&self) -> GuestKind {
        self.pre.kind()
    }

    /// The isolation it runs with when the listener asks for `wanted`: a
    /// kind that makes an instance per call (a WASI command) runs fresh.
    pub fn isolation(&self, wanted: Isolation) -> Isolation {
        if self.pre.instance_per_call() {
            Isolation::Fresh
        } else {
            wanted
        }
    }

    /// Whether every call makes an instance of its own (a WASI command).
    pub fn instance_per_call(&self) -> bool {
        self.pre.instance_per_call()
    }

    /// What the module imports from the host, as `module.name`.
    pub fn imports(&self) -> &[String] {
        &self.imports
    }

    /// How long loading took: compiling, checking and the trial instantiation.
    pub fn compile_time(&self) -> Duration {
        self.compile_time
    }

    /// For a component: its exports with their types and its imports, one per
    /// line, in a stable order.
    pub fn world(&self) -> Option<&str> {
        self.world.as_deref()
    }
}

impl fmt::Debug for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Program")
            .field("origin", &self.origin)
            .field("sha256", &self.short_sha256())
            .finish_non_exhaustive()
    }
}
