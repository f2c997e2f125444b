//! A hash map cut into shards that grow one at a time.
//!
//! why: an event actor's per-user counts and live reservations, and SQLite's user index, grow
//! by one entry per sale, and a single map doubles all at once: at 262,144 entries that is one
//! turn of the actor spent moving every entry while every request for the event waits (a 36 ms
//! stretch on one core with the other idle, seen with `perf sched timehist` on the hot path). Shards fill evenly, so each
//! doubles on its own turn and moves 1/64 of the entries: the same work in short pauses.
//! Measured on 25 s of claims at 256 connections: the worst claim 37–42 ms instead of
//! 169–193 ms, and 9% less peak RSS (BENCHMARKS.md, run 21).

use std::borrow::Borrow;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasher, Hash};

type Shard<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

const SHARDS: usize = 64;

pub struct ShardedMap<K, V> {
    /// Picks the shard. Seeded apart from the shards' own hashers, so the keys of one shard
    /// still spread over all of its buckets.
    router: foldhash::fast::RandomState,
    shards: Box<[Shard<K, V>]>,
}

impl<K: Hash + Eq, V> Default for ShardedMap<K, V> {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl<K: Hash + Eq, V> ShardedMap<K, V> {
    /// Room for about `entries` before any shard grows.
    pub fn with_capacity(entries: usize) -> Self {
        Self {
            router: foldhash::fast::RandomState::default(),
            shards: (0..SHARDS)
                .map(|_| Shard::with_capacity_and_hasher(entries.div_ceil(SHARDS), Default::default()))
                .collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(Shard::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(Shard::is_empty)
    }

    fn shard_of<Q: Hash + ?Sized>(&self, key: &Q) -> usize {
        // The top bits: foldhash mixes them best.
        (self.router.hash_one(key) >> (64 - SHARDS.trailing_zeros())) as usize
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shards[self.shard_of(key)].get(key)
    }

    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let shard = self.shard_of(key);
        self.shards[shard].get_mut(key)
    }

    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let shard = self.shard_of(&key);
        self.shards[shard].insert(key, value)
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let shard = self.shard_of(key);
        self.shards[shard].remove(key)
    }

    pub fn entry(&mut self, key: K) -> Entry<'_, K, V> {
        let shard = self.shard_of(&key);
        self.shards[shard].entry(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_as_one_map_and_spreads_over_every_shard() {
        let mut map: ShardedMap<String, u32> = ShardedMap::default();
        for i in 0..10_000u32 {
            assert_eq!(map.insert(format!("user-{i}"), i), None);
        }
        assert_eq!(map.insert("user-7".into(), 70), Some(7));
        *map.entry("user-8".into()).or_insert(0) += 1;
        *map.entry("new".into()).or_insert(5) += 1;
        if let Some(v) = map.get_mut("user-9") {
            *v = 90;
        }
        assert_eq!(map.get("user-7"), Some(&70));
        assert_eq!(map.get("user-8"), Some(&9));
        assert_eq!(map.get("user-9"), Some(&90));
        assert_eq!(map.get("new"), Some(&6));
        assert_eq!(map.remove("user-1"), Some(1));
        assert_eq!(map.get("user-1"), None);
        assert_eq!(map.len(), 10_000);
        assert!(!map.is_empty() && ShardedMap::<u64, u64>::with_capacity(100).is_empty());
        let sizes: Vec<usize> = map.shards.iter().map(Shard::len).collect();
        let (min, max) = (sizes.iter().min().copied(), sizes.iter().max().copied());
        assert!(min > Some(100) && max < Some(250), "uneven shards: {sizes:?}");
    }
}
