//! The benchmarks' native handlers: Rust in the guest's place on wasmgate's
//! own data path, so that a benchmark measures the WebAssembly hop and
//! nothing else. Each is a [`Handler`], as the guest is; what they leave out
//! (`on_reply`, the host-call bookkeeping) takes the trait's defaults.

use std::net::SocketAddr;

use wasmgate::gateway::Handler;
use wasmgate::guest::{Answer, Rejection};
use wasmgate::upstream::Lent;
use wasmgate::verdict::{CallError, DropReason, MAX_DATAGRAM};

/// Uppercases each datagram, as the default guest does.
#[derive(Default)]
pub(crate) struct Uppercase {
    reply: Vec<u8>,
}

/// Forwards each datagram to the pool `backend`; answers go back unchanged
/// (as `examples/forward.wat` does).
#[derive(Default)]
pub(crate) struct Forward {
    refused: Option<CallError>,
}

impl Handler for Uppercase {
    fn handle(&mut self, datagram: &[u8], _: SocketAddr, _: &mut Lent) -> Result<Answer<'_>, Rejection> {
        if datagram.len() > MAX_DATAGRAM {
            return Err(DropReason::Oversize.into());
        }
        self.reply.clear();
        self.reply.extend_from_slice(datagram);
        self.reply.make_ascii_uppercase();
        Ok(Answer::native(Some(&self.reply), 0, None))
    }
}

impl Handler for Forward {
    fn handle(&mut self, datagram: &[u8], _: SocketAddr, sessions: &mut Lent) -> Result<Answer<'_>, Rejection> {
        if datagram.len() > MAX_DATAGRAM {
            return Err(DropReason::Oversize.into());
        }
        let Some(sessions) = sessions.as_deref_mut() else {
            return Ok(Answer::native(None, 0, None));
        };
        match sessions.forward(b"backend", None, datagram) {
            Ok(()) => Ok(Answer::native(None, 1, None)),
            Err(error) => {
                self.refused = Some(error);
                Ok(Answer::native(None, 0, Some(error)))
            }
        }
    }

    fn take_refused(&mut self, each: &mut dyn FnMut(CallError, u32)) {
        if let Some(error) = self.refused.take() {
            each(error, 1);
        }
    }

    fn last_calls(&mut self) -> u32 {
        1
    }
}
