//! A component's stdout and stderr: kept per datagram up to `OUTPUT_CAP`,
//! then passed to the log.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

use crate::verdict::OUTPUT_CAP;

/// A component's stdout or stderr: kept in memory, at most
/// [`OUTPUT_CAP`] per datagram (the rest dropped, not refused: a chatty `print` must not fail a handler), taken by the host after each call.
#[derive(Clone, Default)]
pub(super) struct LogPipe(Arc<Pipe>);

#[derive(Default)]
struct Pipe {
    /// Whether anything was written since the last take: most datagrams print
    /// nothing, and are then not charged a lock per stream.
    written: AtomicBool,
    buffer: Mutex<BytesMut>,
}

impl LogPipe {
    pub(super) fn take(&self) -> Bytes {
        if !self.0.written.swap(false, Ordering::Acquire) {
            return Bytes::new();
        }
        match self.0.buffer.lock() {
            Ok(mut buf) => buf.split().freeze(),
            Err(_) => Bytes::new(),
        }
    }

    pub(super) fn push(&self, bytes: &[u8]) {
        if let Ok(mut buf) = self.0.buffer.lock() {
            let room = OUTPUT_CAP.saturating_sub(buf.len());
            buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
            self.0.written.store(true, Ordering::Release);
        }
    }
}

impl OutputStream for LogPipe {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        // Always room: what is past the cap is dropped, not refused.
        Ok(64 << 10)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogPipe {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for LogPipe {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for LogPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogPipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn a_log_pipe_keeps_at_most_max_output_bytes_per_datagram_and_is_emptied_by_take() {
        let pipe = LogPipe::default();
        assert!(pipe.take().is_empty());
        pipe.push(&[b'a'; 1000]);
        pipe.push(&[b'b'; 100]);
        let taken = pipe.take();
        assert_eq!(taken.len(), OUTPUT_CAP);
        assert_eq!(&taken[995..1005], b"aaaaabbbbb");
        assert!(pipe.take().is_empty(), "taken once");
        pipe.push(b"next");
        assert_eq!(&pipe.take()[..], b"next", "the cap is per take, not for ever");
    }
}
