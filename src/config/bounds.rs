//! Every listener setting's bounds, and the parsing of the values written for
//! them: one check per setting, used by the command line and the config file
//! alike, so that both accept exactly the same values; each message says what
//! is allowed.

use std::net::SocketAddr;
use std::time::Duration;

use crate::text::quote;

/// Parses a duration written as `500ms`, `60s`, `5m` or `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || {
        format!(
            "`{}` is not a duration: give a number with ms, s, m or h, such as \"60s\" or \"500ms\"",
            quote(s)
        )
    };
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| err())?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => None,
    }
    .ok_or_else(err)?;
    // A day bounds every pool setting; longer is a typo.
    if ms == 0 || ms > 86_400_000 {
        return Err(format!("`{}` is out of range: give 1ms to 24h", quote(s)));
    }
    Ok(Duration::from_millis(ms))
}

/// The most milliseconds a datagram's time budget may be: a budget is there to
/// bound a worker, and a larger one lets one guest wedge it.
pub const MAX_TIMEOUT_MS: u64 = 60_000;

/// The most worker threads a listener may have: each holds a socket, a stack and
/// a guest instance, and more workers than cores only costs memory.
pub const MAX_WORKERS: usize = 256;

/// The largest receive batch (`recvmmsg`).
pub const MAX_BATCH: usize = 1024;

/// The default reply ratio: replies up to three times their request, as QUIC
/// allows before an address is validated (RFC 9000 §8).
pub const DEFAULT_REPLY_RATIO: f64 = 3.0;

// One check per setting, used by the command line and the config file alike, so
// that both accept exactly the same values; each message says what is allowed.

/// Checks a time budget in milliseconds.
pub fn check_timeout_ms(ms: u64) -> Result<Duration, String> {
    if (1..=MAX_TIMEOUT_MS).contains(&ms) {
        Ok(Duration::from_millis(ms))
    } else {
        Err(format!("{ms} is out of range: give 1 to {MAX_TIMEOUT_MS} milliseconds"))
    }
}

/// The longest wall-time ceiling of a guest call.
pub const MAX_WALL_TIMEOUT_MS: u64 = 600_000;

/// Checks a wall-time ceiling in milliseconds.
pub fn check_wall_timeout_ms(ms: u64) -> Result<Duration, String> {
    if (1..=MAX_WALL_TIMEOUT_MS).contains(&ms) {
        Ok(Duration::from_millis(ms))
    } else {
        Err(format!(
            "{ms} is out of range: give 1 to {MAX_WALL_TIMEOUT_MS} milliseconds"
        ))
    }
}

/// Checks a number of workers.
pub fn check_workers(n: usize) -> Result<usize, String> {
    if (1..=MAX_WORKERS).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{n} is out of range: give 1 to {MAX_WORKERS} workers"))
    }
}

/// Checks a receive batch size.
pub fn check_batch(n: usize) -> Result<usize, String> {
    if (1..=MAX_BATCH).contains(&n) {
        Ok(n)
    } else {
        Err(format!(
            "{n} is out of range: give a batch of 1 to {MAX_BATCH} datagrams"
        ))
    }
}

/// Checks a reply ratio.
pub fn check_ratio(r: f64) -> Result<f64, String> {
    if r.is_finite() && r >= 0.0 {
        Ok(r)
    } else {
        Err(format!(
            "{r} is not a ratio: give a number ≥ 0, such as 3 or 1.5 (0 disables)"
        ))
    }
}

/// Parses a whole number for a command-line flag, then applies `check`.
pub fn parse_with<T: std::str::FromStr, U>(s: &str, check: fn(T) -> Result<U, String>) -> Result<U, String> {
    let n = s
        .trim()
        .parse::<T>()
        .map_err(|_| format!("`{}` is not a number", quote(s)))?;
    check(n)
}

/// Parses `IP:PORT`, IPv6 as `[ip]:port`.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!(
            "`{}` is not an IP:PORT address such as 127.0.0.1:8008 or [::1]:8008",
            quote(s)
        )
    })
}

/// Parses `65536`, `512KiB`, `64MiB`, `1GiB` (also `K`, `M`, `G`; all powers of 1024).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let err = || {
        format!(
            "`{}` is not a size: give bytes or a number with KiB, MiB or GiB, such as 64MiB",
            quote(s)
        )
    };
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| err())?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        _ => return Err(err()),
    };
    let bytes = n.checked_mul(1 << shift).ok_or_else(err)?;
    if bytes > 4 << 30 {
        return Err(format!(
            "`{}` is over 4GiB, the most a 32-bit WebAssembly memory can hold",
            quote(s)
        ));
    }
    usize::try_from(bytes).map_err(|_| err())
}
