//! Write wasmgate handlers as plain Rust functions.
//!
//! A handler takes the datagram and a [`Context`] and returns a [`Reply`]; the
//! [`handler!`] macro turns it into a guest that follows wasmgate's ABI v1: it
//! exports `alloc` and `handle`, keeps the datagram in a static buffer, and packs
//! the reply the way the host reads it. `no_std`, no allocator needed.
//!
//! ```ignore
//! #![no_std]
//! use wasmgate_sdk::{Context, Reply};
//!
//! fn reverse<'a>(datagram: &'a mut [u8], _ctx: &'a mut Context) -> Reply<'a> {
//!     datagram.reverse();
//!     Reply::Send(datagram)
//! }
//!
//! wasmgate_sdk::handler!(reverse);
//! ```
//!
//! A handler that only reads may take `&[u8]` and `&Context` instead: the macro
//! passes mutable references, which Rust narrows at the call.
//!
//! A handler may also forward the datagram to an upstream pool
//! ([`Context::forward`], [`Context::forward_key`]), send the client more
//! datagrams ([`Context::send`]), and see what upstreams send back by naming an
//! `on_reply` function: `handler!(handle, on_reply = answer)`. Each returns a
//! typed [`CallError`] when the host refuses.
//!
//! State shared by every worker of the listener, kept across reloads and
//! traps: values with a TTL ([`Context::state_get`], [`Context::state_set`],
//! [`Context::state_incr`], [`Context::state_cas`], [`Context::state_delete`]),
//! token-bucket limits ([`Context::limit`]) and penalties ([`Context::penalize`],
//! [`Context::penalized`]), each with a typed [`StateError`].
//!
//! Build with `cargo build --release --target wasm32-unknown-unknown` from a
//! `cdylib` crate.

#![no_std]

use core::fmt;
use core::net::SocketAddr;

/// The largest datagram the host passes and the largest reply it sends
/// (65,535 − 8 − 20: the largest UDP payload over IPv4).
pub const MAX_DATAGRAM: usize = 65_507;

/// What to send back to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply<'a> {
    /// Send these bytes as one datagram (possibly empty).
    Send(&'a [u8]),
    /// Send nothing: the host counts the datagram as `no_reply`, or as
    /// `forwarded` when the handler forwarded it.
    Nothing,
}

impl<'a> From<&'a [u8]> for Reply<'a> {
    fn from(bytes: &'a [u8]) -> Self {
        Reply::Send(bytes)
    }
}

impl<'a> From<&'a mut [u8]> for Reply<'a> {
    fn from(bytes: &'a mut [u8]) -> Self {
        Reply::Send(bytes)
    }
}

impl<'a> From<&'a str> for Reply<'a> {
    fn from(text: &'a str) -> Self {
        Reply::Send(text.as_bytes())
    }
}

impl<'a, T: Into<Reply<'a>>> From<Option<T>> for Reply<'a> {
    fn from(reply: Option<T>) -> Self {
        reply.map_or(Reply::Nothing, Into::into)
    }
}

/// Why the host refused a [`Context::forward`], [`Context::forward_key`] or
/// [`Context::send`]; each is also counted by the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallError {
    /// No pool has that name.
    UnknownPool,
    /// Every endpoint of the pool is ejected.
    NoHealthyEndpoint,
    /// The pool's session limit is reached and this client has no session yet.
    SessionOverflow,
    /// More than [`MAX_DATAGRAM`] bytes.
    Oversize,
    /// Called outside a datagram (in a start function).
    NoClient,
    /// Not returned since forwards are queued: the host counts failed sends.
    UpstreamError,
    /// `send`: past the reply budget (`--max-reply-ratio` × the datagram's size).
    Amplification,
    /// More than 64 forwards and sends for one datagram.
    TooMany,
    /// A code this SDK does not know (a newer host).
    Other(i32),
}

impl CallError {
    fn check(code: i32) -> Result<(), CallError> {
        Err(match code {
            0 => return Ok(()),
            -1 => Self::UnknownPool,
            -2 => Self::NoHealthyEndpoint,
            -3 => Self::SessionOverflow,
            -4 => Self::Oversize,
            -5 => Self::NoClient,
            -6 => Self::UpstreamError,
            -7 => Self::Amplification,
            -8 => Self::TooMany,
            other => Self::Other(other),
        })
    }
}

/// A client as the host names it (docs/ABI.md, "Shared pools"): kept beside
/// what was forwarded for it, and given back to [`Context::reply_to`] in
/// `on_reply` to say which client an answer from a shared pool is for. Lives
/// while the client goes on talking (at most the pool's `idle_timeout` after
/// its last datagram, less until it has proven its address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientHandle(u64);

impl ClientHandle {
    /// The handle as a number, to store.
    pub const fn to_bits(self) -> u64 {
        self.0
    }

    /// A handle from [`ClientHandle::to_bits`].
    pub const fn from_bits(bits: u64) -> Self {
        Self(bits)
    }
}

/// Why [`Context::reply_to`] named no client; the answer is dropped (and
/// counted) if the handler then names none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyToError {
    /// No client has that handle now: it expired, or was never given.
    Stale,
    /// The client's datagrams did not go to the endpoint that answered.
    WrongEndpoint,
    /// Another call named another client already, or past the call limit.
    TooMany,
    /// A code this SDK does not know (a newer host), or no pool at all.
    Other(i32),
}

/// Why a state call ([`Context::state_get`], [`Context::limit`], …) did nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateError {
    /// More than 64 state, forwarding and send calls for one datagram.
    TooMany,
    /// The shared state is at its bounds and nothing with a TTL is left to evict.
    Full,
    /// The key is longer than [`MAX_KEY`] bytes.
    KeyTooLong,
    /// The value is longer than [`MAX_DATAGRAM`] bytes.
    ValueTooLong,
    /// [`Context::state_incr`] on a value that is not an 8-byte counter.
    NotACounter,
    /// [`Context::state_get`]: the value is this many bytes, more than the buffer holds.
    BufferTooSmall(usize),
    /// A code this SDK does not know (a newer host).
    Other(i32),
}

/// The longest key of the shared state, in bytes.
pub const MAX_KEY: usize = 512;

impl StateError {
    fn from_code(code: i32) -> Self {
        match code {
            -8 => Self::TooMany,
            -10 => Self::Full,
            -11 => Self::KeyTooLong,
            -12 => Self::ValueTooLong,
            -14 => Self::NotACounter,
            other => Self::Other(other),
        }
    }

    /// 0 or 1 as a bool, anything else as the error it codes.
    fn flag(code: i32) -> Result<bool, Self> {
        match code {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(Self::from_code(other)),
        }
    }

    fn unit(code: i32) -> Result<(), Self> {
        match code {
            0 => Ok(()),
            other => Err(Self::from_code(other)),
        }
    }
}

/// What a handler may ask the host about the datagram it is handling.
pub struct Context {
    _private: (),
}

impl Context {
    /// The client's address.
    pub fn peer(&self) -> Option<SocketAddr> {
        let mut buf = [0u8; 64];
        self.peer_text(&mut buf)?.parse().ok()
    }

    /// The client's address as text, `ip:port` (IPv6: `[ip]:port`), written to
    /// `buf`; cheaper than [`Context::peer`] when the text is all that is needed.
    pub fn peer_text<'b>(&self, buf: &'b mut [u8; 64]) -> Option<&'b str> {
        // SAFETY: the host writes at most `cap` bytes at `ptr`, which is `buf`.
        let len = unsafe { host::peer(buf.as_mut_ptr(), buf.len() as i32) };
        let len = usize::try_from(len).ok().filter(|&n| n > 0 && n <= buf.len())?;
        core::str::from_utf8(&buf[..len]).ok()
    }

    /// Sends `data` to an endpoint of the pool named `pool`, on behalf of this
    /// client: the pool's policy picks the endpoint for a new session, and the
    /// client keeps it while it is healthy. May be called several times (fan-out).
    pub fn forward(&mut self, pool: &str, data: &[u8]) -> Result<(), CallError> {
        // SAFETY: the host reads `pool_len` bytes at `pool` and `data_len` at `data`.
        CallError::check(unsafe { host::forward(pool.as_ptr(), pool.len() as i32, data.as_ptr(), data.len() as i32) })
    }

    /// As [`Context::forward`], but the endpoint is the one `key` hashes to,
    /// whatever the client's address (a session token, a connection ID, …).
    pub fn forward_key(&mut self, pool: &str, key: &[u8], data: &[u8]) -> Result<(), CallError> {
        // SAFETY: the host reads the three regions, each from its pointer and length.
        CallError::check(unsafe {
            host::forward_key(
                pool.as_ptr(),
                pool.len() as i32,
                key.as_ptr(),
                key.len() as i32,
                data.as_ptr(),
                data.len() as i32,
            )
        })
    }

    /// Sends the client one more datagram, before the reply the handler returns.
    /// Everything sent in answer to one datagram shares one size budget.
    pub fn send(&mut self, data: &[u8]) -> Result<(), CallError> {
        // SAFETY: the host reads `len` bytes at `ptr`, which is `data`.
        CallError::check(unsafe { host::send(data.as_ptr(), data.len() as i32) })
    }

    /// A short text about this datagram for the access log (`--access-log`),
    /// written as its line's `note`: cut to 256 bytes, a later note replaces it.
    pub fn note(&mut self, text: &str) -> Result<(), CallError> {
        // SAFETY: the host reads `len` bytes at `ptr`, which is `text`.
        CallError::check(unsafe { host::note(text.as_ptr(), text.len() as i32) })
    }

    /// This client's handle, for a shared pool's answers to name it by
    /// ([`Context::reply_to`]); it stays the same while the client keeps it.
    pub fn client(&mut self) -> Result<ClientHandle, CallError> {
        // SAFETY: no arguments; the host returns a handle or a negative code.
        let bits = unsafe { host::client() };
        if let Ok(bits) = u64::try_from(bits) {
            return Ok(ClientHandle(bits));
        }
        match CallError::check(i32::try_from(bits).unwrap_or(i32::MIN)) {
            Err(error) => Err(error),
            Ok(()) => Err(CallError::Other(0)),
        }
    }

    /// Inside `on_reply` on an answer from a shared pool: the answer is for
    /// `client`. The reply and [`Context::send`]s then go to it, within what
    /// its own datagrams earned; [`Context::peer`] gives its address.
    pub fn reply_to(&mut self, client: ClientHandle) -> Result<(), ReplyToError> {
        // SAFETY: no memory is passed; the host returns 0 or a negative code.
        match unsafe { host::reply_to(client.0 as i64) } {
            0 => Ok(()),
            -15 => Err(ReplyToError::Stale),
            -16 => Err(ReplyToError::WrongEndpoint),
            -8 => Err(ReplyToError::TooMany),
            other => Err(ReplyToError::Other(other)),
        }
    }

    /// Inside `on_reply`: the endpoint that sent the datagram, as
    /// `POOL/ip:port`; `None` elsewhere.
    pub fn upstream<'b>(&self, buf: &'b mut [u8; 128]) -> Option<&'b str> {
        // SAFETY: the host writes at most `cap` bytes at `ptr`, which is `buf`.
        let len = unsafe { host::upstream(buf.as_mut_ptr(), buf.len() as i32) };
        let len = usize::try_from(len).ok().filter(|&n| n > 0 && n <= buf.len())?;
        core::str::from_utf8(&buf[..len]).ok()
    }

    /// The value of `key` in the listener's shared state, copied into `buf`;
    /// `None` if absent or expired. A counter is its 8 bytes, little-endian.
    pub fn state_get<'b>(&self, key: &[u8], buf: &'b mut [u8]) -> Result<Option<&'b [u8]>, StateError> {
        let cap = buf.len().min(i32::MAX as usize);
        // SAFETY: the host reads the key and writes at most `cap` bytes at `buf`.
        let len = unsafe { host::state_get(key.as_ptr(), key.len() as i32, buf.as_mut_ptr(), cap as i32) };
        match len {
            -9 => Ok(None),
            n if n < 0 => Err(StateError::from_code(n)),
            n if n as usize > cap => Err(StateError::BufferTooSmall(n as usize)),
            n => Ok(Some(&buf[..n as usize])),
        }
    }

    /// The value of `key`, read into the reply buffer ([`Context::reply_buffer`])
    /// and returned there, ready to be edited and sent: how a cache answers.
    pub fn state_get_reply(&mut self, key: &[u8]) -> Result<Option<&mut [u8]>, StateError> {
        let buf = self.reply_buffer();
        // SAFETY: the host reads the key and writes at most `MAX_DATAGRAM` bytes at `buf`.
        let len = unsafe { host::state_get(key.as_ptr(), key.len() as i32, buf.as_mut_ptr(), buf.len() as i32) };
        match len {
            -9 => Ok(None),
            n if n < 0 => Err(StateError::from_code(n)),
            n if n as usize > buf.len() => Err(StateError::BufferTooSmall(n as usize)),
            n => Ok(Some(&mut buf[..n as usize])),
        }
    }

    /// Sets `key` to `value` in the shared state; it expires after `ttl_ms`
    /// milliseconds (0: never). When the state is full, expired entries and
    /// then those with the least time left make room.
    pub fn state_set(&mut self, key: &[u8], value: &[u8], ttl_ms: i64) -> Result<(), StateError> {
        // SAFETY: the host reads the key and the value.
        StateError::unit(unsafe {
            host::state_set(
                key.as_ptr(),
                key.len() as i32,
                value.as_ptr(),
                value.len() as i32,
                ttl_ms,
            )
        })
    }

    /// Removes `key`; whether it was there.
    pub fn state_delete(&mut self, key: &[u8]) -> Result<bool, StateError> {
        // SAFETY: the host reads the key.
        StateError::flag(unsafe { host::state_delete(key.as_ptr(), key.len() as i32) })
    }

    /// Adds `delta` to the counter at `key`, atomically across every worker,
    /// and returns the sum. A missing counter starts at 0 and expires after
    /// `ttl_ms` (0: never): with a TTL it counts a fixed window.
    pub fn state_incr(&mut self, key: &[u8], delta: i64, ttl_ms: i64) -> Result<i64, StateError> {
        // SAFETY: the host reads the key.
        let n = unsafe { host::state_incr(key.as_ptr(), key.len() as i32, delta, ttl_ms) };
        // Counts stop 64 above i64::MIN; below that is `i64::MIN - code`.
        if n < i64::MIN + 64 {
            return Err(StateError::from_code((i64::MIN - n) as i32));
        }
        Ok(n)
    }

    /// Sets `key` to `value` only if it now holds `expected` (`None`: only if
    /// it is absent); whether it did.
    pub fn state_cas(
        &mut self,
        key: &[u8],
        expected: Option<&[u8]>,
        value: &[u8],
        ttl_ms: i64,
    ) -> Result<bool, StateError> {
        let (expected_ptr, expected_len) = match expected {
            Some(e) => (e.as_ptr(), e.len() as i32),
            None => (core::ptr::null(), -1),
        };
        // SAFETY: the host reads the three regions (none for `expected_len` -1).
        let code = unsafe {
            host::state_cas(
                key.as_ptr(),
                key.len() as i32,
                expected_ptr,
                expected_len,
                value.as_ptr(),
                value.len() as i32,
                ttl_ms,
            )
        };
        match code {
            0 => Ok(true),
            -13 => Ok(false),
            other => Err(StateError::from_code(other)),
        }
    }

    /// Takes a token from the bucket `key`, shared by every worker: up to
    /// `burst` tokens, `rate_per_s` back each second (0: never). Whether there was one.
    pub fn limit(&mut self, key: &[u8], rate_per_s: u32, burst: u32) -> Result<bool, StateError> {
        // SAFETY: the host reads the key.
        StateError::flag(unsafe { host::limit(key.as_ptr(), key.len() as i32, rate_per_s as i32, burst as i32) })
    }

    /// Marks `key` penalized for `ttl_ms` milliseconds (0 lifts it); a longer
    /// penalty already running is kept.
    pub fn penalize(&mut self, key: &[u8], ttl_ms: i64) -> Result<(), StateError> {
        // SAFETY: the host reads the key.
        StateError::unit(unsafe { host::penalize(key.as_ptr(), key.len() as i32, ttl_ms) })
    }

    /// Whether `key` is penalized now.
    pub fn penalized(&self, key: &[u8]) -> Result<bool, StateError> {
        // SAFETY: the host reads the key.
        StateError::flag(unsafe { host::penalized(key.as_ptr(), key.len() as i32) })
    }

    /// Milliseconds on the gateway's monotonic clock, the one state TTLs run
    /// on: coarse (it ticks every few milliseconds), read once per datagram,
    /// and not wall time (only differences mean anything). Not counted
    /// against the datagram's calls.
    pub fn now_ms(&self) -> u64 {
        // SAFETY: no arguments; the host only returns a number.
        unsafe { host::now_ms() as u64 }
    }

    /// A buffer of [`MAX_DATAGRAM`] bytes for building a reply that is not the
    /// datagram edited in place. Its contents are left over from earlier datagrams.
    pub fn reply_buffer(&mut self) -> &mut [u8] {
        // SAFETY: only `Context` hands this buffer out, and there is one `Context`
        // per `handle` call, borrowed mutably here. (`&raw mut` then a reborrow is
        // how a `static mut` is borrowed without a reference to it in between.)
        #[allow(clippy::deref_addrof)]
        unsafe {
            &mut *(&raw mut REPLY)
        }
    }
}

/// Log levels, as the host's `wasmgate.log` numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum Level {
    Error = 0,
    Warn = 1,
    Info = 2,
    Debug = 3,
    Trace = 4,
}

/// Logs `message` through the gateway's log. The host cuts messages at 1 KiB and
/// lets at most 20 lines a second through.
pub fn log(level: Level, message: &str) {
    // SAFETY: the host reads `len` bytes at `ptr`, which is `message`.
    unsafe { host::log(level as i32, message.as_ptr(), message.len() as i32) }
}

/// Formats and logs a message without an allocator (cut at 1 KiB).
pub fn log_fmt(level: Level, args: fmt::Arguments<'_>) {
    let mut line = Line { buf: [0; 1024], len: 0 };
    let _ = fmt::write(&mut line, args);
    // The cut may fall inside a character; the host replaces what is not UTF-8.
    // SAFETY: the host reads `len` bytes at `ptr`, which is `line.buf`.
    unsafe { host::log(level as i32, line.buf.as_ptr(), line.len as i32) }
}

/// `wasmgate_sdk::log!(Level::Info, "{} bytes", n)`: formats and logs a line.
#[macro_export]
macro_rules! log {
    ($level:expr, $($arg:tt)+) => {
        $crate::log_fmt($level, format_args!($($arg)+))
    };
}

struct Line {
    buf: [u8; 1024],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    #[cfg_attr(not(all(feature = "panic-handler", target_arch = "wasm32")), allow(dead_code))]
    fn push_number(&mut self, mut n: u32) {
        let mut digits = [0u8; 10];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

impl fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push(s.as_bytes());
        Ok(())
    }
}

mod metrics;
pub use metrics::{Metric, MetricError};

mod host {
    #[link(wasm_import_module = "wasmgate")]
    unsafe extern "C" {
        pub(crate) fn log(level: i32, ptr: *const u8, len: i32);
        pub(crate) fn peer(ptr: *mut u8, cap: i32) -> i32;
        pub(crate) fn forward(pool: *const u8, pool_len: i32, data: *const u8, data_len: i32) -> i32;
        pub(crate) fn forward_key(
            pool: *const u8,
            pool_len: i32,
            key: *const u8,
            key_len: i32,
            data: *const u8,
            data_len: i32,
        ) -> i32;
        pub(crate) fn send(ptr: *const u8, len: i32) -> i32;
        pub(crate) fn upstream(ptr: *mut u8, cap: i32) -> i32;
        pub(crate) fn note(ptr: *const u8, len: i32) -> i32;
        pub(crate) fn client() -> i64;
        pub(crate) fn reply_to(handle: i64) -> i32;
        pub(crate) fn state_get(key: *const u8, key_len: i32, buf: *mut u8, cap: i32) -> i32;
        pub(crate) fn state_set(key: *const u8, key_len: i32, value: *const u8, value_len: i32, ttl_ms: i64) -> i32;
        pub(crate) fn state_delete(key: *const u8, key_len: i32) -> i32;
        pub(crate) fn state_incr(key: *const u8, key_len: i32, delta: i64, ttl_ms: i64) -> i64;
        pub(crate) fn state_cas(
            key: *const u8,
            key_len: i32,
            expected: *const u8,
            expected_len: i32,
            value: *const u8,
            value_len: i32,
            ttl_ms: i64,
        ) -> i32;
        pub(crate) fn limit(key: *const u8, key_len: i32, rate_per_s: i32, burst: i32) -> i32;
        pub(crate) fn penalize(key: *const u8, key_len: i32, ttl_ms: i64) -> i32;
        pub(crate) fn penalized(key: *const u8, key_len: i32) -> i32;
        pub(crate) fn now_ms() -> i64;
        pub(crate) fn metric_define(
            kind: i32,
            name: *const u8,
            name_len: i32,
            labels: *const u8,
            labels_len: i32,
            buckets: *const f64,
            buckets_count: i32,
        ) -> i32;
        pub(crate) fn metric_add(id: i32, values: *const u8, values_len: i32, value: f64) -> i32;
        pub(crate) fn metric_set(id: i32, values: *const u8, values_len: i32, value: f64) -> i32;
        pub(crate) fn metric_observe(id: i32, values: *const u8, values_len: i32, value: f64) -> i32;
    }
}

/// Where the host copies each datagram.
static mut DATAGRAM: [u8; MAX_DATAGRAM] = [0; MAX_DATAGRAM];
/// [`Context::reply_buffer`]; dropped by the linker from handlers that never ask for it.
static mut REPLY: [u8; MAX_DATAGRAM] = [0; MAX_DATAGRAM];

/// Turns a handler function into the `alloc` and `handle` exports of ABI v1.
///
/// The function is called as `f(datagram: &mut [u8], ctx: &mut Context)` and must
/// return a [`Reply`] (or anything that converts into one, such as
/// `Option<&[u8]>`). Use it once per crate.
///
/// `handler!(f, on_reply = g)` also exports `on_reply`: every datagram an
/// upstream sends back goes through `g` (same signature), whose [`Reply`] goes
/// to the client. Without it, upstream datagrams reach the client unchanged.
///
/// `probe = p, probe_reply = r` after them also export the health probes of
/// pools whose `health` table says `probe = "guest"`: `p(buf, ctx)` writes the
/// probe for the endpoint [`Context::upstream`] names into `buf` (the whole
/// datagram buffer) and returns it (`Reply::Nothing`: no probe, which fails);
/// `r(answer, ctx)` returns whether that endpoint's answer is healthy. (The
/// exports are named `probe` and `probe_reply`: name `p` and `r` otherwise.)
#[macro_export]
macro_rules! handler {
    ($f:path, on_reply = $g:path, probe = $p:path, probe_reply = $r:path) => {
        $crate::handler!($f, on_reply = $g);
        $crate::__probes!($p, $r);
    };
    ($f:path, probe = $p:path, probe_reply = $r:path) => {
        $crate::handler!($f);
        $crate::__probes!($p, $r);
    };
    ($f:path, on_reply = $g:path) => {
        $crate::handler!($f);

        /// ABI v1: a datagram from an upstream, for the client it answers.
        #[unsafe(no_mangle)]
        pub extern "C" fn on_reply(ptr: i32, len: i32) -> i64 {
            // SAFETY: as for `handle`: one call at a time, after the copy.
            let (datagram, ctx) = unsafe { $crate::__private::enter(ptr, len) };
            $crate::__private::pack($crate::Reply::from($g(datagram, ctx)))
        }
    };
    ($f:path) => {
        /// ABI v1: where the host copies a datagram of `len` bytes.
        #[unsafe(no_mangle)]
        pub extern "C" fn alloc(len: i32) -> i32 {
            $crate::__private::alloc(len)
        }

        /// ABI v1: handles the datagram and returns the packed reply.
        #[unsafe(no_mangle)]
        pub extern "C" fn handle(ptr: i32, len: i32) -> i64 {
            // SAFETY: the host calls `handle` once at a time, after copying `len`
            // bytes to the buffer `alloc` returned; the references end with the call.
            let (datagram, ctx) = unsafe { $crate::__private::enter(ptr, len) };
            $crate::__private::pack($crate::Reply::from($f(datagram, ctx)))
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __probes {
    ($p:path, $r:path) => {
        /// ABI v1: the health probe for the endpoint `upstream` names.
        #[unsafe(no_mangle)]
        pub extern "C" fn probe(ptr: i32, _len: i32) -> i64 {
            // SAFETY: as for `handle`; the whole buffer is the probe's to write.
            let (buf, ctx) = unsafe { $crate::__private::enter(ptr, $crate::MAX_DATAGRAM as i32) };
            $crate::__private::pack($crate::Reply::from($p(buf, ctx)))
        }

        /// ABI v1: 0 when the endpoint's answer to the probe is healthy, -1 when not.
        #[unsafe(no_mangle)]
        pub extern "C" fn probe_reply(ptr: i32, len: i32) -> i64 {
            // SAFETY: as for `handle`.
            let (answer, ctx) = unsafe { $crate::__private::enter(ptr, len) };
            if $r(answer, ctx) { 0 } else { -1 }
        }
    };
}

#[doc(hidden)]
pub mod __private {
    use super::*;

    pub fn alloc(len: i32) -> i32 {
        if len < 0 || len as usize > MAX_DATAGRAM {
            return 0;
        }
        (&raw mut DATAGRAM) as i32
    }

    /// # Safety
    /// Only from `handle`, once per call, and the references must not outlive it.
    pub unsafe fn enter(_ptr: i32, len: i32) -> (&'static mut [u8], &'static mut Context) {
        static mut CONTEXT: Context = Context { _private: () };
        let len = (len as usize).min(MAX_DATAGRAM);
        // SAFETY: the caller guarantees these are the only live references.
        #[allow(clippy::deref_addrof)]
        unsafe {
            let datagram = core::slice::from_raw_parts_mut((&raw mut DATAGRAM).cast::<u8>(), len);
            (datagram, &mut *(&raw mut CONTEXT))
        }
    }

    pub fn pack(reply: Reply<'_>) -> i64 {
        match reply {
            Reply::Send(bytes) => ((bytes.as_ptr() as u32 as i64) << 32) | bytes.len() as u32 as i64,
            Reply::Nothing => -1,
        }
    }
}

/// Logs where the handler panicked and traps; the host counts the datagram as a
/// trap and gives the next one a fresh instance. The message is left out: formatting
/// it would pull `core::fmt` into every handler.
#[cfg(all(feature = "panic-handler", target_arch = "wasm32"))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let mut line = Line { buf: [0; 1024], len: 0 };
    line.push(b"handler panicked");
    if let Some(at) = info.location() {
        line.push(b" at ");
        line.push(at.file().as_bytes());
        for n in [at.line(), at.column()] {
            line.push(b":");
            line.push_number(n);
        }
    }
    // SAFETY: the host reads `len` bytes at `ptr`, which is `line.buf`.
    unsafe { host::log(Level::Error as i32, line.buf.as_ptr(), line.len as i32) };
    core::arch::wasm32::unreachable()
}
