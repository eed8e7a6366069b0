//! The preflight: does this machine run this build? Answered before any weight is read, in one
//! line that says what to install or rebuild.
//!
//! A CUDA build is made for one CUDA version and one compute capability (`build.rs` records
//! both from `CUDARC_CUDA_VERSION` and `CUDA_COMPUTE_CAP`):
//!
//! * **the driver** must support that CUDA version or a newer one. candle's element-wise kernels
//!   are PTX, which a driver JIT-compiles only up to its own PTX ISA (CUDA 13.0's driver, the 580
//!   branch, reads ISA 9.0; nvcc 13.4 writes 9.4), and cudarc's bindings name the entry points of
//!   the version they were built for. An older driver fails at the first kernel, deep in loading.
//! * **the device** must have the build's compute capability or a newer one: PTX for `sm_90` runs
//!   on 9.0 and later (JIT-compiled for newer chips), never on 8.x.
//!
//! Missing libraries (`libcublas.so.13`, ...) never reach this code: the binary is dynamically
//! linked against them and the loader refuses it before `main`, naming the library
//! (`scripts/gpu-check.sh` checks them with `ldd -r` first).
//!
//! [`check`] is the pure comparison (tested here without a GPU); [`probe`] asks the driver
//! (cuDriverGetVersion, cuDeviceGetAttribute); `scripts/test-cuda-preflight.sh` runs the CUDA
//! binary against a stub driver that reports an older version.

use std::fmt;

/// A CUDA version as the driver API counts it: 1000 × major + 10 × minor (13.0 is 13000).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CudaVersion(pub u32);

impl CudaVersion {
    pub fn major(self) -> u32 {
        self.0 / 1000
    }

    pub fn minor(self) -> u32 {
        self.0 % 1000 / 10
    }

    /// The oldest Linux driver branch that supports this CUDA version, where known.
    pub fn min_driver(self) -> Option<u32> {
        const BRANCHES: [(u32, u32); 11] = [
            (12000, 525),
            (12010, 530),
            (12020, 535),
            (12030, 545),
            (12040, 550),
            (12050, 555),
            (12060, 560),
            (12080, 570),
            (12090, 575),
            (13000, 580),
            (13010, 590),
        ];
        BRANCHES
            .iter()
            .find(|(v, _)| *v == self.0)
            .map(|&(_, branch)| branch)
    }
}

impl fmt::Display for CudaVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major(), self.minor())
    }
}

/// A compute capability (9.0 for an H100 or H200).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ComputeCap {
    pub major: u32,
    pub minor: u32,
}

impl ComputeCap {
    /// `CUDA_COMPUTE_CAP`'s spelling: "90" is 9.0, "86" is 8.6, "120" is 12.0.
    pub fn parse_flat(s: &str) -> Option<Self> {
        let n: u32 = s.trim().parse().ok()?;
        (n >= 10).then_some(Self {
            major: n / 10,
            minor: n % 10,
        })
    }

    /// Back to `CUDA_COMPUTE_CAP`'s spelling.
    pub fn flat(self) -> u32 {
        self.major * 10 + self.minor
    }
}

impl fmt::Display for ComputeCap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// What this binary was built for; `None` where the build did not record it (a CPU build, or a
/// CUDA build made without the variables).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildTarget {
    pub cuda: bool,
    pub cuda_version: Option<CudaVersion>,
    pub compute_cap: Option<ComputeCap>,
}

impl BuildTarget {
    /// This binary's.
    pub fn current() -> Self {
        Self {
            cuda: cfg!(feature = "cuda"),
            cuda_version: option_env!("EDGERUN_BUILT_CUDARC_CUDA_VERSION")
                .and_then(|v| v.trim().parse().ok())
                .map(CudaVersion),
            compute_cap: option_env!("EDGERUN_BUILT_CUDA_COMPUTE_CAP")
                .and_then(ComputeCap::parse_flat),
        }
    }
}

impl fmt::Display for BuildTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.cuda {
            return write!(f, "a build without CUDA");
        }
        match self.cuda_version {
            Some(v) => write!(f, "built for CUDA {v}")?,
            None => write!(f, "built for an unrecorded CUDA version")?,
        }
        match self.compute_cap {
            Some(cc) => write!(f, ", compute capability {cc}"),
            None => write!(f, ", an unrecorded compute capability"),
        }
    }
}

/// One GPU as the driver describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuFacts {
    pub name: String,
    pub compute_cap: ComputeCap,
}

/// What the driver reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverFacts {
    /// The newest CUDA version the driver supports (cuDriverGetVersion).
    pub cuda_version: CudaVersion,
    pub gpus: Vec<GpuFacts>,
}

/// Why this machine cannot run this build. Each one's text is the single line the node prints
/// before it exits: what is wrong and what to install or rebuild.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    /// `--device cuda` on a binary built without it.
    NotBuilt,
    /// The driver did not answer, or did not initialise.
    NoDriver(String),
    /// The driver supports an older CUDA version than the build's.
    DriverTooOld {
        driver: CudaVersion,
        build: CudaVersion,
    },
    /// `cuda:N` beyond the GPUs the driver sees.
    NoSuchGpu { ordinal: usize, count: usize },
    /// The GPU is older than the compute capability the kernels were built for.
    ComputeCapTooLow {
        ordinal: usize,
        name: String,
        gpu: ComputeCap,
        build: ComputeCap,
    },
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotBuilt => write!(
                f,
                "this binary was built without CUDA: build it with `--features cuda` \
                 (docs/gpu.md) or run with --device cpu"
            ),
            Self::NoDriver(why) => write!(
                f,
                "the NVIDIA driver did not answer ({why}): install NVIDIA driver 580 or newer \
                 and check that the GPU is visible (nvidia-smi; in Docker, --gpus all)"
            ),
            Self::DriverTooOld { driver, build } => {
                write!(
                    f,
                    "the NVIDIA driver supports CUDA {driver}, but this build needs CUDA {build}: "
                )?;
                match build.min_driver() {
                    Some(branch) => write!(f, "install NVIDIA driver {branch} or newer")?,
                    None => write!(f, "install an NVIDIA driver for CUDA {build} or newer")?,
                }
                write!(f, " (docs/gpu.md)")
            }
            Self::NoSuchGpu { ordinal, count } => write!(
                f,
                "cuda:{ordinal} does not exist: the driver sees {count} GPU(s) (cuda:0 to \
                 cuda:{}); check --device and CUDA_VISIBLE_DEVICES",
                count.saturating_sub(1)
            ),
            Self::ComputeCapTooLow {
                ordinal,
                name,
                gpu,
                build,
            } => write!(
                f,
                "cuda:{ordinal} ({name}) has compute capability {gpu}, and this build's kernels \
                 run on {build} and newer only: rebuild with CUDA_COMPUTE_CAP={} \
                 (scripts/install-cuda-toolkit.sh, docs/gpu.md)",
                gpu.flat()
            ),
        }
    }
}

/// A machine that runs this build: what was found, and anything worth a warning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passed {
    /// One line: the GPU, its compute capability, the driver's and the build's CUDA versions.
    pub summary: String,
    pub warnings: Vec<String>,
}

/// Whether a machine whose driver reports `driver` runs a build for `build` on GPU `ordinal`.
pub fn check(build: BuildTarget, driver: &DriverFacts, ordinal: usize) -> Result<Passed, Mismatch> {
    if !build.cuda {
        return Err(Mismatch::NotBuilt);
    }
    let mut warnings = Vec::new();
    match build.cuda_version {
        Some(b) if driver.cuda_version < b => {
            return Err(Mismatch::DriverTooOld {
                driver: driver.cuda_version,
                build: b,
            })
        }
        Some(_) => {}
        None => warnings.push(
            "this build did not record its CUDA version (CUDARC_CUDA_VERSION was unset): the \
             driver's was not compared with it"
                .to_string(),
        ),
    }
    let gpu = driver.gpus.get(ordinal).ok_or(Mismatch::NoSuchGpu {
        ordinal,
        count: driver.gpus.len(),
    })?;
    match build.compute_cap {
        Some(b) if gpu.compute_cap < b => {
            return Err(Mismatch::ComputeCapTooLow {
                ordinal,
                name: gpu.name.clone(),
                gpu: gpu.compute_cap,
                build: b,
            })
        }
        Some(b) if gpu.compute_cap > b => warnings.push(format!(
            "cuda:{ordinal} has compute capability {}, newer than the build's {b}: the driver \
             JIT-compiles the kernels at start (slower first start; rebuild with \
             CUDA_COMPUTE_CAP={} for native code)",
            gpu.compute_cap,
            gpu.compute_cap.flat()
        )),
        Some(_) => {}
        None => warnings.push(
            "this build did not record its compute capability (CUDA_COMPUTE_CAP was unset): \
             the GPU's was not compared with it"
                .to_string(),
        ),
    }
    Ok(Passed {
        summary: format!(
            "cuda:{ordinal} is {} (compute capability {}), the driver supports CUDA {}; {build}",
            gpu.name, gpu.compute_cap, driver.cuda_version
        ),
        warnings,
    })
}

/// Asks the driver what it supports and which GPUs it sees.
#[cfg(feature = "cuda")]
pub fn probe() -> Result<DriverFacts, Mismatch> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let named = |what: &str, e: result::DriverError| {
        let name = e
            .error_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|_| format!("error {}", e.0 as i32));
        Mismatch::NoDriver(format!("{what}: {name}"))
    };
    let mut version = 0i32;
    // SAFETY: one out-parameter, written by the driver.
    unsafe { sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(|e| named("cuDriverGetVersion", e))?;
    result::init().map_err(|e| named("cuInit", e))?;
    let count = result::device::get_count().map_err(|e| named("cuDeviceGetCount", e))?;
    let mut gpus = Vec::new();
    for i in 0..count {
        let dev = result::device::get(i).map_err(|e| named("cuDeviceGet", e))?;
        let name = result::device::get_name(dev).map_err(|e| named("cuDeviceGetName", e))?;
        let attr = |a| {
            // SAFETY: `dev` came from cuDeviceGet.
            unsafe { result::device::get_attribute(dev, a) }
                .map_err(|e| named("cuDeviceGetAttribute", e))
        };
        use sys::CUdevice_attribute::*;
        let major = attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        gpus.push(GpuFacts {
            name,
            compute_cap: ComputeCap {
                major: major.max(0) as u32,
                minor: minor.max(0) as u32,
            },
        });
    }
    Ok(DriverFacts {
        cuda_version: CudaVersion(version.max(0) as u32),
        gpus,
    })
}

/// Without CUDA compiled in there is no driver to ask.
#[cfg(not(feature = "cuda"))]
pub fn probe() -> Result<DriverFacts, Mismatch> {
    Err(Mismatch::NotBuilt)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(version: u32, cc: &str) -> BuildTarget {
        BuildTarget {
            cuda: true,
            cuda_version: Some(CudaVersion(version)),
            compute_cap: ComputeCap::parse_flat(cc),
        }
    }

    fn driver(version: u32, ccs: &[&str]) -> DriverFacts {
        DriverFacts {
            cuda_version: CudaVersion(version),
            gpus: ccs
                .iter()
                .map(|cc| GpuFacts {
                    name: format!("GPU sm_{cc}"),
                    compute_cap: ComputeCap::parse_flat(cc).unwrap(),
                })
                .collect(),
        }
    }

    #[test]
    fn versions_read_and_print_as_cuda_spells_them() {
        assert_eq!(CudaVersion(13000).to_string(), "13.0");
        assert_eq!(CudaVersion(12080).to_string(), "12.8");
        assert_eq!(CudaVersion(13040).to_string(), "13.4");
        assert_eq!(CudaVersion(13000).min_driver(), Some(580));
        assert_eq!(CudaVersion(13990).min_driver(), None);
        let cc = |s| ComputeCap::parse_flat(s).unwrap();
        assert_eq!(cc("90"), ComputeCap { major: 9, minor: 0 });
        assert_eq!(cc("86").to_string(), "8.6");
        assert_eq!(cc("120").to_string(), "12.0");
        assert_eq!(cc("120").flat(), 120);
        assert!(cc("89") < cc("90") && cc("90") < cc("100"));
        for bad in ["", "x", "9", "-90"] {
            assert_eq!(ComputeCap::parse_flat(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_driver_as_new_as_the_build_or_newer_passes() {
        for d in [13000, 13010, 13040] {
            let passed = check(build(13000, "90"), &driver(d, &["90"]), 0).unwrap();
            assert!(passed.warnings.is_empty(), "{passed:?}");
            assert!(passed.summary.contains("compute capability 9.0"));
        }
    }

    #[test]
    fn an_older_driver_is_refused_naming_the_driver_to_install() {
        // The GPU-check machines' case, the other way round: a 13.4 build on a 13.0 driver.
        let e = check(build(13040, "90"), &driver(13000, &["90"]), 0).unwrap_err();
        assert_eq!(
            e,
            Mismatch::DriverTooOld {
                driver: CudaVersion(13000),
                build: CudaVersion(13040)
            }
        );
        let e = check(build(13000, "90"), &driver(12080, &["90"]), 0).unwrap_err();
        let line = e.to_string();
        assert!(!line.contains('\n'));
        assert!(line.contains("supports CUDA 12.8"), "{line}");
        assert!(line.contains("needs CUDA 13.0"), "{line}");
        assert!(line.contains("driver 580 or newer"), "{line}");
    }

    #[test]
    fn a_gpu_older_than_the_kernels_is_refused_naming_the_rebuild() {
        let e = check(build(13000, "90"), &driver(13000, &["80"]), 0).unwrap_err();
        let line = e.to_string();
        assert!(matches!(e, Mismatch::ComputeCapTooLow { .. }));
        assert!(line.contains("compute capability 8.0"), "{line}");
        assert!(line.contains("CUDA_COMPUTE_CAP=80"), "{line}");
    }

    #[test]
    fn a_newer_gpu_runs_the_ptx_with_a_warning() {
        let passed = check(build(13000, "90"), &driver(13000, &["100"]), 0).unwrap();
        assert_eq!(passed.warnings.len(), 1);
        assert!(passed.warnings[0].contains("JIT"), "{passed:?}");
    }

    #[test]
    fn the_device_must_exist_and_the_build_must_have_cuda() {
        let e = check(build(13000, "90"), &driver(13000, &["90"]), 1).unwrap_err();
        assert_eq!(
            e,
            Mismatch::NoSuchGpu {
                ordinal: 1,
                count: 1
            }
        );
        let cpu = BuildTarget {
            cuda: false,
            cuda_version: None,
            compute_cap: None,
        };
        assert_eq!(
            check(cpu, &driver(13000, &["90"]), 0),
            Err(Mismatch::NotBuilt)
        );
    }

    #[test]
    fn an_unrecorded_build_target_passes_with_warnings() {
        let unknown = BuildTarget {
            cuda: true,
            cuda_version: None,
            compute_cap: None,
        };
        let passed = check(unknown, &driver(12000, &["70"]), 0).unwrap();
        assert_eq!(passed.warnings.len(), 2, "{passed:?}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_cpu_build_records_nothing_and_probes_nothing() {
        let current = BuildTarget::current();
        assert!(!current.cuda);
        assert_eq!(probe(), Err(Mismatch::NotBuilt));
    }
}
