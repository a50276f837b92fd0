//! A test component for tests/components.rs: each datagram is one command on
//! the listener's shared state, as text, and the reply is its result.
//!
//! `get K`, `set K V [TTL_MS]`, `del K`, `incr K [DELTA]`, `cas K OLD|- NEW`,
//! `limit K RATE BURST`, `penalize K TTL_MS`, `penalized K`.

wit_bindgen::generate!({ path: "../../../wit", world: "stateful-handler" });

use wasmgate::handler::state;

struct Probe;

fn text(result: Result<impl std::fmt::Debug, state::StateError>) -> String {
    match result {
        Ok(v) => format!("{v:?}"),
        Err(e) => format!("error {}", e.name()),
    }
}

impl Guest for Probe {
    fn handle(datagram: Vec<u8>, _peer: String) -> Option<Vec<u8>> {
        let line = String::from_utf8_lossy(&datagram).into_owned();
        let words: Vec<&str> = line.split_whitespace().collect();
        let number = |i: usize, default: i64| words.get(i).and_then(|w| w.parse().ok()).unwrap_or(default);
        let key = words.get(1).copied().unwrap_or("").as_bytes();
        let reply = match words.first().copied() {
            Some("get") => match state::get(key) {
                Ok(Some(v)) => String::from_utf8_lossy(&v).into_owned(),
                other => text(other),
            },
            Some("set") => text(state::set(key, words.get(2).unwrap_or(&"").as_bytes(), number(3, 0))),
            Some("del") => text(state::delete(key)),
            Some("incr") => text(state::incr(key, number(2, 1), 0)),
            Some("cas") => {
                let old = words.get(2).filter(|w| **w != "-").map(|w| w.as_bytes());
                text(state::cas(key, old, words.get(3).unwrap_or(&"").as_bytes(), 0))
            }
            Some("limit") => text(state::limit(key, number(2, 0) as u32, number(3, 1) as u32)),
            Some("penalize") => text(state::penalize(key, number(2, 0))),
            Some("penalized") => text(state::penalized(key)),
            _ => "unknown command".to_string(),
        };
        Some(reply.into_bytes())
    }
}

export!(Probe);
