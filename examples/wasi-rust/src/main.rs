//! A wasmgate handler as a WASI command in Rust (`wasm32-wasip1`), with std: a
//! client sends `whoami` and gets back its address as the gateway sees it
//! (`ip:port`), which is what a client behind NAT needs to learn its public
//! address. Anything else is refused: the program says why on stderr, which the
//! gateway logs, and exits with status 1, so no reply is sent.
//!
//! Build: `scripts/build-guests.sh` (or `cargo build --release --target wasm32-wasip1 -p whoami` in `guest/`).

use std::io::{self, Read, Write};
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut request = Vec::new();
    if let Err(e) = io::stdin().read_to_end(&mut request) {
        eprintln!("whoami: cannot read the datagram: {e}");
        return ExitCode::FAILURE;
    }
    if request.trim_ascii() != b"whoami" {
        eprintln!("whoami: unknown request of {} bytes; send `whoami`", request.len());
        return ExitCode::FAILURE;
    }
    let Ok(peer) = std::env::var("WASMGATE_PEER") else {
        eprintln!("whoami: WASMGATE_PEER is not set; run me under wasmgate");
        return ExitCode::from(2);
    };
    match io::stdout().write_all(peer.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}
