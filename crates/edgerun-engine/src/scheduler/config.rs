//! The scheduler's settings ([`SchedulerConfig`]): the limits that shape the batch, their
//! defaults per device, and the validation that refuses a setting the engine cannot run with
//! (at start-up, never clamped).

use crate::error::{EngineError, Result};
use crate::kv_cache::KvStorage;
use std::time::Duration;

/// Limits that shape the batch. [`SchedulerConfig::validate`] refuses nonsensical values; the
/// engine never clamps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Sequences decoding together at most; more wait in the queue.
    pub max_batch_size: usize,
    /// Requests allowed to wait for a batch slot; beyond that `submit` answers `Busy`.
    pub max_queue: usize,
    /// Prompt tokens one sequence processes per step. Smaller chunks keep the other streams
    /// flowing while a long prompt is read; larger ones read it faster.
    pub prefill_chunk: usize,
    /// Tokens per step over all sequences (decode tokens count one each).
    pub max_step_tokens: usize,
    /// Bytes of KV cache all running sequences may reserve together (each reserves prompt +
    /// `max_tokens` positions when admitted). A request that does not fit waits in the queue;
    /// one that could never fit is refused. `None`: no limit.
    pub kv_cache_budget: Option<usize>,
    /// How long a sequence whose client stopped reading its events is kept (paused, not
    /// computed) before it is dropped.
    pub stalled_stream_timeout: Duration,
    /// How KV caches are stored: per sequence, or in one paged pool of `kv_cache_budget`
    /// bytes, allocated at start (needs a budget; what [`SchedulerConfig::default_for`] picks
    /// on the CPU and on CUDA, for the prefix cache).
    pub kv_storage: KvStorage,
    /// With paged storage (the device-first path), sample where the logits are
    /// ([`crate::DeviceSampler`]): only token ids come back to the host. `false` copies every
    /// row to the host sampler (the reference the tests hold the device's against). Rows that
    /// follow an output format are always sampled on the host; rows that report
    /// log-probabilities get them computed on the device too ([`crate::DeviceSampler::logprobs`]).
    pub device_sampling: bool,
    /// With paged storage, keep full KV blocks findable by their tokens, so a prompt that
    /// begins like an earlier one (the same conversation one turn later, a shared system
    /// prompt) reuses them and computes only the rest ([`crate::KvPool::cache_for`]).
    pub prefix_caching: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 16,
            max_queue: 64,
            prefill_chunk: 128,
            max_step_tokens: 256,
            kv_cache_budget: None,
            stalled_stream_timeout: Duration::from_secs(30),
            kv_storage: KvStorage::Contiguous,
            device_sampling: true,
            prefix_caching: true,
        }
    }
}

impl SchedulerConfig {
    /// Defaults sized for a GPU: many sequences per step and long prompts read in few steps,
    /// where the CPU defaults ([`SchedulerConfig::default`]) keep a 2-core box's steps short.
    /// A decode step's cost on a GPU is mostly reading the weights once, so batching 64
    /// sequences costs little more than one; prompts are read 2048 tokens at a time.
    pub fn gpu_default() -> Self {
        Self {
            max_batch_size: 64,
            max_queue: 256,
            prefill_chunk: 2048,
            max_step_tokens: 4096,
            kv_storage: KvStorage::Paged {
                block_size: KvStorage::DEFAULT_BLOCK_SIZE,
            },
            ..Self::default()
        }
    }

    /// [`SchedulerConfig::default`]'s sizes over a paged pool on the CPU (the caller sizes the
    /// pool: `kv_cache_budget`), [`SchedulerConfig::gpu_default`] on CUDA; on Metal the GPU's
    /// sizes over contiguous caches (its memory is the system's: no device budget to size a
    /// pool from).
    pub fn default_for(device: &candle_core::Device) -> Self {
        match device {
            candle_core::Device::Cpu => Self {
                kv_storage: KvStorage::Paged {
                    block_size: KvStorage::DEFAULT_BLOCK_SIZE,
                },
                ..Self::default()
            },
            candle_core::Device::Cuda(_) => Self::gpu_default(),
            candle_core::Device::Metal(_) => Self {
                kv_storage: KvStorage::Contiguous,
                ..Self::gpu_default()
            },
        }
    }

    /// Refuses settings the scheduler cannot run with, naming the setting. Called by
    /// [`crate::Engine::start`]; the server calls it before it listens, so a bad flag stops
    /// the node at start-up.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("max_batch_size", self.max_batch_size),
            ("prefill_chunk", self.prefill_chunk),
            ("max_step_tokens", self.max_step_tokens),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(EngineError::Config(format!("{name} must be at least 1")));
            }
        }
        if self.kv_cache_budget == Some(0) {
            return Err(EngineError::Config(
                "kv_cache_budget must be more than 0 bytes".into(),
            ));
        }
        if let KvStorage::Paged { block_size } = self.kv_storage {
            if block_size == 0 {
                return Err(EngineError::Config(
                    "the KV pool's block size must be at least 1".into(),
                ));
            }
            if self.kv_cache_budget.is_none() {
                return Err(EngineError::Config(
                    "paged KV storage needs a KV cache budget to size its pool".into(),
                ));
            }
        }
        if self.stalled_stream_timeout.is_zero() {
            return Err(EngineError::Config(
                "stalled_stream_timeout must be more than 0".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_without_a_valid_zero_are_refused_by_name() {
        assert!(SchedulerConfig::default().validate().is_ok());
        let cases = [
            (
                SchedulerConfig {
                    max_batch_size: 0,
                    ..SchedulerConfig::default()
                },
                "max_batch_size",
            ),
            (
                SchedulerConfig {
                    prefill_chunk: 0,
                    ..SchedulerConfig::default()
                },
                "prefill_chunk",
            ),
            (
                SchedulerConfig {
                    max_step_tokens: 0,
                    ..SchedulerConfig::default()
                },
                "max_step_tokens",
            ),
            (
                SchedulerConfig {
                    kv_cache_budget: Some(0),
                    ..SchedulerConfig::default()
                },
                "kv_cache_budget",
            ),
        ];
        for (config, name) in cases {
            let e = config.validate().unwrap_err();
            assert!(
                matches!(&e, EngineError::Config(m) if m.contains(name)),
                "{name}: {e}"
            );
        }
        // A queue of 0 is valid: no waiting, only batch slots.
        let no_queue = SchedulerConfig {
            max_queue: 0,
            ..SchedulerConfig::default()
        };
        assert!(no_queue.validate().is_ok());
    }
}
