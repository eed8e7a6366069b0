//! Key/value caches, and the one formula for what they cost.
//!
//! Two storages behind one type, [`KvCache`], chosen per engine by [`KvStorage`]:
//!
//! * **Contiguous** (Metal's, and `--kv-storage contiguous`): each sequence owns per-layer
//!   buffers sized for everything it may ever hold, written in place; attention reads them in
//!   place, with no copy. No prefix cache.
//! * **Paged** (the CPU's and CUDA's): one [`KvPool`] per engine, allocated once, holds every layer's keys and
//!   values as fixed-size blocks of positions; a sequence holds a table of block ids. A step
//!   writes all its new keys (and values) of a layer with one scatter, and reads any number of
//!   sequences' histories with one gather over their block tables, so the number of device
//!   operations per layer does not grow with the batch. Blocks go back to the pool when the
//!   cache is dropped, however the sequence ends.
//!
//! The pool's bookkeeping is [`prefix::PrefixAllocator`], pure and tested without a model. With
//! prefix caching on ([`KvPool::with_prefix_caching`]), it also remembers which full blocks hold
//! which tokens: a cache made for a prompt ([`KvPool::cache_for`]) starts with the longest chain
//! of blocks already computed for the same leading tokens, so only the rest is prefilled. A cache
//! publishes its blocks as they fill ([`KvCache::share_full_blocks`]); the last, partial block
//! is always its own; blocks nobody holds stay cached until the pool needs them (least recently
//! used first). Reused blocks are only read: every write goes to positions after them.

pub mod prefix;

use candle_core::{DType, Device, Result, Tensor};
use prefix::{BlockHash, PrefixAllocator, PrefixStats};
use std::sync::{Arc, Mutex};

/// How an engine stores KV caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvStorage {
    /// Per-sequence buffers, read in place (no prefix cache).
    Contiguous,
    /// One pool of blocks of `block_size` positions, sized by the KV budget.
    Paged { block_size: usize },
}

impl KvStorage {
    /// Positions per block on GPUs.
    pub const DEFAULT_BLOCK_SIZE: usize = 16;

    /// The granularity the storage hands positions out in (1 when contiguous).
    pub fn granularity(&self) -> usize {
        match self {
            KvStorage::Contiguous => 1,
            KvStorage::Paged { block_size } => *block_size,
        }
    }
}

impl std::str::FromStr for KvStorage {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "contiguous" => Ok(Self::Contiguous),
            "paged" => Ok(Self::Paged {
                block_size: Self::DEFAULT_BLOCK_SIZE,
            }),
            _ => Err(format!(
                "unknown KV storage `{s}` (expected contiguous or paged)"
            )),
        }
    }
}

/// The shape of a model's KV cache: what a model reports ([`crate::CausalLm::kv_layout`]) and
/// the only place the bytes a position takes are computed, for allocation, admission and the
/// node's budget alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
}

impl KvLayout {
    /// Bytes one position takes: keys and values, every layer.
    pub fn bytes_per_position(&self) -> usize {
        2 * self.layers * self.kv_heads * self.head_dim * self.dtype.size_in_bytes()
    }

    /// Bytes `positions` positions take.
    pub fn bytes_for(&self, positions: usize) -> usize {
        positions.saturating_mul(self.bytes_per_position())
    }

    /// Bytes `positions` positions take in `storage`: whole blocks when paged.
    pub fn bytes_in(&self, storage: KvStorage, positions: usize) -> usize {
        let g = storage.granularity();
        self.bytes_for(positions.div_ceil(g).saturating_mul(g))
    }

    /// Values per position per layer in the keys (or the values): `kv_heads * head_dim`.
    pub fn row_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// Per layer of `layout`, zeroed keys and values of `shape`, in its dtype.
fn zeroed_layers(
    layout: &KvLayout,
    shape: impl Into<candle_core::Shape> + Copy,
    device: &Device,
) -> Result<Vec<(Tensor, Tensor)>> {
    (0..layout.layers)
        .map(|_| {
            Ok((
                Tensor::zeros(shape, layout.dtype, device)?,
                Tensor::zeros(shape, layout.dtype, device)?,
            ))
        })
        .collect()
}

/// Every layer's keys and values for all sequences of an engine, as blocks of positions.
/// Cheap to clone (the tensors and the free list are shared).
#[derive(Clone)]
pub struct KvPool {
    layout: KvLayout,
    block_size: usize,
    /// Per layer: keys and values, each `(blocks * block_size, kv_heads * head_dim)`; the row
    /// of position `p` of a sequence is `table[p / block_size] * block_size + p % block_size`.
    layers: Arc<Vec<(Tensor, Tensor)>>,
    allocator: Arc<Mutex<PrefixAllocator>>,
    /// Mixed into every block hash: what else changes the values a block holds (the layout;
    /// the pool belongs to one model).
    salt: u64,
    /// A reused prefix is a multiple of this many blocks (see [`KvPool::with_prefix_caching`]).
    reuse_blocks: usize,
}

impl std::fmt::Debug for KvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvPool")
            .field("block_size", &self.block_size)
            .field("blocks", &self.total_blocks())
            .field("free", &self.available())
            .finish()
    }
}

impl KvPool {
    /// Allocates the whole pool on `device` now: `blocks` blocks of `block_size` positions.
    pub fn new(
        layout: &KvLayout,
        blocks: usize,
        block_size: usize,
        device: &Device,
    ) -> Result<Self> {
        if blocks == 0 || block_size == 0 || blocks > u32::MAX as usize / block_size {
            candle_core::bail!("a KV pool of {blocks} blocks of {block_size} positions");
        }
        let layers = zeroed_layers(layout, (blocks * block_size, layout.row_width()), device)?;
        // The layout, and a secret drawn per pool: block hashes are 64 bits of a non-keyed
        // hash, so without the secret a caller could search offline for a prompt whose blocks
        // collide with another caller's and poison what that caller's prompt reuses.
        let salt = BlockHash::chain(
            None,
            rand::random::<u64>(),
            &[
                layout.layers as u32,
                layout.kv_heads as u32,
                layout.head_dim as u32,
                layout.dtype.size_in_bytes() as u32,
                block_size as u32,
            ],
        )
        .0;
        Ok(Self {
            layout: *layout,
            block_size,
            layers: Arc::new(layers),
            allocator: Arc::new(Mutex::new(PrefixAllocator::new(blocks, false))),
            salt,
            reuse_blocks: 1,
        })
    }

    /// Turns prefix caching on or off (off by default); only before any cache is taken.
    /// A reused prefix is cut down to a multiple of `granularity` positions (a multiple of the
    /// block size, or it is rounded up to one). The engine reuses whole blocks: on the CPU a
    /// row's keys and values do not depend on the chunk or batch they were computed in, so a
    /// hit of any length gives the cold run's output bit for bit. A device whose numerics did
    /// depend on the shape of a step could reuse whole prompt chunks only, keeping every later
    /// chunk on a cold run's boundaries.
    pub fn with_prefix_caching(mut self, enabled: bool, granularity: usize) -> Self {
        let total = self.total_blocks();
        *self.lock() = PrefixAllocator::new(total, enabled);
        self.reuse_blocks = granularity.div_ceil(self.block_size).max(1);
        self
    }

    /// Full blocks cached, evictable blocks, blocks reused and evicted so far.
    pub fn prefix_stats(&self) -> PrefixStats {
        self.lock().stats()
    }

    /// The most blocks `budget` bytes hold.
    pub fn blocks_in(layout: &KvLayout, block_size: usize, budget: usize) -> usize {
        budget / layout.bytes_for(block_size).max(1)
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Layer `layer`'s keys and values, `(slots, kv_heads * head_dim)` each.
    pub fn layer(&self, layer: usize) -> &(Tensor, Tensor) {
        &self.layers[layer]
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// Free blocks now.
    pub fn available(&self) -> usize {
        self.lock().available()
    }

    pub fn total_blocks(&self) -> usize {
        self.lock().total()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PrefixAllocator> {
        self.allocator.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A cache holding no block yet: it takes them as it grows ([`KvCache::grow_to`]).
    pub fn empty_cache(&self) -> KvCache {
        KvCache {
            storage: Storage::Paged {
                pool: self.clone(),
                blocks: Vec::new(),
                shared: Vec::new(),
            },
            len: 0,
            capacity: 0,
        }
    }

    /// Blocks `positions` positions take.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    /// A cache for up to `capacity` positions, its blocks taken now; an error when the pool
    /// has too few free.
    pub fn cache(&self, capacity: usize) -> Result<KvCache> {
        let n = capacity.max(1).div_ceil(self.block_size);
        let Some(blocks) = self.lock().allocate(n) else {
            candle_core::bail!(
                "the KV pool has {} free blocks of {} positions, {n} needed",
                self.available(),
                self.block_size
            );
        };
        Ok(KvCache {
            storage: Storage::Paged {
                pool: self.clone(),
                blocks,
                shared: Vec::new(),
            },
            len: 0,
            capacity: n * self.block_size,
        })
    }

    /// A cache for `tokens` (a prompt, or a preempted sequence's context) with room for
    /// `capacity` positions, starting with the longest chain of cached blocks that holds the
    /// same leading tokens: its [`KvCache::len`] is the positions it already holds, always at
    /// least one short of `tokens` (the last token is computed, so its logits exist). All or
    /// nothing; an error when the pool has too few blocks.
    pub fn cache_for(&self, tokens: &[u32], capacity: usize) -> Result<KvCache> {
        let bs = self.block_size;
        let hashes = BlockHash::of_prefix(tokens, bs, self.salt);
        let n = capacity.max(tokens.len() + 1).div_ceil(bs);
        let mut allocator = self.lock();
        let reuse = allocator
            .cached_prefix_len(&hashes)
            .min(tokens.len().saturating_sub(1) / bs);
        let reuse = reuse - reuse % self.reuse_blocks;
        let Some(got) = allocator.acquire(&hashes, reuse, n - reuse) else {
            let free = allocator.available();
            drop(allocator);
            candle_core::bail!(
                "the KV pool has {free} free blocks of {bs} positions, {} needed",
                n - reuse
            );
        };
        drop(allocator);
        let cached = got.cached.len();
        let mut blocks = got.cached;
        blocks.extend(got.fresh);
        Ok(KvCache {
            storage: Storage::Paged {
                pool: self.clone(),
                blocks,
                shared: hashes[..cached].to_vec(),
            },
            len: cached * bs,
            capacity: n * bs,
        })
    }
}

/// The attention keys and values of one sequence, for every layer.
///
/// Each sequence owns its cache, so sequences of different lengths can decode in one batch. The
/// buffers are allocated once, at the capacity the sequence can ever need (prompt plus
/// `max_tokens`, never more than the context window), and written in place: no step re-copies
/// the history the way a `Tensor::cat` cache does.
pub struct KvCache {
    storage: Storage,
    len: usize,
    capacity: usize,
}

enum Storage {
    /// Per layer: keys and values, each `(n_kv_heads, capacity, head_dim)`.
    Contiguous(Vec<(Tensor, Tensor)>),
    /// Blocks of a pool, in position order; the first `shared.len()` are full and published
    /// under these hashes (read-only from then on).
    Paged {
        pool: KvPool,
        blocks: Vec<u32>,
        shared: Vec<BlockHash>,
    },
}

impl Drop for KvCache {
    fn drop(&mut self) {
        if let Storage::Paged { pool, blocks, .. } = &mut self.storage {
            // Tail first: a chain's head is what later prompts can reach, so it is evicted last.
            blocks.reverse();
            pool.lock().release(blocks);
        }
    }
}

impl KvCache {
    pub fn new(layout: &KvLayout, capacity: usize, device: &Device) -> Result<Self> {
        let shape = (layout.kv_heads, capacity, layout.head_dim);
        let layers = zeroed_layers(layout, shape, device)?;
        Ok(Self {
            storage: Storage::Contiguous(layers),
            len: 0,
            capacity,
        })
    }

    /// The pool and block table of a paged cache; `None` for a contiguous one.
    pub fn paged(&self) -> Option<(&KvPool, &[u32])> {
        match &self.storage {
            Storage::Paged { pool, blocks, .. } => Some((pool, blocks)),
            Storage::Contiguous(_) => None,
        }
    }

    /// Pool rows of positions `start..start + n` of a paged cache (empty for a contiguous
    /// one).
    pub fn slots(&self, start: usize, n: usize) -> impl Iterator<Item = u32> + '_ {
        let table = self
            .paged()
            .map(|(pool, blocks)| (pool.block_size(), blocks));
        (start..start + n).filter_map(move |p| {
            let (bs, blocks) = table?;
            Some(blocks[p / bs] * bs as u32 + (p % bs) as u32)
        })
    }

    /// Positions already stored (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Writes `k`, `v` (`(n_kv_heads, t, head_dim)`, any float dtype) for `layer` after the stored positions and
    /// returns views of the whole history including them. `commit` must follow once every layer
    /// has been written.
    pub(crate) fn write(&self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(1)?;
        self.check_room(t)?;
        let Storage::Contiguous(layers) = &self.storage else {
            candle_core::bail!("a paged cache is written through its pool");
        };
        let (kc, vc) = &layers[layer];
        // Stored in the cache's dtype (f16 on GPUs), converted once here.
        kc.slice_set(&k.to_dtype(kc.dtype())?.contiguous()?, 1, self.len)?;
        vc.slice_set(&v.to_dtype(vc.dtype())?.contiguous()?, 1, self.len)?;
        Ok((
            kc.narrow(1, 0, self.len + t)?,
            vc.narrow(1, 0, self.len + t)?,
        ))
    }

    /// Makes room for `positions` positions in all, taking blocks from the pool as needed (all
    /// or nothing). `false` when the pool has too few free blocks; a contiguous cache never
    /// grows (it was sized for everything at the start).
    pub fn grow_to(&mut self, positions: usize) -> bool {
        if positions <= self.capacity {
            return true;
        }
        let Storage::Paged { pool, blocks, .. } = &mut self.storage else {
            return false;
        };
        let more = pool.blocks_for(positions) - blocks.len();
        match pool.lock().allocate(more) {
            Some(new) => {
                blocks.extend(new);
                self.capacity = blocks.len() * pool.block_size();
                true
            }
            None => false,
        }
    }

    /// Publishes every block that has filled since the last call, so that later prompts with
    /// the same leading tokens reuse it. `tokens` are the ones whose keys and values the cache
    /// holds, in order (at least [`KvCache::len`] of them). A no-op for a contiguous cache or
    /// when the pool does not cache.
    pub fn share_full_blocks(&mut self, tokens: &[u32]) {
        let len = self.len.min(tokens.len());
        let Storage::Paged {
            pool,
            blocks,
            shared,
        } = &mut self.storage
        else {
            return;
        };
        let bs = pool.block_size;
        if (shared.len() + 1) * bs > len {
            return;
        }
        let mut allocator = pool.lock();
        while (shared.len() + 1) * bs <= len {
            let i = shared.len();
            let hash = BlockHash::chain(
                shared.last().copied(),
                pool.salt,
                &tokens[i * bs..(i + 1) * bs],
            );
            allocator.register(blocks[i], hash);
            shared.push(hash);
        }
    }

    /// Positions at the start that came from the pool's cache or were published to it: those
    /// are never written again.
    pub fn shared_positions(&self) -> usize {
        match &self.storage {
            Storage::Paged { pool, shared, .. } => shared.len() * pool.block_size,
            Storage::Contiguous(_) => 0,
        }
    }

    /// Blocks of the pool this cache holds (0 when contiguous).
    pub fn blocks_held(&self) -> usize {
        self.paged().map_or(0, |(_, blocks)| blocks.len())
    }

    /// An error unless `t` more positions fit.
    pub(crate) fn check_room(&self, t: usize) -> Result<()> {
        if self.len + t > self.capacity {
            candle_core::bail!(
                "kv cache overflow: {} + {t} positions > capacity {}",
                self.len,
                self.capacity
            );
        }
        Ok(())
    }

    /// Marks `t` more positions as stored.
    pub(crate) fn commit(&mut self, t: usize) {
        self.len += t;
    }

    /// Forgets every position from `len` on (after a forward pass that failed once it had
    /// committed): the next write overwrites them.
    pub(crate) fn roll_back_to(&mut self, len: usize) {
        // Published blocks are read by other sequences: a roll-back never reaches them (only a
        // failed step's own positions are rolled back, and blocks are published after a step).
        debug_assert!(len >= self.shared_positions().min(self.len));
        self.len = self.len.min(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(layers: usize, kv_heads: usize, head_dim: usize, dtype: DType) -> KvLayout {
        KvLayout {
            layers,
            kv_heads,
            head_dim,
            dtype,
        }
    }

    /// A paged cache maps positions to pool rows through its block table, and gives its blocks
    /// back when dropped.
    #[test]
    fn paged_caches_map_positions_and_free_their_blocks() -> Result<()> {
        let layout = layout(1, 1, 2, DType::F32);
        assert_eq!(
            KvPool::blocks_in(&layout, 4, layout.bytes_for(4) * 5 + 7),
            5
        );
        let pool = KvPool::new(&layout, 5, 4, &Device::Cpu)?;
        assert_eq!(pool.layer(0).0.dims(), &[20, 2]);
        let a = pool.cache(6)?; // blocks 0, 1
        let b = pool.cache(1)?; // block 2
        assert_eq!(a.capacity(), 8);
        assert_eq!(pool.available(), 2);
        assert_eq!(a.slots(3, 3).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(b.slots(0, 2).collect::<Vec<_>>(), vec![8, 9]);
        assert!(pool.cache(9).is_err(), "3 blocks from 2 free");
        assert_eq!(pool.available(), 2, "a failed allocation takes nothing");
        drop(a);
        assert_eq!(pool.available(), 4);
        let c = pool.cache(16)?;
        // The freed blocks are reused: positions 0..8 land in rows of blocks 0 and 1 again.
        let rows: Vec<u32> = c.slots(0, 16).collect();
        assert_eq!(rows.len(), 16);
        assert!(
            rows.iter().all(|&r| !(8..12).contains(&r)),
            "block 2 is b's"
        );
        assert!(c.check_room(16).is_ok() && c.check_room(17).is_err());
        drop((b, c));
        assert_eq!(pool.available(), 5);
        // Contiguous caches have no slots.
        let contiguous = KvCache::new(&layout, 4, &Device::Cpu)?;
        assert!(contiguous.paged().is_none());
        assert_eq!(contiguous.slots(0, 4).count(), 0);
        Ok(())
    }

    /// A prompt that begins like one computed before starts with that one's full blocks (the
    /// same rows of the pool), never its partial last block, and always leaves a token to
    /// compute; blocks nobody holds stay cached until the pool needs them.
    #[test]
    fn caches_for_a_known_prefix_start_with_its_blocks() -> Result<()> {
        let layout = layout(1, 1, 2, DType::F32);
        let pool = KvPool::new(&layout, 16, 4, &Device::Cpu)?.with_prefix_caching(true, 4);
        let prompt: Vec<u32> = (0..10).collect();
        let mut a = pool.cache_for(&prompt, 11)?;
        assert_eq!((a.len(), a.capacity(), a.blocks_held()), (0, 12, 3));
        a.commit(10); // the model wrote 10 positions
        a.share_full_blocks(&prompt);
        assert_eq!(
            a.shared_positions(),
            8,
            "two full blocks; the third is partial"
        );
        let rows_a: Vec<u32> = a.slots(0, 8).collect();

        // The same prompt again: 8 positions come from the cache, the same pool rows.
        let b = pool.cache_for(&prompt, 11)?;
        assert_eq!(b.len(), 8);
        assert_eq!(b.slots(0, 8).collect::<Vec<_>>(), rows_a);
        assert_ne!(
            b.slots(8, 1).next(),
            a.slots(8, 1).next(),
            "the partial block is a's own"
        );
        // A prompt of exactly the two cached blocks still computes its last token.
        let c = pool.cache_for(&prompt[..8], 9)?;
        assert_eq!(c.len(), 4);
        // A different first token shares nothing; a different second block shares one.
        let mut other = prompt.clone();
        other[0] = 99;
        assert_eq!(pool.cache_for(&other, 11)?.len(), 0);
        other[0] = 0;
        other[5] = 99;
        assert_eq!(pool.cache_for(&other, 11)?.len(), 4);
        drop((a, b, c));
        // Cached blocks nobody holds count as free, and are still found.
        assert_eq!(pool.available(), 16);
        assert_eq!(pool.prefix_stats().evictable_blocks, 2);
        assert_eq!(pool.cache_for(&prompt, 11)?.len(), 8);
        // The pool needs every block: the cached ones are evicted.
        let all = pool.cache(64)?;
        assert_eq!(all.blocks_held(), 16);
        drop(all);
        assert_eq!(pool.cache_for(&prompt, 11)?.len(), 0);
        assert!(pool.prefix_stats().evictions >= 2);

        // Reuse in whole chunks of 8 positions: 8 of a's 8 cached, none of a 4-position match.
        let chunked = KvPool::new(&layout, 16, 4, &Device::Cpu)?.with_prefix_caching(true, 8);
        let mut a = chunked.cache_for(&prompt, 11)?;
        a.commit(10);
        a.share_full_blocks(&prompt);
        assert_eq!(chunked.cache_for(&prompt, 11)?.len(), 8);
        assert_eq!(
            chunked.cache_for(&other, 11)?.len(),
            0,
            "one block is half a chunk"
        );
        drop(a);

        // Without prefix caching nothing is ever reused.
        let plain = KvPool::new(&layout, 8, 4, &Device::Cpu)?;
        let mut a = plain.cache_for(&prompt, 11)?;
        a.commit(10);
        a.share_full_blocks(&prompt);
        drop(a);
        assert_eq!(plain.cache_for(&prompt, 11)?.len(), 0);
        Ok(())
    }

    #[test]
    fn paged_caches_grow_block_by_block_all_or_nothing() -> Result<()> {
        let layout = layout(1, 1, 2, DType::F32);
        let pool = KvPool::new(&layout, 3, 4, &Device::Cpu)?;
        let mut a = pool.empty_cache();
        assert_eq!((a.capacity(), a.blocks_held()), (0, 0));
        assert!(a.grow_to(5));
        assert_eq!((a.capacity(), a.blocks_held()), (8, 2));
        assert!(a.grow_to(8), "within capacity: nothing taken");
        assert_eq!(pool.available(), 1);
        let mut b = pool.cache(1)?;
        assert!(!b.grow_to(5), "a second block is not free");
        assert_eq!((b.capacity(), pool.available()), (4, 0));
        drop(a);
        assert!(b.grow_to(12));
        assert_eq!(b.slots(4, 1).count(), 1);
        let mut contiguous = KvCache::new(&layout, 4, &Device::Cpu)?;
        assert!(contiguous.grow_to(4) && !contiguous.grow_to(5));
        Ok(())
    }

    #[test]
    fn storage_parses_and_rounds() {
        assert_eq!("contiguous".parse::<KvStorage>(), Ok(KvStorage::Contiguous));
        assert_eq!(
            "paged".parse::<KvStorage>(),
            Ok(KvStorage::Paged { block_size: 16 })
        );
        assert!("pages".parse::<KvStorage>().is_err());
        let layout = layout(1, 1, 1, DType::F32);
        assert_eq!(layout.bytes_in(KvStorage::Contiguous, 17), 2 * 17 * 4);
        assert_eq!(
            layout.bytes_in(KvStorage::Paged { block_size: 16 }, 17),
            2 * 32 * 4
        );
    }

    /// A cache in another dtype (f16, as on GPUs) stores what it is given converted, and gives
    /// views of everything written so far.
    #[test]
    fn f16_cache_stores_converted_history() -> Result<()> {
        let layout = layout(2, 2, 4, DType::F16);
        assert_eq!(layout.bytes_per_position(), 2 * 2 * 2 * 4 * 2);
        let mut cache = KvCache::new(&layout, 8, &Device::Cpu)?;
        let k = Tensor::arange(0f32, 24., &Device::Cpu)?.reshape((2, 3, 4))?;
        let v = (&k * 0.5)?;
        let (k_all, v_all) = cache.write(1, &k, &v)?;
        cache.commit(3);
        assert_eq!(k_all.dtype(), DType::F16);
        assert_eq!(k_all.dims(), &[2, 3, 4]);
        let back = k_all
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(back, k.flatten_all()?.to_vec1::<f32>()?);
        let (_, v_all2) = cache.write(1, &k.narrow(1, 0, 1)?, &v.narrow(1, 0, 1)?)?;
        assert_eq!(v_all2.dims(), &[2, 4, 4]);
        let first = v_all
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let again = v_all2.narrow(1, 0, 3)?.to_dtype(DType::F32)?;
        assert_eq!(first, again.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }
}
