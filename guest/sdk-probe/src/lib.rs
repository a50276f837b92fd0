//! A test guest for the SDK (run by `tests/sdk.rs`): the datagram is a command.
//!
//! - `peer`: the client's address, parsed by [`Context::peer`] and formatted back
//! - `peer-text`: the client's address as the host wrote it
//! - `log TEXT`: logs TEXT at info level, and `log!` a formatted line at warn; replies `logged`
//! - `silent`: no reply
//! - `build N`: N bytes of `x`, built in [`Context::reply_buffer`]
//! - `panic`: panics
//! - `send TEXT`: sends TEXT twice, then replies `sent`
//! - `sendbig`: sends 1,000 bytes (past the reply budget of so short a datagram);
//!   replies with the error's name
//! - `fwd POOL TEXT`: forwards TEXT to POOL; on an error, replies with its name
//! - `key POOL KEY TEXT`: forwards TEXT to POOL by KEY; likewise
//! - `metric LABEL N`: adds 1 to the counter `probe_requests{label}`, sets the
//!   gauge `probe_last` to N and observes N in the histogram `probe_sizes`
//!   (buckets 10, 100); replies `counted`, or the first error's name
//! - `badmetric`: adds to the counter `bad name`; replies with the error's name
//! - anything else: echoed, through `Option<&[u8]>`
//!
//! What upstreams send back goes through `back`: `via POOL/ip:port DATA`.

#![no_std]

use core::fmt::Write as _;

use wasmgate_sdk::{CallError, Context, Level, Metric, Reply};

static REQUESTS: Metric = Metric::counter("probe_requests", &["label"]);
static LAST: Metric = Metric::gauge("probe_last", &[]);
static SIZES: Metric = Metric::histogram("probe_sizes", &[], &[10.0, 100.0]);
static BAD: Metric = Metric::counter("bad name", &[]);

struct Cursor<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl core::fmt::Write for Cursor<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let end = self.len + s.len();
        self.buf
            .get_mut(self.len..end)
            .ok_or(core::fmt::Error)?
            .copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

fn probe<'a>(datagram: &'a mut [u8], ctx: &'a mut Context) -> Reply<'a> {
    let (command, argument) = match datagram.iter().position(|&b| b == b' ') {
        Some(i) => (&datagram[..i], &datagram[i + 1..]),
        None => (&datagram[..], &[][..]),
    };
    match command {
        b"peer" => {
            let Some(peer) = ctx.peer() else { return Reply::Nothing };
            let mut out = Cursor {
                buf: ctx.reply_buffer(),
                len: 0,
            };
            let _ = write!(out, "{peer}");
            let len = out.len;
            Reply::Send(&ctx.reply_buffer()[..len])
        }
        b"peer-text" => {
            let mut text = [0u8; 64];
            let Some(peer) = ctx.peer_text(&mut text) else {
                return Reply::Nothing;
            };
            let len = peer.len();
            let out = ctx.reply_buffer();
            out[..len].copy_from_slice(peer.as_bytes());
            Reply::Send(&out[..len])
        }
        b"log" => {
            wasmgate_sdk::log(Level::Info, core::str::from_utf8(argument).unwrap_or("(not UTF-8)"));
            wasmgate_sdk::log!(Level::Warn, "formatted: {} bytes", argument.len());
            Reply::from("logged")
        }
        b"silent" => Reply::Nothing,
        b"build" => {
            let n: usize = core::str::from_utf8(argument)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let out = ctx.reply_buffer();
            let n = n.min(out.len());
            out[..n].fill(b'x');
            Reply::Send(&out[..n])
        }
        b"panic" => panic!("asked to"),
        b"send" => {
            for _ in 0..2 {
                if let Err(e) = ctx.send(argument) {
                    return error_reply(ctx, e);
                }
            }
            Reply::from("sent")
        }
        b"sendbig" => {
            let big = [b'b'; 1000];
            match ctx.send(&big) {
                Ok(()) => Reply::from("sent"),
                Err(e) => error_reply(ctx, e),
            }
        }
        b"fwd" | b"key" => {
            let mut words = argument.splitn(if command == b"key" { 3 } else { 2 }, |&b| b == b' ');
            let pool = core::str::from_utf8(words.next().unwrap_or(b"")).unwrap_or("");
            let key = if command == b"key" { words.next() } else { None };
            let text = words.next().unwrap_or(b"");
            let result = match key {
                Some(key) => ctx.forward_key(pool, key, text),
                None => ctx.forward(pool, text),
            };
            match result {
                Ok(()) => Reply::Nothing,
                Err(e) => error_reply(ctx, e),
            }
        }
        b"metric" => {
            let mut words = argument.splitn(2, |&b| b == b' ');
            let label = core::str::from_utf8(words.next().unwrap_or(b"")).unwrap_or("");
            let n: f64 = core::str::from_utf8(words.next().unwrap_or(b""))
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0.0);
            let result = REQUESTS
                .add(&[label], 1.0)
                .and_then(|()| LAST.set(&[], n))
                .and_then(|()| SIZES.observe(&[], n));
            match result {
                Ok(()) => Reply::from("counted"),
                Err(e) => debug_reply(ctx, e),
            }
        }
        b"badmetric" => match BAD.add(&[], 1.0) {
            Ok(()) => Reply::from("counted"),
            Err(e) => debug_reply(ctx, e),
        },
        _ => Reply::from(Some(&*datagram)),
    }
}

/// `value` as `Debug` writes it, as the reply.
fn debug_reply(ctx: &mut Context, value: impl core::fmt::Debug) -> Reply<'_> {
    let mut out = Cursor {
        buf: ctx.reply_buffer(),
        len: 0,
    };
    let _ = write!(out, "{value:?}");
    let len = out.len;
    Reply::Send(&ctx.reply_buffer()[..len])
}

/// The name of `error`, as the reply.
fn error_reply(ctx: &mut Context, error: CallError) -> Reply<'_> {
    debug_reply(ctx, error)
}

/// An upstream's datagram: `via POOL/ip:port DATA`.
fn back<'a>(datagram: &'a mut [u8], ctx: &'a mut Context) -> Reply<'a> {
    let mut name = [0u8; 128];
    let upstream = ctx.upstream(&mut name).unwrap_or("?");
    let mut out = Cursor {
        buf: ctx.reply_buffer(),
        len: 0,
    };
    let _ = write!(out, "via {upstream} ");
    let len = out.len;
    let end = len + datagram.len();
    let buf = ctx.reply_buffer();
    buf[len..end].copy_from_slice(datagram);
    Reply::Send(&buf[..end])
}

wasmgate_sdk::handler!(probe, on_reply = back);
