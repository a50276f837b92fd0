//! One entry of the store: its key (kept in the table slot when short), its
//! value, when it expires, and what the cluster scope tracks; and a token
//! bucket's GCRA state, kept as a value's bytes.

/// What an entry costs besides its key and value, counted against
/// `state_max_bytes` so that small entries are not free: its table slot (72
/// bytes, in a table at most 7/8 full, and a control byte) and its value's
/// allocation (a header and rounding). A unit test holds it to the slot's size.
pub const ENTRY_OVERHEAD: usize = 128;

/// Never expires.
pub(super) const NEVER: u64 = u64::MAX;
pub(super) const NS_PER_MS: u64 = 1_000_000;
const NS_PER_S: u128 = 1_000_000_000;

/// The three kinds of entry live side by side under one key space each: a
/// limit and a penalty on the client's address never clash with a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Space {
    Value,
    Bucket,
    Penalty,
}

pub(super) struct Entry {
    pub(super) hash: u64,
    pub(super) space: Space,
    pub(super) key: Key,
    /// A value's bytes; a bucket's [`Bucket`].
    pub(super) value: Box<[u8]>,
    /// Nanoseconds on the store's clock; [`NEVER`] without a TTL. A bucket's
    /// is its arrival time, read from its value (see [`Entry::expires`]).
    pub(super) until: u64,
    /// A bucket or counter with something to tell the cluster (in the
    /// shard's `dirty` list).
    pub(super) dirty: bool,
    /// A counter's increments here since the last flush (cluster scope only).
    pub(super) pending: i64,
}

/// A token bucket as a GCRA theoretical arrival time, and what the cluster
/// scope needs: tokens taken here since the last flush, the cluster-wide
/// total at the last flush, and the bucket's rate. Stored as a value's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Bucket {
    pub(crate) tat: u128,
    pub(crate) pending: u32,
    pub(crate) rate: u32,
    pub(crate) burst: u32,
    /// [`UNSEEN`] until the first flush.
    pub(crate) seen: u64,
    /// Tokens held back when the bucket was made (the other gateways' share
    /// of the burst), given back at its first flush.
    pub(crate) held: u32,
}

/// A bucket's cluster total before its first flush.
pub(crate) const UNSEEN: u64 = u64::MAX;

impl Bucket {
    const BYTES: usize = 40;

    pub(super) fn read(bytes: &[u8]) -> Self {
        let word = |r: std::ops::Range<usize>| bytes.get(r).unwrap_or(&[]);
        Self {
            tat: word(0..16).try_into().map(u128::from_le_bytes).unwrap_or(0),
            pending: word(16..20).try_into().map(u32::from_le_bytes).unwrap_or(0),
            rate: word(20..24).try_into().map(u32::from_le_bytes).unwrap_or(0),
            burst: word(24..28).try_into().map(u32::from_le_bytes).unwrap_or(0),
            seen: word(28..36).try_into().map(u64::from_le_bytes).unwrap_or(UNSEEN),
            held: word(36..40).try_into().map(u32::from_le_bytes).unwrap_or(0),
        }
    }

    pub(super) fn bytes(&self) -> [u8; Self::BYTES] {
        let mut b = [0u8; Self::BYTES];
        b[0..16].copy_from_slice(&self.tat.to_le_bytes());
        b[16..20].copy_from_slice(&self.pending.to_le_bytes());
        b[20..24].copy_from_slice(&self.rate.to_le_bytes());
        b[24..28].copy_from_slice(&self.burst.to_le_bytes());
        b[28..36].copy_from_slice(&self.seen.to_le_bytes());
        b[36..40].copy_from_slice(&self.held.to_le_bytes());
        b
    }

    /// The arrival time alone, without reading the rest.
    pub(super) fn tat_of(bytes: &[u8]) -> u128 {
        bytes
            .get(..16)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u128::from_le_bytes)
    }

    /// When a bucket is full again, and its entry can go.
    pub(super) fn expires(&self) -> u64 {
        u64::try_from(self.tat).unwrap_or(NEVER)
    }
}

/// The time one token takes to come back at `rate_per_s`; "never" (rate 0)
/// is 2^80 ns, 38 million years.
pub(crate) fn interval(rate_per_s: u32) -> u128 {
    match rate_per_s {
        0 => 1 << 80,
        r => NS_PER_S / u128::from(r),
    }
}

/// A key, kept in the table's slot when short (an address, a counter's
/// name), so that finding it reads no other memory, and compared byte by
/// byte rather than through a `memcmp` call that costs more than the bytes.
pub(super) enum Key {
    Short { len: u8, bytes: [u8; SHORT_KEY] },
    Long(Box<[u8]>),
}

/// The longest key kept in the slot: an IPv4 `a.b.c.d:port` is 21 bytes.
/// Longer ones (an IPv6 address, up to 39) cost a pointer to follow; a
/// larger slot for everyone measured slower than that.
pub(super) const SHORT_KEY: usize = 22;

impl Key {
    pub(super) fn new(key: &[u8]) -> Self {
        if key.len() <= SHORT_KEY {
            let mut bytes = [0u8; SHORT_KEY];
            bytes[..key.len()].copy_from_slice(key);
            Self::Short {
                len: key.len() as u8,
                bytes,
            }
        } else {
            Self::Long(key.into())
        }
    }

    pub(super) fn bytes(&self) -> &[u8] {
        match self {
            Self::Short { len, bytes } => &bytes[..usize::from(*len)],
            Self::Long(key) => key,
        }
    }

    pub(super) fn is(&self, key: &[u8]) -> bool {
        match self {
            Self::Short { len, bytes } => usize::from(*len) == key.len() && bytes.iter().zip(key).all(|(a, b)| a == b),
            Self::Long(long) => **long == *key,
        }
    }
}

impl Entry {
    /// Whether this is `key`'s entry in `space` (its hash compared first).
    pub(super) fn is(&self, hash: u64, space: Space, key: &[u8]) -> bool {
        self.hash == hash && self.space == space && self.key.is(key)
    }

    pub(super) fn size(&self) -> usize {
        self.key.bytes().len() + self.value.len() + ENTRY_OVERHEAD
    }

    /// When the entry goes. A bucket goes when it is full again: its arrival
    /// time, kept only in its value, so that `limit` writes one line of
    /// memory (the value's) and not also the table slot, whose neighbours
    /// are other workers' keys.
    pub(super) fn expires(&self) -> u64 {
        match self.space {
            Space::Bucket => u64::try_from(Bucket::tat_of(&self.value)).unwrap_or(NEVER),
            Space::Value | Space::Penalty => self.until,
        }
    }

    pub(super) fn live(&self, now: u64) -> bool {
        self.expires() > now
    }
}
