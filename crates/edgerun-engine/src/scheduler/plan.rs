//! The step planner: which sequence does what in the next step. Pure: sequence states and the
//! scheduler's limits in, a plan out; the scheduler executes it.

use super::config::SchedulerConfig;

/// Where a running sequence stands, as far as planning is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqProgress {
    pub prompt_len: usize,
    /// Prompt tokens already in the cache.
    pub prefilled: usize,
    /// The whole prompt is read and a sampled token waits to be fed back.
    pub decoding: bool,
    /// Its client is not reading its events: leave it out until it does.
    pub blocked: bool,
}

/// What one sequence does in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Feed the newest sampled token.
    Decode,
    /// Read prompt tokens `start..start + len`.
    Prefill { start: usize, len: usize },
}

/// One entry of a step's plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planned {
    /// Index of the sequence in the slice given to [`plan_step`].
    pub seq: usize,
    pub work: Work,
    /// The step ends with a token sampled for this sequence (a decode, or the last prompt
    /// chunk).
    pub samples: bool,
}

/// Plans one step over the running sequences. The plan is in strictly increasing sequence
/// order, each sequence at most once (the scheduler relies on it).
///
/// Decoding sequences come first, one token each; then prompt chunks within
/// `max_step_tokens`. Prompts are read in chunks at fixed boundaries (multiples of
/// `prefill_chunk`), never cut shorter to fit the step: the numerics of a chunk depend on its
/// shape, so fixed boundaries keep a sequence's output independent of what else is in the
/// batch. At least one prompt chunk runs every step, whatever the decodes used of the budget,
/// so a long prompt is never starved by a steady stream of decodes.
pub fn plan_step(seqs: &[SeqProgress], cfg: &SchedulerConfig) -> Vec<Planned> {
    let mut budget = cfg.max_step_tokens;
    let mut plan = Vec::with_capacity(seqs.len());
    for (seq, s) in seqs.iter().enumerate() {
        if s.decoding && !s.blocked {
            plan.push(Planned {
                seq,
                work: Work::Decode,
                samples: true,
            });
            budget = budget.saturating_sub(1);
        }
    }
    let mut prefilling = false;
    for (seq, s) in seqs.iter().enumerate() {
        let remaining = s.prompt_len - s.prefilled.min(s.prompt_len);
        if s.decoding || s.blocked || remaining == 0 {
            continue;
        }
        let len = remaining.min(cfg.prefill_chunk);
        if len <= budget || !prefilling {
            plan.push(Planned {
                seq,
                work: Work::Prefill {
                    start: s.prefilled,
                    len,
                },
                samples: s.prefilled + len == s.prompt_len,
            });
            budget = budget.saturating_sub(len);
            prefilling = true;
        }
    }
    plan.sort_unstable_by_key(|p| p.seq);
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(prefill_chunk: usize, max_step_tokens: usize) -> SchedulerConfig {
        SchedulerConfig {
            prefill_chunk,
            max_step_tokens,
            ..SchedulerConfig::default()
        }
    }

    fn decoding() -> SeqProgress {
        SeqProgress {
            prompt_len: 10,
            prefilled: 10,
            decoding: true,
            blocked: false,
        }
    }

    fn prompt(prompt_len: usize, prefilled: usize) -> SeqProgress {
        SeqProgress {
            prompt_len,
            prefilled,
            decoding: false,
            blocked: false,
        }
    }

    fn prefill(seq: usize, start: usize, len: usize, samples: bool) -> Planned {
        Planned {
            seq,
            work: Work::Prefill { start, len },
            samples,
        }
    }

    fn decode(seq: usize) -> Planned {
        Planned {
            seq,
            work: Work::Decode,
            samples: true,
        }
    }

    #[test]
    fn nothing_running_plans_nothing() {
        assert!(plan_step(&[], &cfg(8, 16)).is_empty());
    }

    #[test]
    fn decodes_take_one_token_each_and_always_run() {
        let seqs = vec![decoding(); 5];
        let plan = plan_step(&seqs, &cfg(8, 2));
        assert_eq!(plan, (0..5).map(decode).collect::<Vec<_>>());
    }

    #[test]
    fn prompts_are_read_in_fixed_chunks_and_only_the_last_samples() {
        let c = cfg(8, 256);
        assert_eq!(plan_step(&[prompt(20, 0)], &c), [prefill(0, 0, 8, false)]);
        assert_eq!(plan_step(&[prompt(20, 8)], &c), [prefill(0, 8, 8, false)]);
        assert_eq!(plan_step(&[prompt(20, 16)], &c), [prefill(0, 16, 4, true)]);
        // A prompt shorter than a chunk is read and sampled in one step.
        assert_eq!(plan_step(&[prompt(3, 0)], &c), [prefill(0, 0, 3, true)]);
    }

    #[test]
    fn chunks_are_never_cut_to_fit_the_budget() {
        // Budget 10: 3 decodes leave 7, less than a chunk of 8. The first chunk still runs
        // whole (no starvation); the second does not fit and waits.
        let seqs = [
            decoding(),
            prompt(30, 0),
            decoding(),
            prompt(30, 8),
            decoding(),
        ];
        let plan = plan_step(&seqs, &cfg(8, 10));
        assert_eq!(
            plan,
            [decode(0), prefill(1, 0, 8, false), decode(2), decode(4)]
        );
        // With room for both chunks, both run, in sequence order.
        let plan = plan_step(&seqs, &cfg(8, 19));
        assert_eq!(
            plan,
            [
                decode(0),
                prefill(1, 0, 8, false),
                decode(2),
                prefill(3, 8, 8, false),
                decode(4)
            ]
        );
    }

    #[test]
    fn sequences_whose_clients_do_not_read_are_left_out() {
        let blocked = |s: SeqProgress| SeqProgress { blocked: true, ..s };
        let seqs = [
            blocked(decoding()),
            decoding(),
            blocked(prompt(30, 0)),
            prompt(30, 8),
        ];
        assert_eq!(
            plan_step(&seqs, &cfg(8, 64)),
            [decode(1), prefill(3, 8, 8, false)]
        );
        // All blocked: nothing to do this step.
        assert!(plan_step(&[blocked(decoding())], &cfg(8, 64)).is_empty());
    }

    #[test]
    fn a_later_short_chunk_may_use_what_a_long_one_left() {
        // Budget 10: the first chunk (8) leaves 2; the second prompt has only 2 left and fits.
        let seqs = [prompt(30, 0), prompt(10, 8)];
        assert_eq!(
            plan_step(&seqs, &cfg(8, 10)),
            [prefill(0, 0, 8, false), prefill(1, 8, 2, true)]
        );
    }

    #[test]
    fn a_chunk_boundary_does_not_depend_on_the_batch() {
        // The same prompt planned alone or among others reads the same chunks.
        let c = cfg(8, 12);
        let alone: Vec<_> = (0..4)
            .map(|k| plan_step(&[prompt(30, 8 * k)], &c)[0].work)
            .collect();
        let crowded: Vec<_> = (0..4)
            .map(|k| {
                let seqs = [decoding(), decoding(), prompt(30, 8 * k), decoding()];
                let plan = plan_step(&seqs, &c);
                plan.iter().find(|p| p.seq == 2).unwrap().work
            })
            .collect();
        assert_eq!(alone, crowded);
    }
}
