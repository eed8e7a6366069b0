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
mod tests;
