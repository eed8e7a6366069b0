//! The prefix allocator against hand-made cases and, at random, against a reference model.

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

/// As a plain allocator (what the pool's free list always was): lowest ids first, all or
/// nothing, released blocks handed out again, a block released twice never handed out twice.
#[test]
fn plain_allocation_is_all_or_nothing_and_reuses_released_blocks() {
    let mut a = PrefixAllocator::new(8, true);
    assert_eq!(a.allocate(3), Some(vec![0, 1, 2]));
    assert_eq!(a.allocate(4), Some(vec![3, 4, 5, 6]));
    assert_eq!(a.available(), 1);
    // Not enough: nothing taken.
    assert_eq!(a.allocate(2), None);
    assert_eq!(a.available(), 1);
    a.release(&[3, 4, 5, 6]);
    assert_eq!(a.available(), 5);
    let mut again = a.allocate(5).unwrap();
    again.sort_unstable();
    assert_eq!(again, vec![3, 4, 5, 6, 7]);
    assert_eq!(a.allocate(0), Some(vec![]));
    assert_eq!(a.available(), 0);
    assert_eq!(a.total(), 8);

    let mut a = PrefixAllocator::new(2, true);
    let blocks = a.allocate(1).unwrap();
    a.release(&blocks);
    a.release(&blocks);
    a.release(&[7]);
    assert_eq!(a.available(), 2);
    let all = a.allocate(2).unwrap();
    assert_ne!(all[0], all[1]);
}
