//! `wasmgate send`: a client for trying a gateway by hand, one datagram per
//! message (or per line of standard input) and each reply printed on a line.

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::net::{ToSocketAddrs as _, UdpSocket};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;

use crate::text::escape_control;

/// `wasmgate send`: one datagram per message, each reply printed on a line.
pub(super) fn send(addr: &str, messages: &[String], timeout: Duration) -> anyhow::Result<ExitCode> {
    let target = addr
        .to_socket_addrs()
        .with_context(|| format!("`{addr}` is not an address: give IP:PORT or HOST:PORT"))?
        .next()
        .with_context(|| format!("`{addr}` resolves to no address"))?;
    let local = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let socket = UdpSocket::bind(local).context("cannot open a UDP socket")?;
    // Connected: replies from anyone else are not mistaken for the gateway's.
    socket
        .connect(target)
        .with_context(|| format!("cannot send to {target}"))?;
    let mut all_answered = true;
    // A reply is someone else's bytes: on a terminal, escape sequences in it would
    // move the cursor, retitle the window or worse.
    let terminal = std::io::stdout().is_terminal();
    let mut ask = |message: &[u8]| -> anyhow::Result<()> {
        let reply = exchange(&socket, message, timeout)?;
        let mut out = std::io::stdout().lock();
        match reply {
            Some(reply) => writeln!(out, "{}", printable(&reply, terminal))?,
            None => {
                all_answered = false;
                writeln!(out, "no reply (after {} ms)", timeout.as_millis())?;
            }
        }
        out.flush()?;
        Ok(())
    };
    if messages.is_empty() {
        let stdin = std::io::stdin();
        let prompt = stdin.is_terminal();
        let mut lines = stdin.lock().lines();
        loop {
            if prompt {
                print!(">>: ");
                std::io::stdout().flush()?;
            }
            let Some(line) = lines.next() else { break };
            ask(line?.as_bytes())?;
        }
    } else {
        for m in messages {
            ask(m.as_bytes())?;
        }
    }
    Ok(if all_answered {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A reply as text: invalid UTF-8 replaced, and control characters escaped when
/// it goes to a terminal (to a pipe or file it is passed as it is).
fn printable(reply: &[u8], terminal: bool) -> String {
    let text = String::from_utf8_lossy(reply);
    if terminal {
        escape_control(&text).into_owned()
    } else {
        text.into_owned()
    }
}

/// Sends one datagram and waits for one reply, ignoring late replies to earlier ones.
fn exchange(socket: &UdpSocket, message: &[u8], timeout: Duration) -> anyhow::Result<Option<Vec<u8>>> {
    socket.set_nonblocking(true)?;
    let mut buf = vec![0u8; 65_536];
    while socket.recv(&mut buf).is_ok() {} // a late reply to an earlier message
    socket.set_nonblocking(false)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.send(message).context("cannot send")?;
    match socket.recv(&mut buf) {
        Ok(n) => Ok(Some(buf[..n].to_vec())),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e).context("cannot receive"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_to_a_terminal_have_their_escape_sequences_escaped() {
        let reply = b"ok\x1b]0;owned\x07\x1b[2J\r\n";
        assert_eq!(printable(reply, true), "ok\\u{1b}]0;owned\\u{7}\\u{1b}[2J\\r\\n");
        assert_eq!(printable(reply, false).as_bytes(), reply);
    }
}
