//! State that handlers share: a bounded key-value store with TTLs, token-bucket
//! limits and penalties, one per listener, shared by all its workers and kept
//! across module reloads and instance resets (it lives in the listener's
//! sandbox, not in an instance).
//!
//! Socket-free and clock-free: every call takes the time (`now`, nanoseconds
//! on the store's own monotonic clock, [`State::now`]), so tests drive it with
//! a fake clock. Sharded: a key's shard is picked by a seeded hash, and each
//! shard is a mutex around a hash table, so two workers contend only when they
//! touch the same shard at the same instant.

mod cluster;
mod entry;
mod link;
mod redis;
mod scope;
mod shard;
mod store;

pub use cluster::ClusterSpec;
pub use entry::ENTRY_OVERHEAD;
pub use scope::ClusterStats;
pub use store::{COUNTER_MIN, MAX_KEY, MAX_VALUE, State, StateLimits, StateStats};
