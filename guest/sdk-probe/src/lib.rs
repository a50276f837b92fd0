//! A test guest for the SDK (run by `tests/sdk.rs`): the datagram is a command.
//!
//! - `peer`: the client's address, parsed by [`Context::peer`] and formatted back
//! - `peer-text`: the client's address as the host wrote it
//! - `log TEXT`: logs TEXT at info level, and `log!` a formatted line at warn; replies `logged`
//! - `silent`: no reply
//! - `build N`: N bytes of `x`, built in [`Context::reply_buffer`]
//! - `panic`: panics
//! - anything else: echoed, through `Option<&[u8]>`

#![no_std]

use core::fmt::Write as _;

use wasmgate_sdk::{Context, Level, Reply};

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
        _ => Reply::from(Some(&*datagram)),
    }
}

wasmgate_sdk::handler!(probe);
