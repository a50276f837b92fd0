//! One shard of the store: its table of entries under a lock, what it holds,
//! and the lookups, removals and evictions every call makes under that lock.

use std::sync::{Mutex, MutexGuard};

use hashbrown::HashTable;

use super::entry::{Entry, NEVER, Space};

/// One shard: its table, what it holds, and its share of the bounds.
#[repr(align(128))]
pub(super) struct Shard {
    pub(super) inner: Mutex<Inner>,
}

/// Laid out so that what `limit` writes on every call (the lock, before it,
/// and the counts) shares the table's header in one cache line: two workers
/// on different keys of one shard then move one line between their cores,
/// not two.
#[derive(Default)]
#[repr(C)]
pub(super) struct Inner {
    pub(super) table: HashTable<Entry>,
    pub(super) allowed: u64,
    pub(super) denied: u64,
    pub(super) bytes: usize,
    pub(super) evictions: u64,
    /// Buckets and counters to flush to the cluster (with a cluster scope only).
    pub(super) dirty: Vec<(Space, u64, Box<[u8]>)>,
}

impl Inner {
    /// The live entry for `key`; an expired one is removed on the way.
    pub(super) fn find(&mut self, hash: u64, space: Space, key: &[u8], now: u64) -> Option<&mut Entry> {
        match self.table.find_entry(hash, |e| e.is(hash, space, key)) {
            Ok(o) if o.get().live(now) => Some(o.into_mut()),
            Ok(o) => {
                let (gone, _) = o.remove();
                self.bytes -= gone.size();
                None
            }
            Err(_) => None,
        }
    }

    /// Notes an entry to flush to the cluster. While Redis is down nothing
    /// takes the list, and entries evicted meanwhile leave their note behind:
    /// so when the list outgrows the table, the notes of entries gone are
    /// dropped, and it stays within the state's bounds.
    pub(super) fn mark_dirty(&mut self, space: Space, hash: u64, key: &[u8]) {
        self.dirty.push((space, hash, key.into()));
        if self.dirty.len() > 2 * self.table.len() + 64 {
            let table = &self.table;
            self.dirty
                .retain(|(space, hash, key)| table.find(*hash, |e| e.is(*hash, *space, key)).is_some_and(|e| e.dirty));
        }
    }

    pub(super) fn remove(&mut self, hash: u64, space: Space, key: &[u8]) -> Option<Entry> {
        let o = self.table.find_entry(hash, |e| e.is(hash, space, key)).ok()?;
        let (gone, _) = o.remove();
        self.bytes -= gone.size();
        Some(gone)
    }

    /// Removes entries until at most `entries` and `bytes` remain: expired
    /// ones first, then those with the shortest time left. Entries without a
    /// TTL, and `protect`, are never evicted. When it must evict live entries
    /// it goes an eighth below the bounds, so that a full store does not scan
    /// on every insert. False when there is still no room.
    pub(super) fn make_room(
        &mut self,
        entries: usize,
        bytes: usize,
        now: u64,
        protect: Option<(Space, &[u8])>,
        writing: Space,
    ) -> bool {
        let fits = |s: &Self| s.table.len() <= entries && s.bytes <= bytes;
        let mut freed = 0;
        self.table.retain(|e| {
            let keep = e.live(now);
            if !keep {
                freed += e.size();
            }
            keep
        });
        self.bytes -= freed;
        if fits(self) {
            return true;
        }
        let (entries, bytes) = (entries - entries / 8, bytes - bytes / 8);
        let is_protected = |e: &Entry| protect.is_some_and(|(space, key)| e.space == space && e.key.is(key));
        // Values go first, then buckets (a bucket evicted gives its client a
        // whole burst again), each by expiry; a live penalty goes only to make
        // room for another penalty, never for others' values or buckets.
        let rank = |e: &Entry| -> Option<(u8, u64)> {
            let tier = match e.space {
                Space::Value => 0,
                Space::Bucket => 1,
                Space::Penalty if writing == Space::Penalty => 2,
                Space::Penalty => return None,
            };
            let expires = e.expires();
            (expires != NEVER && !is_protected(e)).then_some((tier, expires))
        };
        let mut ranked: Vec<((u8, u64), usize)> = self
            .table
            .iter()
            .filter_map(|e| rank(e).map(|r| (r, e.size())))
            .collect();
        ranked.sort_unstable_by_key(|&(r, _)| r);
        // The last rank that must go for the rest to fit (ties go together).
        let (mut left_entries, mut left_bytes) = (self.table.len(), self.bytes);
        let mut cut = None;
        for (r, size) in ranked {
            if left_entries <= entries && left_bytes <= bytes {
                break;
            }
            left_entries -= 1;
            left_bytes -= size;
            cut = Some(r);
        }
        if let Some(cut) = cut {
            let (mut evicted, mut freed) = (0, 0);
            self.table.retain(|e| {
                let evict = rank(e).is_some_and(|r| r <= cut);
                if evict {
                    evicted += 1;
                    freed += e.size();
                }
                !evict
            });
            self.bytes -= freed;
            self.evictions += evicted;
        }
        fits(self)
    }
}

/// A shard's lock. A panic while it was held (none is expected: nothing in
/// it calls out) leaves a consistent table, so a poisoned lock is used as is.
pub(super) fn lock(shard: &Shard) -> MutexGuard<'_, Inner> {
    shard.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
