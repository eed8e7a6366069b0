//! Admission: whether a request may enter the queue, and when a queued one may start running.
//! Pure functions over counts and sizes; the engine handle and the scheduler call them.

use super::config::SchedulerConfig;
use crate::kv_cache::{KvLayout, KvStorage};
use crate::request::QueuePolicy;

/// The KV cache a request reserves when it starts: a position for every prompt token and every
/// token it may generate, never more than the model's context. The one formula for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvReservation {
    pub positions: usize,
    pub bytes: usize,
}

impl KvReservation {
    /// What a request reserves in `storage` (whole blocks when paged).
    pub fn new(
        layout: &KvLayout,
        storage: KvStorage,
        prompt_len: usize,
        max_tokens: usize,
        context_length: usize,
    ) -> Self {
        let positions = prompt_len.saturating_add(max_tokens).min(context_length);
        Self {
            positions,
            bytes: layout.bytes_in(storage, positions),
        }
    }
}

/// Whether a new request may join the sequences in flight (running plus queued): at most
/// `max_batch_size + max_queue`, or only a free batch slot with [`QueuePolicy::RejectIfBusy`].
pub fn accepts(cfg: &SchedulerConfig, in_flight: usize, policy: QueuePolicy) -> bool {
    let limit = match policy {
        QueuePolicy::Wait => cfg.max_batch_size.saturating_add(cfg.max_queue),
        QueuePolicy::RejectIfBusy => cfg.max_batch_size,
    };
    in_flight < limit
}

/// Whether a request's reservation could ever fit the KV budget; one that cannot is refused at
/// once rather than queued forever.
pub fn could_ever_fit(cfg: &SchedulerConfig, reservation: &KvReservation) -> bool {
    cfg.kv_cache_budget
        .is_none_or(|budget| reservation.bytes <= budget)
}

/// How many requests from the front of `queue` start now, next to `running` sequences that
/// reserve `reserved` bytes. First come, first served: counting stops at the first request
/// [`can_start`] refuses, so the head waits for room rather than being overtaken by smaller
/// requests behind it. The scheduler starts exactly these.
pub fn startable<'a>(
    cfg: &SchedulerConfig,
    mut running: usize,
    mut reserved: usize,
    queue: impl IntoIterator<Item = &'a KvReservation>,
) -> usize {
    let mut started = 0;
    for r in queue {
        if !can_start(cfg, running, reserved, r) {
            break;
        }
        running += 1;
        reserved = reserved.saturating_add(r.bytes);
        started += 1;
    }
    started
}

/// Whether one request may start next to `running` sequences that reserve `reserved` bytes: a
/// free batch slot and room in the KV budget. A lone request always starts (it passed
/// [`could_ever_fit`]).
pub fn can_start(
    cfg: &SchedulerConfig,
    running: usize,
    reserved: usize,
    reservation: &KvReservation,
) -> bool {
    if running >= cfg.max_batch_size {
        return false;
    }
    running == 0
        || cfg
            .kv_cache_budget
            .is_none_or(|budget| reserved.saturating_add(reservation.bytes) <= budget)
}

/// Paged storage: how many requests from the front of `queue` start now, each needing
/// `blocks` to read its prompt and take its first token, next to `running` sequences, with
/// `free` blocks in the pool. Blocks are taken as sequences grow, and when the pool runs out
/// the newest sequence gives its blocks back (the scheduler's preemption), so admission only
/// keeps a block of headroom per running sequence (for its next token). A lone request always
/// starts ([`could_ever_fit`] let it in). First come, first served, as [`startable`].
pub fn startable_paged(
    cfg: &SchedulerConfig,
    mut running: usize,
    mut free: usize,
    queue: impl IntoIterator<Item = usize>,
) -> usize {
    let mut started = 0;
    for blocks in queue {
        let headroom = running;
        if running >= cfg.max_batch_size || free < blocks.saturating_add(headroom) {
            break;
        }
        free -= blocks;
        running += 1;
        started += 1;
    }
    started
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    /// 1 KiB per position.
    const LAYOUT: KvLayout = KvLayout {
        layers: 4,
        kv_heads: 2,
        head_dim: 16,
        dtype: DType::F32,
    };

    fn cfg(max_batch_size: usize, max_queue: usize, budget_kib: Option<usize>) -> SchedulerConfig {
        SchedulerConfig {
            max_batch_size,
            max_queue,
            kv_cache_budget: budget_kib.map(|k| k << 10),
            ..SchedulerConfig::default()
        }
    }

    #[test]
    fn paged_admission_keeps_a_block_per_running_sequence() {
        let cfg = cfg(4, 8, None);
        // Alone, a request may take every block.
        assert_eq!(startable_paged(&cfg, 0, 5, [5]), 1);
        assert_eq!(startable_paged(&cfg, 0, 4, [5]), 0);
        // Next to two running: 3 blocks + 2 of headroom.
        assert_eq!(startable_paged(&cfg, 2, 5, [3]), 1);
        assert_eq!(startable_paged(&cfg, 2, 4, [3]), 0);
        // FIFO: the head that does not fit holds the rest back.
        assert_eq!(startable_paged(&cfg, 0, 10, [2, 9, 1]), 1);
        // Batch slots bound it too.
        assert_eq!(startable_paged(&cfg, 3, 100, [1, 1]), 1);
        // Each admitted one counts as running for the next one's headroom.
        assert_eq!(startable_paged(&cfg, 0, 7, [2, 2, 2]), 2);
    }

    /// A fake waiting request: prompt and max_tokens.
    fn req(prompt: usize, max_tokens: usize) -> KvReservation {
        KvReservation::new(&LAYOUT, KvStorage::Contiguous, prompt, max_tokens, 100)
    }

    /// Paged, a reservation is whole blocks: what the pool will hand out, so admission's sum
    /// of reservations never exceeds the pool.
    #[test]
    fn paged_reservations_round_up_to_blocks() {
        let paged = KvStorage::Paged { block_size: 16 };
        let r = KvReservation::new(&LAYOUT, paged, 10, 7, 100);
        assert_eq!(r.positions, 17);
        assert_eq!(r.bytes, 32 << 10);
        let r = KvReservation::new(&LAYOUT, paged, 16, 0, 100);
        assert_eq!(r.bytes, 16 << 10);
        // Capped by the context first, then rounded.
        let r = KvReservation::new(&LAYOUT, paged, 90, 50, 100);
        assert_eq!((r.positions, r.bytes), (100, 112 << 10));
    }

    /// Admits from a FIFO queue the way the scheduler does; returns how many started.
    fn admit(
        cfg: &SchedulerConfig,
        running: &mut Vec<KvReservation>,
        queue: &[KvReservation],
    ) -> usize {
        let mut started = 0;
        for r in queue {
            let reserved = running.iter().map(|r| r.bytes).sum();
            if !can_start(cfg, running.len(), reserved, r) {
                break;
            }
            running.push(*r);
            started += 1;
        }
        started
    }

    #[test]
    fn the_reservation_is_prompt_plus_max_tokens_capped_by_the_context() {
        assert_eq!(LAYOUT.bytes_per_position(), 1024);
        assert_eq!(
            req(10, 20),
            KvReservation {
                positions: 30,
                bytes: 30 * 1024
            }
        );
        assert_eq!(req(90, 20).positions, 100);
        assert_eq!(req(usize::MAX, usize::MAX).positions, 100);
    }

    #[test]
    fn the_queue_holds_batch_plus_queue_and_reject_if_busy_only_the_batch() {
        let c = cfg(4, 2, None);
        assert!(accepts(&c, 5, QueuePolicy::Wait));
        assert!(!accepts(&c, 6, QueuePolicy::Wait));
        assert!(accepts(&c, 3, QueuePolicy::RejectIfBusy));
        assert!(!accepts(&c, 4, QueuePolicy::RejectIfBusy));
    }

    #[test]
    fn the_batch_size_bounds_admission() {
        let c = cfg(2, 10, None);
        let mut running = Vec::new();
        assert_eq!(admit(&c, &mut running, &[req(1, 1); 5]), 2);
        assert_eq!(admit(&c, &mut running, &[req(1, 1)]), 0);
    }

    #[test]
    fn the_kv_budget_is_first_come_first_served() {
        // 64 KiB: 40 + 20 fit, the 30 behind them waits, and so does the 1 behind it.
        let c = cfg(16, 16, Some(64));
        let mut running = Vec::new();
        let queue = [req(20, 20), req(10, 10), req(15, 15), req(1, 0)];
        assert_eq!(admit(&c, &mut running, &queue), 2);
        // Once the first finishes, the head (30) starts, then the small one.
        running.remove(0);
        assert_eq!(admit(&c, &mut running, &queue[2..]), 2);
    }

    #[test]
    fn a_request_that_could_never_fit_is_told_at_once_and_a_lone_one_always_starts() {
        let c = cfg(16, 16, Some(64));
        assert!(could_ever_fit(&c, &req(32, 32)));
        assert!(!could_ever_fit(&c, &req(32, 33)));
        assert!(can_start(&c, 0, 0, &req(32, 32)));
        assert!(could_ever_fit(&cfg(16, 16, None), &req(100, 100)));
    }
}
