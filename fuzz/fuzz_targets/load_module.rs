//! Arbitrary bytes given to the module loader, as `check`, start-up and reload
//! give a file: binary modules, WAT text, components, anything. The oracle: no
//! panic, no abort, an answer in bounded time, and a refusal that says why.
//!
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run load_module` (from the repository root).

#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use wasmgate::config::Limits;
use wasmgate::guest::Env;

fn env() -> &'static Env {
    static SANDBOX: OnceLock<Env> = OnceLock::new();
    SANDBOX.get_or_init(|| {
        Env::new(Limits {
            timeout: Duration::from_millis(10),
            max_memory: 1 << 20,
            ..Limits::default()
        })
        .expect("a env")
    })
}

fuzz_target!(|data: &[u8]| {
    let started = Instant::now();
    let loaded = env().load("fuzz", data);
    assert!(started.elapsed() < Duration::from_secs(10), "loading took {:?}", started.elapsed());
    match loaded {
        Ok(program) => assert_eq!(program.sha256().len(), 32),
        Err(e) => assert!(!format!("{e:#}").is_empty(), "a refusal without a reason"),
    }
});
