//! A wasmgate handler as a component, written in Rust with typed bindings
//! (wit-bindgen) to the `proxy` world of `wit/handler.wit`: a sharding router.
//!
//! A datagram `KEY rest…` goes to the endpoint of pool `shards` that owns KEY
//! (`forward-key`: rendezvous hashing on the key), so every datagram for one key
//! reaches the same backend, whichever client sends it. Backends answer through
//! `on-reply`, which passes the answer to the client. A datagram without a key,
//! or one the pool cannot take, is answered `ERR reason` at once.

wit_bindgen::generate!({ path: "../../wit", world: "proxy" });
// `CallError` comes into scope with the world (`use types.{call-error}`).


/// The pool the router forwards to; configure it with `--upstream shards=…`.
const POOL: &str = "shards";

/// Log levels of the world's `log`.
const WARN: u8 = 1;
const DEBUG: u8 = 3;

struct Router;

impl Guest for Router {
    fn handle(datagram: Vec<u8>, peer: String) -> Option<Vec<u8>> {
        let key = datagram.split(|&b| b == b' ' || b == b'\n').next().unwrap_or_default();
        if key.is_empty() {
            return Some(b"ERR no key".to_vec());
        }
        match forward_key(POOL, key, &datagram) {
            Ok(()) => None,
            Err(e) => {
                log(WARN, &format!("cannot forward for {peer}: {}", e.name()));
                Some(format!("ERR {}", reason(e)).into_bytes())
            }
        }
    }

    fn on_reply(datagram: Vec<u8>, peer: String, upstream: String) -> Option<Vec<u8>> {
        log(DEBUG, &format!("{upstream} answered {peer} with {} bytes", datagram.len()));
        Some(datagram)
    }
}

/// A short reason for the client.
fn reason(e: CallError) -> &'static str {
    match e {
        CallError::UnknownPool => "no pool named shards",
        CallError::NoHealthyEndpoint => "no backend is up",
        CallError::SessionOverflow => "too many clients",
        CallError::Oversize => "too large",
        _ => "cannot forward",
    }
}

export!(Router);
