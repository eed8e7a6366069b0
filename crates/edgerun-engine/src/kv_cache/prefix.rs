//! Bookkeeping for automatic prefix caching over the paged KV pool.
//!
//! The pool is a fixed number of blocks, each holding the keys and values of `block_size`
//! token positions. [`PrefixAllocator`] hands block ids out and takes them back like a plain
//! allocator, and in addition remembers which full blocks hold which content, so that a new
//! sequence whose prompt begins with tokens already computed can reuse those blocks instead of
//! computing them again. It is pure bookkeeping: no tensors, no model, no locks (the caller
//! wraps it in a `Mutex`).
//!
//! **Hash chains.** A full block is addressed by a [`BlockHash`] over the parent block's hash,
//! the block's token ids and a salt. The KV values at a position depend on every token before
//! it, not only on the tokens inside its block, so the parent is part of the hash: two blocks
//! with the same tokens but different histories get different hashes, and a hash identifies
//! the whole prefix `tokens[..(i + 1) * block_size]`. The salt stands for everything else that
//! changes the stored values: the model and its weights, the KV dtype or quantization, the
//! rope settings, adapters, and anything else of the kind. Two requests may share a block only
//! if their salts are equal, so the salt must cover all of it. The hash is 64 bits and is not
//! verified against the tokens; a collision would reuse wrong KV values, which at 64 bits over
//! realistic pool sizes is negligible but not impossible.
//!
//! **Only full blocks are shared.** A block becomes findable only when the caller has written
//! all `block_size` positions and calls [`PrefixAllocator::register`]. The last, partial
//! block of a sequence is always private: the sequence goes on writing into it, and a block
//! that others read must never change. Reused blocks are read-only to their new owners; the
//! new sequence starts writing in a fresh block after them. [`PrefixAllocator::acquire`] takes
//! a `max_cached` cap so that the caller can always leave at least one token to compute (the
//! model needs the logits of the last prompt token).
//!
//! **Refcounts, free and evictable.** Every block has a reference count: the number of
//! sequences holding it. A block is in exactly one of three states: *held* (count > 0),
//! *evictable* (count 0, still registered under its hash, so a later sequence can find and
//! reuse it), or *free* (count 0, no hash). When the count drops to zero a registered block
//! becomes evictable and an unregistered one goes back to the free list. Both free and
//! evictable blocks count as available: an allocation takes free blocks first and, once they
//! run out, evicts the least recently used evictable block (the one whose count reached zero
//! longest ago), which drops its hash. The LRU order is an intrusive doubly linked list over
//! block ids, so every operation costs O(blocks touched), never O(pool). `release` processes
//! ids in the order given, the last becoming the most recently used; a caller that releases a
//! sequence's blocks tail first keeps the head of its chain longest, which is what matters,
//! since once a chain's head block is evicted the blocks after it can no longer be reached.
//!
//! **All or nothing.** [`PrefixAllocator::acquire`] either hands out everything asked for (the
//! reused prefix plus the fresh blocks) or returns `None` and changes nothing, so that an
//! admission that does not fit leaves no half-taken blocks and no disturbed LRU order behind.
//! The accounting has one trap: an evictable block that is reused stops being evictable, so it
//! cannot also be counted as available for the fresh part. `acquire` checks
//! `fresh <= free + evictable - (evictable blocks it reuses)` before it commits anything.
//!
//! Caller bugs (releasing a block more often than it was held, ids outside the pool,
//! registering a block nobody holds) are ignored without panicking; double releases are
//! counted in [`PrefixAllocator::double_releases`], and a block is never handed out twice.

use std::collections::HashMap;

pub type BlockId = u32;

/// The content address of a full block: a hash over (the parent block's hash, the block's
/// token ids, a salt that stands for everything else that changes the KV values, e.g. the
/// model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockHash(pub u64);

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
/// Seed of every chain; changing the hash construction should change this constant.
const SEED: u64 = 0x6564_6765_7275_6e01; // "edgerun" + version 1

/// One xxhash64-style round: absorbs a 64-bit word into the running state.
fn absorb(acc: u64, word: u64) -> u64 {
    let k = word.wrapping_mul(P2).rotate_left(31).wrapping_mul(P1);
    (acc ^ k).rotate_left(27).wrapping_mul(P1).wrapping_add(P3)
}

/// The splitmix64 finalizer: every input bit affects every output bit.
fn finish(mut h: u64) -> u64 {
    h ^= h >> 30;
    h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^ (h >> 31)
}

impl BlockHash {
    /// Hash of one full block. Deterministic across runs, processes and platforms.
    pub fn chain(parent: Option<BlockHash>, salt: u64, tokens: &[u32]) -> BlockHash {
        let mut h = SEED;
        // A tag keeps "no parent" apart from every possible parent value.
        h = match parent {
            None => absorb(h, 0),
            Some(BlockHash(p)) => absorb(absorb(h, 1), p),
        };
        h = absorb(h, salt);
        h = absorb(h, tokens.len() as u64);
        let mut pairs = tokens.chunks_exact(2);
        for pair in &mut pairs {
            h = absorb(h, u64::from(pair[0]) | (u64::from(pair[1]) << 32));
        }
        if let [last] = pairs.remainder() {
            h = absorb(h, u64::from(*last));
        }
        BlockHash(finish(h))
    }

    /// The chain hashes of every full block of `tokens` (a trailing partial block gets none):
    /// `hashes[i]` covers `tokens[..(i + 1) * block_size]`. A `block_size` of 0 gives none.
    pub fn of_prefix(tokens: &[u32], block_size: usize, salt: u64) -> Vec<BlockHash> {
        if block_size == 0 {
            return Vec::new();
        }
        let mut parent = None;
        tokens
            .chunks_exact(block_size)
            .map(|block| {
                let h = BlockHash::chain(parent, salt, block);
                parent = Some(h);
                h
            })
            .collect()
    }
}

/// What `acquire` handed out: `cached` are reused blocks (already holding the KV of the first
/// `cached.len() * block_size` positions), `fresh` are new blocks for the rest.
#[derive(Debug, PartialEq, Eq)]
pub struct Acquired {
    pub cached: Vec<BlockId>,
    pub fresh: Vec<BlockId>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PrefixStats {
    /// Blocks registered under a hash (held or evictable).
    pub cached_blocks: usize,
    /// Registered blocks no sequence holds.
    pub evictable_blocks: usize,
    /// Blocks reused by `acquire`.
    pub hits: u64,
    /// Evictable blocks taken for fresh allocations (their hashes dropped).
    pub evictions: u64,
}

/// End of the LRU list.
const NIL: u32 = u32::MAX;

/// Block allocator with content-addressed reuse of full blocks; see the module docs.
#[derive(Debug)]
pub struct PrefixAllocator {
    enabled: bool,
    /// Per block: how many sequences hold it.
    refcount: Vec<u32>,
    /// Per block: the hash it is registered under, if any.
    hash_of: Vec<Option<BlockHash>>,
    /// The findable blocks: `index[h] == b` exactly when `hash_of[b] == Some(h)`.
    index: HashMap<BlockHash, BlockId>,
    /// Free block ids; allocation pops from the end (lowest ids first initially).
    free: Vec<BlockId>,
    /// Intrusive LRU list of evictable blocks: `head` is the least recently used.
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    evictable: usize,
    hits: u64,
    evictions: u64,
    double_releases: u64,
}

impl PrefixAllocator {
    /// `total` blocks, all free; `enabled == false` makes it behave exactly like a plain
    /// allocator (lookups never hit, register is a no-op, released blocks go straight back to
    /// free).
    pub fn new(total: usize, enabled: bool) -> Self {
        assert!(
            total < NIL as usize,
            "a KV pool of {total} blocks does not fit u32 ids"
        );
        Self {
            enabled,
            refcount: vec![0; total],
            hash_of: vec![None; total],
            index: HashMap::new(),
            free: (0..total as u32).rev().collect(),
            prev: vec![NIL; total],
            next: vec![NIL; total],
            head: NIL,
            tail: NIL,
            evictable: 0,
            hits: 0,
            evictions: 0,
            double_releases: 0,
        }
    }

    pub fn total(&self) -> usize {
        self.refcount.len()
    }

    /// Blocks an allocation could get now: free ones plus cached ones no sequence holds.
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable
    }

    /// How many leading blocks of `hashes` are cached right now (held or evictable); no side
    /// effects. For admission planning.
    pub fn cached_prefix_len(&self, hashes: &[BlockHash]) -> usize {
        if !self.enabled {
            return 0;
        }
        hashes
            .iter()
            .take_while(|h| self.index.contains_key(h))
            .count()
    }

    /// All or nothing: reuses the longest cached prefix of `hashes` (at most `max_cached`
    /// blocks of it) and takes `fresh` new blocks. Returns `None` and changes nothing when the
    /// blocks needed are not available.
    pub fn acquire(
        &mut self,
        hashes: &[BlockHash],
        max_cached: usize,
        fresh: usize,
    ) -> Option<Acquired> {
        let mut cached = Vec::new();
        if self.enabled {
            for h in hashes.iter().take(max_cached) {
                match self.index.get(h) {
                    Some(&b) => cached.push(b),
                    None => break,
                }
            }
        }
        // Take the reused blocks tentatively, counting the evictable ones among them. Bumping
        // the count as we go makes a block that appears twice count once; the LRU list is not
        // touched yet, so a rollback restores everything exactly.
        let mut revived = 0;
        for &b in &cached {
            let rc = &mut self.refcount[b as usize];
            if *rc == 0 {
                revived += 1;
            }
            *rc += 1;
        }
        if fresh > self.free.len() + (self.evictable - revived) {
            for &b in &cached {
                self.refcount[b as usize] -= 1;
            }
            return None;
        }
        for &b in &cached {
            // Held now, so no longer evictable (a duplicate is unlinked on its first sight).
            if self.is_linked(b) {
                self.unlink(b);
                self.evictable -= 1;
            }
        }
        self.hits += cached.len() as u64;
        let fresh = (0..fresh).map(|_| self.take_fresh()).collect();
        Some(Acquired { cached, fresh })
    }

    /// Plain allocation of `n` fresh blocks (no reuse).
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        self.acquire(&[], 0, n).map(|a| a.fresh)
    }

    /// The caller has written a full block's KV: makes `block` findable under `hash`. Returns
    /// whether `block` is now registered under `hash` (true also for a repeated registration
    /// with the same hash). False, and nothing changes, when prefix caching is disabled, when
    /// `block` is not held (a caller bug), when it already has another hash, or when another
    /// block is registered under `hash` (that one stays the findable one).
    pub fn register(&mut self, block: BlockId, hash: BlockHash) -> bool {
        let i = block as usize;
        if !self.enabled || self.refcount.get(i).is_none_or(|&rc| rc == 0) {
            return false;
        }
        match self.hash_of[i] {
            Some(existing) => existing == hash,
            None if self.index.contains_key(&hash) => false,
            None => {
                self.hash_of[i] = Some(hash);
                self.index.insert(hash, block);
                true
            }
        }
    }

    /// Gives blocks back (count -= 1). At zero a registered block becomes evictable (most
    /// recently used) and an unregistered one goes back to the free list. Ids not held, or out
    /// of range, are ignored and counted in [`Self::double_releases`].
    pub fn release(&mut self, blocks: &[BlockId]) {
        for &b in blocks {
            let Some(rc) = self.refcount.get_mut(b as usize) else {
                self.double_releases += 1;
                continue;
            };
            if *rc == 0 {
                self.double_releases += 1;
                continue;
            }
            *rc -= 1;
            if *rc == 0 {
                if self.hash_of[b as usize].is_some() {
                    self.push_back(b);
                    self.evictable += 1;
                } else {
                    self.free.push(b);
                }
            }
        }
    }

    /// Drops every evictable block back to free (e.g. an operator flush); held blocks keep
    /// their hashes.
    pub fn clear_evictable(&mut self) {
        while self.head != NIL {
            let b = self.head;
            self.unlink(b);
            self.forget(b);
            self.free.push(b);
        }
        self.evictable = 0;
    }

    pub fn stats(&self) -> PrefixStats {
        PrefixStats {
            cached_blocks: self.index.len(),
            evictable_blocks: self.evictable,
            hits: self.hits,
            evictions: self.evictions,
        }
    }

    /// Releases of blocks not held, or of ids outside the pool (caller bugs), so far.
    pub fn double_releases(&self) -> u64 {
        self.double_releases
    }

    /// One new block, held once: a free one, else the least recently used evictable one.
    /// The caller has checked that one is available.
    fn take_fresh(&mut self) -> BlockId {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let b = self.head;
                debug_assert_ne!(b, NIL, "acquire checked availability");
                self.unlink(b);
                self.forget(b);
                self.evictable -= 1;
                self.evictions += 1;
                b
            }
        };
        self.refcount[b as usize] = 1;
        b
    }

    /// Drops `b`'s hash so that it can no longer be found.
    fn forget(&mut self, b: BlockId) {
        if let Some(h) = self.hash_of[b as usize].take() {
            self.index.remove(&h);
        }
    }

    fn is_linked(&self, b: BlockId) -> bool {
        self.head == b || self.prev[b as usize] != NIL
    }

    fn push_back(&mut self, b: BlockId) {
        let i = b as usize;
        self.prev[i] = self.tail;
        self.next[i] = NIL;
        if self.tail == NIL {
            self.head = b;
        } else {
            self.next[self.tail as usize] = b;
        }
        self.tail = b;
    }

    fn unlink(&mut self, b: BlockId) {
        let i = b as usize;
        let (p, n) = (self.prev[i], self.next[i]);
        if p == NIL {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[i] = NIL;
        self.next[i] = NIL;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: usize = 4;
    const SALT: u64 = 7;

    fn prompt(seed: u32, len: usize) -> Vec<u32> {
        (0..len as u32).map(|i| seed * 1000 + i).collect()
    }

    fn all(got: &Acquired) -> Vec<BlockId> {
        got.cached.iter().chain(&got.fresh).copied().collect()
    }

    /// Admits a prompt the way the engine will (reuse what is cached, always compute the last
    /// token, fresh blocks for the rest), then registers the full blocks it computed.
    fn admit(a: &mut PrefixAllocator, tokens: &[u32]) -> (Vec<BlockHash>, Acquired) {
        let hashes = BlockHash::of_prefix(tokens, BS, SALT);
        let max_cached = (tokens.len() - 1) / BS;
        let k = a.cached_prefix_len(&hashes).min(max_cached);
        let got = a.acquire(&hashes, max_cached, tokens.len().div_ceil(BS) - k);
        let got = got.expect("fits");
        assert_eq!(got.cached.len(), k);
        let blocks = all(&got);
        for (i, &h) in hashes.iter().enumerate().skip(k) {
            a.register(blocks[i], h);
        }
        (hashes, got)
    }

    /// A pool of `total` blocks, the first `n` registered under `hashes`; then `release`.
    fn filled(total: usize, n: usize, release: &[BlockId]) -> (PrefixAllocator, Vec<BlockHash>) {
        let mut a = PrefixAllocator::new(total, true);
        let hashes = BlockHash::of_prefix(&prompt(9, n * BS), BS, SALT);
        let blocks = a.allocate(n).unwrap();
        for (&b, &h) in blocks.iter().zip(&hashes) {
            assert!(a.register(b, h));
        }
        a.release(release);
        (a, hashes)
    }

    #[test]
    fn chain_hashes_are_deterministic_and_sensitive() {
        let t = [1, 2, 3, 4];
        let h = BlockHash::chain(None, 0, &t);
        assert_eq!(h, BlockHash::chain(None, 0, &t));
        let mut seen = vec![
            h,
            BlockHash::chain(Some(BlockHash(0)), 0, &t),
            BlockHash::chain(Some(h), 0, &t),
            BlockHash::chain(None, 1, &t),
            BlockHash::chain(None, 0, &[2, 1, 3, 4]),
            BlockHash::chain(None, 0, &[1, 2, 3]),
            BlockHash::chain(None, 0, &[1, 2, 3, 4, 0]),
        ];
        for i in 0..t.len() {
            for delta in [1u32, 1 << 31] {
                let mut u = t;
                u[i] ^= delta;
                seen.push(BlockHash::chain(None, 0, &u));
            }
        }
        let n = seen.len();
        seen.sort_unstable_by_key(|h| h.0);
        seen.dedup();
        assert_eq!(seen.len(), n, "every variation hashes differently");
    }

    #[test]
    fn of_prefix_chains_full_blocks_only() {
        let t = prompt(1, 11);
        let hs = BlockHash::of_prefix(&t, BS, SALT);
        let h0 = BlockHash::chain(None, SALT, &t[..4]);
        assert_eq!(hs, vec![h0, BlockHash::chain(Some(h0), SALT, &t[4..8])]);
        assert_eq!(BlockHash::of_prefix(&t[..8], BS, SALT), hs);
        assert!(BlockHash::of_prefix(&t[..3], BS, SALT).is_empty());
        assert!(BlockHash::of_prefix(&t, 0, SALT).is_empty());
        assert_ne!(BlockHash::of_prefix(&t, BS, SALT + 1), hs);
    }

    #[test]
    fn same_prompt_reuses_all_full_blocks_and_divergence_stops_reuse() {
        let mut a = PrefixAllocator::new(32, true);
        let p = prompt(1, 13); // 3 full blocks + 1 token
        let (_, first) = admit(&mut a, &p);
        assert!(first.cached.is_empty());
        let (_, second) = admit(&mut a, &p);
        assert_eq!(
            (second.cached, second.fresh.len()),
            (first.fresh[..3].to_vec(), 1)
        );
        let mut other = p.clone();
        other[0] += 1;
        assert!(admit(&mut a, &other).1.cached.is_empty());
        let mut half = p.clone();
        half[5] += 1;
        assert_eq!(admit(&mut a, &half).1.cached, vec![first.fresh[0]]);
        assert_eq!(a.stats().hits, 4);
    }

    #[test]
    fn shared_block_is_held_until_every_holder_releases() {
        let mut a = PrefixAllocator::new(4, true);
        let (hs, s1) = admit(&mut a, &prompt(2, 5));
        let (_, s2) = admit(&mut a, &prompt(2, 5));
        let shared = s1.fresh[0];
        assert_eq!(s2.cached, vec![shared]);
        assert_eq!((a.refcount[shared as usize], a.available()), (2, 1));
        a.release(&all(&s1));
        assert_eq!((a.refcount[shared as usize], a.available()), (1, 2));
        assert_eq!(a.stats().evictable_blocks, 0);
        a.release(&all(&s2));
        assert_eq!((a.stats().evictable_blocks, a.available()), (1, 4));
        assert_eq!(a.cached_prefix_len(&hs), 1);
        assert_eq!(a.double_releases(), 0);
    }

    #[test]
    fn eviction_takes_the_least_recently_released_first() {
        let (mut a, hs) = filled(3, 3, &[1, 2, 0]);
        assert_eq!(a.stats().evictable_blocks, 3);
        assert_eq!(a.allocate(1), Some(vec![1]));
        assert_eq!(
            (a.cached_prefix_len(&hs[1..]), a.cached_prefix_len(&hs[2..])),
            (0, 1)
        );
        assert_eq!(a.allocate(1), Some(vec![2]));
        assert_eq!(a.cached_prefix_len(&hs), 1);
        assert_eq!(a.allocate(1), Some(vec![0]));
        assert_eq!(a.cached_prefix_len(&hs), 0);
        let s = a.stats();
        assert_eq!(
            (s.evictions, s.cached_blocks, s.evictable_blocks),
            (3, 0, 0)
        );
    }

    #[test]
    fn reused_evictable_blocks_are_not_also_counted_for_the_fresh_part() {
        const N: usize = 6;
        let (mut a, hs) = filled(N, N, &[0, 1, 2, 3, 4, 5]);
        let (k, before) = (2, a.stats());
        assert_eq!(a.acquire(&hs, k, N - k + 1), None);
        assert_eq!(
            (a.stats(), a.available(), a.cached_prefix_len(&hs)),
            (before, N, N)
        );
        let got = a.acquire(&hs, k, N - k).unwrap();
        assert_eq!(got.cached, vec![0, 1]);
        let mut ids = all(&got);
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), N, "no block handed out twice");
        assert_eq!((a.available(), a.stats().evictions), (0, (N - k) as u64));
        assert_eq!(a.cached_prefix_len(&hs), k);
    }

    #[test]
    fn a_failed_acquire_changes_nothing() {
        let (mut a, hs) = filled(5, 3, &[2, 0]); // 3, 4 free; 2, 0 evictable; 1 held
        let rc = a.refcount.clone();
        let (free, stats, avail) = (a.free.clone(), a.stats(), a.available());
        assert_eq!(a.acquire(&hs, 3, 3), None); // 3 cached, but only the 2 free are left
        assert_eq!(a.refcount, rc);
        assert_eq!(
            (a.free.clone(), a.stats(), a.available()),
            (free, stats, avail)
        );
        // The LRU order is intact: block 2 (released first) is evicted first.
        assert_eq!(a.allocate(3), Some(vec![3, 4, 2]));
        assert_eq!(a.allocate(2), None);
        assert_eq!(a.allocate(1), Some(vec![0]));
    }

    #[test]
    fn a_second_block_computed_for_a_known_hash_stays_private() {
        let mut a = PrefixAllocator::new(4, true);
        let (h, b) = (BlockHash(99), a.allocate(2).unwrap());
        assert!(a.register(b[0], h));
        assert!(!a.register(b[1], h));
        assert!(a.register(b[0], h), "repeat with the same hash is a no-op");
        assert!(!a.register(b[0], BlockHash(5)), "one hash per block");
        assert_eq!(a.cached_prefix_len(&[BlockHash(5)]), 0);
        a.release(&[b[1]]);
        assert_eq!(
            (a.stats().evictable_blocks, a.free.last()),
            (0, Some(&b[1]))
        );
        a.release(&[b[0]]);
        assert_eq!(a.stats().evictable_blocks, 1);
        assert_eq!(a.acquire(&[h], 1, 0).unwrap().cached, vec![b[0]]);
        assert!(!a.register(3, BlockHash(4)), "not held");
        assert!(!a.register(77, BlockHash(4)), "out of range");
    }

    #[test]
    fn a_hash_repeated_in_one_request_reuses_its_block_twice_and_counts_it_once() {
        let (mut a, hs) = filled(3, 1, &[0]);
        assert_eq!(a.acquire(&[hs[0], hs[0]], 2, 3), None); // 0 is reused, not spare
        let got = a.acquire(&[hs[0], hs[0]], 2, 2).unwrap();
        assert_eq!(
            (got.cached, a.refcount[0], a.available()),
            (vec![0, 0], 2, 0)
        );
        assert_eq!(a.stats().evictable_blocks, 0);
        a.release(&[0, 0, 0]);
        assert_eq!((a.available(), a.double_releases()), (1, 1));
    }

    #[test]
    fn disabled_never_hits_and_frees_immediately() {
        let mut a = PrefixAllocator::new(6, false);
        let p = prompt(4, 9);
        let (hs, s1) = admit(&mut a, &p);
        assert!(!a.register(s1.fresh[0], hs[0]));
        assert_eq!(a.cached_prefix_len(&hs), 0);
        let (_, s2) = admit(&mut a, &p);
        assert!(s2.cached.is_empty());
        a.release(&all(&s1));
        a.release(&all(&s2));
        assert_eq!((a.stats(), a.free.len()), (PrefixStats::default(), 6));
    }

    #[test]
    fn double_and_out_of_range_releases_are_ignored_and_counted() {
        let mut a = PrefixAllocator::new(3, true);
        let b = a.allocate(2).unwrap();
        a.register(b[0], BlockHash(1));
        a.release(&b);
        a.release(&b);
        a.release(&[3, u32::MAX]);
        assert_eq!((a.double_releases(), a.available()), (4, 3));
        let mut ids = a.allocate(3).unwrap();
        ids.sort_unstable();
        assert_eq!(ids, vec![0, 1, 2]);
        assert_eq!(a.allocate(1), None);
    }

    #[test]
    fn max_cached_caps_reuse() {
        let mut a = PrefixAllocator::new(8, true);
        let p = prompt(5, 8); // exactly 2 full blocks
        let (hs, _) = admit(&mut a, &p);
        assert_eq!(a.cached_prefix_len(&hs), 2);
        let (_, s2) = admit(&mut a, &p); // must recompute the last token
        assert_eq!((s2.cached.len(), s2.fresh.len()), (1, 1));
        assert!(a.acquire(&hs, 0, 0).unwrap().cached.is_empty());
        assert_eq!(a.acquire(&hs, 5, 0).unwrap().cached.len(), 2);
    }

    #[test]
    fn clear_evictable_frees_only_unheld_blocks() {
        let (mut a, hs) = filled(3, 3, &[0]);
        a.clear_evictable();
        let s = a.stats();
        assert_eq!(
            (s.cached_blocks, s.evictable_blocks, a.available()),
            (2, 0, 1)
        );
        assert_eq!(
            (a.cached_prefix_len(&hs), a.cached_prefix_len(&hs[1..])),
            (0, 2)
        );
    }

    /// The reference: the same rules, written plainly over vectors (O(n) everywhere).
    struct Model {
        rc: Vec<u32>,
        hash: Vec<Option<BlockHash>>,
        free: Vec<BlockId>,
        lru: Vec<BlockId>, // least recently used first
        stats: PrefixStats,
        double: u64,
    }

    impl Model {
        fn new(total: usize) -> Self {
            let (rc, hash) = (vec![0; total], vec![None; total]);
            let free = (0..total as u32).rev().collect();
            let (lru, stats, double) = (Vec::new(), PrefixStats::default(), 0);
            Model {
                rc,
                hash,
                free,
                lru,
                stats,
                double,
            }
        }
        fn find(&self, h: BlockHash) -> Option<BlockId> {
            (0..self.rc.len() as u32).find(|&b| self.hash[b as usize] == Some(h))
        }
        fn acquire(&mut self, hs: &[BlockHash], max: usize, fresh: usize) -> Option<Acquired> {
            let cached: Vec<_> = hs.iter().take(max).map_while(|&h| self.find(h)).collect();
            let revived = self.lru.iter().filter(|b| cached.contains(b)).count();
            if fresh > self.free.len() + self.lru.len() - revived {
                return None;
            }
            for &b in &cached {
                self.rc[b as usize] += 1;
                self.lru.retain(|&x| x != b);
            }
            let fresh = (0..fresh)
                .map(|_| {
                    let b = self.free.pop().unwrap_or_else(|| {
                        let b = self.lru.remove(0);
                        self.hash[b as usize] = None;
                        self.stats.evictions += 1;
                        b
                    });
                    self.rc[b as usize] = 1;
                    b
                })
                .collect();
            self.stats.hits += cached.len() as u64;
            Some(Acquired { cached, fresh })
        }
        fn release(&mut self, b: BlockId) {
            let i = b as usize;
            if self.rc.get(i).is_none_or(|&rc| rc == 0) {
                self.double += 1;
            } else if self.rc[i] > 1 {
                self.rc[i] -= 1;
            } else {
                self.rc[i] = 0;
                let list = if self.hash[i].is_some() {
                    &mut self.lru
                } else {
                    &mut self.free
                };
                list.push(b);
            }
        }
    }

    /// A live sequence: its chain, its block table, and how many leading blocks it reused.
    struct Seq(Vec<BlockHash>, Vec<BlockId>, usize);

    #[test]
    fn randomized_against_a_reference_model() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut rng = move |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        for (total, enabled) in [(24usize, true), (7, true), (16, false)] {
            let mut a = PrefixAllocator::new(total, enabled);
            let mut m = Model::new(total);
            let (mut live, mut refused) = (Vec::<Seq>::new(), 0);
            for _ in 0..6000 {
                match rng(10) {
                    0..=3 => {
                        // Prompts from a small family: a common head, then a 3-token alphabet.
                        let (len, head) = (1 + rng(6 * BS), rng(4 * BS));
                        let toks: Vec<u32> = (0..len)
                            .map(|i| if i < head { i as u32 } else { rng(3) as u32 })
                            .collect();
                        let hashes = BlockHash::of_prefix(&toks, BS, SALT);
                        let max_cached = rng(hashes.len() + 2);
                        let k = a.cached_prefix_len(&hashes).min(max_cached);
                        let fresh = len.div_ceil(BS).saturating_sub(k) + rng(2) * rng(total + 1);
                        let got = a.acquire(&hashes, max_cached, fresh);
                        assert_eq!(got, m.acquire(&hashes, max_cached, fresh));
                        refused += usize::from(got.is_none());
                        if let Some(got) = got {
                            assert_eq!(got.cached.len(), k);
                            live.push(Seq(hashes, all(&got), k));
                        }
                    }
                    4..=5 if !live.is_empty() => {
                        let Seq(hashes, blocks, k) = &live[rng(live.len())];
                        for (&b, &h) in blocks.iter().zip(hashes).skip(*k) {
                            let mine = m.hash[b as usize];
                            let expect = enabled && mine.map_or(m.find(h).is_none(), |x| x == h);
                            if expect {
                                m.hash[b as usize] = Some(h);
                            }
                            assert_eq!(a.register(b, h), expect);
                        }
                    }
                    6..=7 if !live.is_empty() => {
                        let Seq(_, mut blocks, _) = live.swap_remove(rng(live.len()));
                        if rng(2) == 0 {
                            blocks.reverse();
                        }
                        a.release(&blocks);
                        blocks.iter().for_each(|&b| m.release(b));
                    }
                    8 => {
                        let b = rng(total + 3) as u32;
                        if m.rc.get(b as usize).is_none_or(|&rc| rc == 0) {
                            a.release(&[b]);
                            m.release(b);
                        }
                    }
                    9 if rng(20) == 0 => {
                        a.clear_evictable();
                        for b in std::mem::take(&mut m.lru) {
                            m.hash[b as usize] = None;
                            m.free.push(b);
                        }
                    }
                    _ => {}
                }
                assert_eq!(
                    (&a.refcount, &a.hash_of, &a.free),
                    (&m.rc, &m.hash, &m.free)
                );
                m.stats.cached_blocks = m.hash.iter().flatten().count();
                m.stats.evictable_blocks = m.lru.len();
                assert_eq!((a.stats(), a.double_releases()), (m.stats, m.double));
                assert_eq!(a.available(), m.free.len() + m.lru.len());
                let next = |&b: &u32| Some(a.next[b as usize]).filter(|&n| n != NIL);
                let lru: Vec<_> =
                    std::iter::successors(Some(a.head).filter(|&h| h != NIL), next).collect();
                assert_eq!(lru, m.lru);
                // Every held block is held by live sequences, shared only if found by hash.
                let mut owners = vec![0u32; total];
                live.iter()
                    .flat_map(|s| &s.1)
                    .for_each(|&b| owners[b as usize] += 1);
                assert_eq!(owners, a.refcount);
                for (b, &n) in owners.iter().enumerate() {
                    assert!(
                        n <= 1 || a.hash_of[b].is_some(),
                        "block {b} shared, no hash"
                    );
                }
                let held = owners.iter().filter(|&&n| n > 0).count();
                assert_eq!(a.free.len() + a.evictable + held, total);
            }
            assert!(refused > 0);
            assert!(!enabled || (a.stats().hits > 0 && a.stats().evictions > 0));
        }
    }
}
