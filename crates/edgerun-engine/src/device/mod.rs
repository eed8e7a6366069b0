//! The device: which one a node runs on ([`DeviceSpec`]), whether this machine can run this
//! build there ([`preflight`], before anything is loaded), opening it with the settings the
//! engine relies on, and sizing its memory ([`memory`]).
//!
//! Opening a CUDA device also keeps freed memory in the driver's pool: cudarc allocates with
//! `cuMemAllocAsync` from the device's memory pool, whose release threshold is 0 by default, so
//! every synchronisation would hand freed activation memory back to the driver and the next step
//! would map it again. The threshold is raised to "never", which is also what makes the device's
//! used memory a high-water mark the scheduler can read as the activations' peak.
//!
//! Candle's CUDA device works on the CUDA per-thread default stream: work queued on the loader
//! thread (weights, the zeroed KV pool) is not ordered before the engine thread's. Whoever
//! loads on one thread and runs on another synchronises in between ([`crate::Engine::start`]
//! does, after allocating the pool).

pub mod memory;
pub mod preflight;

use crate::error::{EngineError, Result};
use candle_core::Device;

/// Where the model runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// CUDA device 0 or Metal when compiled in and present, else CPU.
    Auto,
    Cpu,
    Cuda(usize),
    Metal,
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "metal" => Ok(Self::Metal),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| {
                    format!("unknown device `{s}` (expected auto, cpu, cuda:N or metal)")
                }),
        }
    }
}

impl DeviceSpec {
    /// Whether this spec opens the CPU in this build, known without opening anything (`auto`
    /// is the CPU when neither CUDA nor Metal is compiled in).
    pub fn is_cpu(&self) -> bool {
        match self {
            Self::Cpu => true,
            Self::Auto => {
                !candle_core::utils::cuda_is_available()
                    && !candle_core::utils::metal_is_available()
            }
            Self::Cuda(_) => false,
            Self::Metal => false,
        }
    }

    /// The CUDA ordinal this spec opens in this build, if any.
    fn cuda_ordinal(&self) -> Option<usize> {
        match self {
            Self::Cuda(n) => Some(*n),
            Self::Auto if candle_core::utils::cuda_is_available() => Some(0),
            _ => None,
        }
    }

    /// Checks that this machine runs this build on this device, before anything is loaded:
    /// `Ok(None)` where there is nothing to check (the CPU, Metal), `Ok(Some(passed))` with what
    /// was found, or [`EngineError::Preflight`] with the one line that says what to install or
    /// rebuild.
    pub fn preflight(&self) -> Result<Option<preflight::Passed>> {
        let Some(ordinal) = self.cuda_ordinal() else {
            return Ok(None);
        };
        let build = preflight::BuildTarget::current();
        let facts = preflight::probe().map_err(EngineError::Preflight)?;
        preflight::check(build, &facts, ordinal)
            .map(Some)
            .map_err(EngineError::Preflight)
    }

    pub fn open(&self) -> Result<Device> {
        let err = |e: candle_core::Error| EngineError::Load(format!("device {self:?}: {e}"));
        let device = match self {
            Self::Cpu => Device::Cpu,
            Self::Cuda(n) => Device::new_cuda(*n).map_err(err)?,
            Self::Metal => Device::new_metal(0).map_err(err)?,
            Self::Auto => {
                if candle_core::utils::cuda_is_available() {
                    Device::new_cuda(0).map_err(err)?
                } else if candle_core::utils::metal_is_available() {
                    Device::new_metal(0).map_err(err)?
                } else {
                    Device::Cpu
                }
            }
        };
        if let Some(ordinal) = self.cuda_ordinal() {
            keep_freed_memory(ordinal)?;
        }
        Ok(device)
    }
}

/// Raises the release threshold of the device's current memory pool to "never" (see the module
/// docs).
#[cfg(feature = "cuda")]
fn keep_freed_memory(ordinal: usize) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let fail = |what: &str, e: result::DriverError| {
        EngineError::Load(format!("cuda:{ordinal}: {what}: {e:?}"))
    };
    let dev = result::device::get(ordinal as i32).map_err(|e| fail("cuDeviceGet", e))?;
    // SAFETY: `dev` came from cuDeviceGet; the attribute takes a u64, which `threshold` is.
    unsafe {
        let pool = result::device::get_mem_pool(dev).map_err(|e| fail("cuDeviceGetMemPool", e))?;
        let mut threshold = u64::MAX;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .map_err(|e| fail("cuMemPoolSetAttribute(RELEASE_THRESHOLD)", e))
    }
}

#[cfg(not(feature = "cuda"))]
fn keep_freed_memory(_ordinal: usize) -> Result<()> {
    Ok(())
}

/// Free and total bytes of a GPU's own memory, as its driver reports them now; `None` on the
/// CPU and on Metal (unified memory: RAM is the budget there).
pub fn device_memory(device: &Device) -> Option<(usize, usize)> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => dev.cuda_stream().context().mem_get_info().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_the_cpu_needs_no_preflight() {
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(3)));
        assert!("gpu".parse::<DeviceSpec>().is_err());
        assert!(DeviceSpec::Cpu.preflight().unwrap().is_none());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_on_a_build_without_it_is_refused_in_one_line() {
        let e = DeviceSpec::Cuda(0).preflight().unwrap_err();
        let line = e.to_string();
        assert!(line.contains("built without CUDA"), "{line}");
        assert!(!line.contains('\n'));
        // `auto` is the CPU here: nothing to check.
        assert!(DeviceSpec::Auto.preflight().unwrap().is_none());
    }
}
