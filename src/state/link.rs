//! The connection to Redis: plain TCP, a Unix socket or TLS (`rediss://`),
//! with `AUTH` and `SELECT` from the URL, and round trips that a hostile or
//! broken server cannot stretch past one deadline or grow past a byte cap.
//!
//! The `redis` crate encodes the commands and parses the replies; the socket
//! is ours, because its own connection reads whatever a reply claims to be
//! (a 600 MB bulk string took the gateway to 1.1 GiB) and gives each reply a
//! timeout of its own (a trickled reply kept the link "up" for minutes).

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{ConnectionAddr, IntoConnectionInfo as _, RedisResult, Value};

/// The most one round trip may read. Replies to a flush are an integer or
/// two per key and at most [`super::cluster::PENALTY_READ`] penalties of a
/// key each; a reply past this is not Redis answering us.
pub(super) const MAX_REPLY_BYTES: usize = 8 << 20;

/// Where to connect and as whom; parsed once, when the listener starts.
#[derive(Clone)]
pub(super) struct Target {
    addr: Addr,
    username: Option<String>,
    password: Option<String>,
    db: i64,
}

#[derive(Clone)]
enum Addr {
    Tcp {
        host: String,
        port: u16,
    },
    Tls {
        host: String,
        port: u16,
        config: Arc<rustls::ClientConfig>,
    },
    Unix(PathBuf),
}

impl Target {
    /// Parses `redis://`, `rediss://` or `redis+unix://` URLs; a TLS URL
    /// trusts `ca` (a PEM file) if given, else the system's roots.
    pub(super) fn parse(url: &str, ca: Option<&Path>) -> anyhow::Result<Self> {
        // The crate parses TLS URLs only when built with its own TLS, which
        // we do not use: it reads the rest of the URL as a plain one.
        let (tls, plain) = match url.strip_prefix("rediss://") {
            Some(rest) => (true, format!("redis://{rest}")),
            None => (false, url.to_string()),
        };
        let info = plain.as_str().into_connection_info()?;
        let settings = info.redis_settings();
        let addr = match (info.addr(), tls) {
            (ConnectionAddr::Tcp(host, port), false) => Addr::Tcp {
                host: host.clone(),
                port: *port,
            },
            (ConnectionAddr::Tcp(host, port), true) => Addr::Tls {
                host: host.clone(),
                port: *port,
                config: Arc::new(tls_config(ca)?),
            },
            (ConnectionAddr::Unix(path), false) => Addr::Unix(path.clone()),
            _ => anyhow::bail!("this kind of Redis address is not supported"),
        };
        if ca.is_some() && !tls {
            anyhow::bail!("a CA file is for a TLS URL: write rediss://HOST:PORT");
        }
        Ok(Self {
            addr,
            username: settings.username().map(str::to_string),
            password: settings.password().map(str::to_string),
            db: settings.db(),
        })
    }

    /// Connects, says who we are and picks the database, all within `timeout`.
    pub(super) fn connect(&self, timeout: Duration) -> RedisResult<Link> {
        let deadline = Instant::now() + timeout;
        let stream = match &self.addr {
            Addr::Tcp { host, port } => Stream::Tcp(tcp(host, *port, timeout)?),
            Addr::Unix(path) => Stream::Unix(UnixStream::connect(path)?),
            Addr::Tls { host, port, config } => {
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                let session = rustls::ClientConnection::new(Arc::clone(config), name).map_err(io::Error::other)?;
                let socket = tcp(host, *port, timeout)?;
                Stream::Tls(Box::new(rustls::StreamOwned::new(session, socket)))
            }
        };
        let mut link = Link {
            stream,
            parser: redis::Parser::new(),
        };
        let mut hello = redis::pipe();
        if let Some(password) = &self.password {
            let auth = hello.cmd("AUTH");
            if let Some(user) = &self.username {
                auth.arg(user);
            }
            auth.arg(password);
        }
        if self.db != 0 {
            hello.cmd("SELECT").arg(self.db);
        }
        if !hello.is_empty() {
            for reply in link.round_trip(&hello, &[], deadline.saturating_duration_since(Instant::now()))? {
                if let Value::ServerError(e) = reply {
                    return Err(e.into());
                }
            }
        }
        Ok(link)
    }
}

fn tcp(host: &str, port: u16, timeout: Duration) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the host name has no address");
    for addr in (host, port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// TLS 1.2 or 1.3 with the server's name checked against the roots.
fn tls_config(ca: Option<&Path>) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let shown = path.display();
            for cert in CertificateDer::pem_file_iter(path)
                .map_err(|e| anyhow::anyhow!("cannot read the CA file {shown}: {e}"))?
            {
                let cert = cert.map_err(|e| anyhow::anyhow!("the CA file {shown} is not PEM: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| anyhow::anyhow!("the CA file {shown}: {e}"))?;
            }
            if roots.is_empty() {
                anyhow::bail!("the CA file {shown} holds no certificate");
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                anyhow::bail!("rediss:// needs trusted roots: the system has none; give a CA file");
            }
        }
    }
    // ring, not aws-lc-rs: it builds with no cmake or assembler toolchain.
    // (rustls deprecates it for lacking post-quantum key exchange.)
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Self::Unix(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Self::Tls(s) => {
                s.sock.set_read_timeout(read)?;
                s.sock.set_write_timeout(write)
            }
        }
    }

    fn io(&mut self) -> &mut dyn ReadWrite {
        match self {
            Self::Tcp(s) => s,
            Self::Unix(s) => s,
            Self::Tls(s) => &mut **s,
        }
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// One open connection. Any error leaves it unusable: the caller drops it.
pub(super) struct Link {
    stream: Stream,
    parser: redis::Parser,
}

impl Link {
    /// Sends `pipe` and reads its replies (less those of the `ignored`
    /// commands) under one deadline for the whole round trip and within
    /// [`MAX_REPLY_BYTES`]. A command's error reply comes back in its place.
    pub(super) fn round_trip(
        &mut self,
        pipe: &redis::Pipeline,
        ignored: &[usize],
        timeout: Duration,
    ) -> RedisResult<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        self.stream.set_timeouts(None, Some(timeout))?;
        let io = self.stream.io();
        io.write_all(&pipe.get_packed_pipeline())?;
        io.flush()?;
        let mut reader = Bounded {
            inner: &mut self.stream,
            deadline,
            left: MAX_REPLY_BYTES,
        };
        let mut replies = Vec::with_capacity(pipe.len());
        for i in 0..pipe.len() {
            let value = self.parser.parse_value(&mut reader)?;
            if !ignored.contains(&i) {
                replies.push(value);
            }
        }
        Ok(replies)
    }
}

/// Reads from the stream until the deadline and up to a byte budget.
struct Bounded<'a> {
    inner: &'a mut Stream,
    deadline: Instant,
    left: usize,
}

impl Read for Bounded<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let time_left = self.deadline.saturating_duration_since(Instant::now());
        if time_left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "Redis did not answer in time"));
        }
        if self.left == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a reply over {} MiB is not one to a flush", MAX_REPLY_BYTES >> 20),
            ));
        }
        self.inner.set_timeouts(Some(time_left), Some(time_left))?;
        let n = buf.len().min(self.left);
        let read = self.inner.io().read(&mut buf[..n])?;
        if read == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "Redis closed the connection",
            ));
        }
        self.left -= read;
        Ok(read)
    }
}
