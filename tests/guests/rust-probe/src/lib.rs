//! A test component for tests/components.rs: the datagram names a WASI 0.2
//! call to try through Rust's standard library, and the reply says whether
//! the gateway's deny-all context allowed it (`allowed: …` or `denied: …`).

wit_bindgen::generate!({ path: "../../../wit", world: "handler" });

use std::io::Write as _;
use std::net::{TcpStream, ToSocketAddrs as _, UdpSocket};
use std::time::Duration;

struct Probe;

fn report<T: std::fmt::Debug>(result: std::io::Result<T>) -> String {
    match result {
        Ok(v) => format!("allowed: {v:?}"),
        Err(e) => format!("denied: {:?}", e.kind()),
    }
}

impl Guest for Probe {
    fn handle(datagram: Vec<u8>, peer: String) -> Option<Vec<u8>> {
        let target = String::from_utf8_lossy(&datagram).trim().to_string();
        let reply = match target.as_str() {
            "udp" => report(UdpSocket::bind("127.0.0.1:0").and_then(|s| s.send_to(b"x", "127.0.0.1:9"))),
            "tcp" => report(TcpStream::connect("127.0.0.1:9").map(|_| ())),
            "dns" => report("localhost:80".to_socket_addrs().map(|a| a.count())),
            "file" => report(std::fs::read("/etc/passwd").map(|b| b.len())),
            "dir" => report(std::fs::read_dir(".").map(|d| d.count())),
            "env" => format!("{:?}", std::env::vars().collect::<Vec<_>>()),
            "args" => format!("{:?}", std::env::args().collect::<Vec<_>>()),
            "stdin" => report(std::io::read_to_string(std::io::stdin())),
            "sleep" => {
                std::thread::sleep(Duration::from_secs(5));
                "slept".to_string()
            }
            "print" => {
                let long = "x".repeat(4096);
                let _ = writeln!(std::io::stdout(), "to stdout {long}");
                let _ = writeln!(std::io::stderr(), "to stderr");
                "printed".to_string()
            }
            "clock" => report(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_err(std::io::Error::other).map(|_| ())),
            _ => format!("ok {peer}"),
        };
        Some(reply.into_bytes())
    }
}

export!(Probe);
