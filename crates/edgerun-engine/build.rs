//! Records what a CUDA build was built for, so that the binary can refuse a machine it cannot run
//! on before it loads anything (`device/preflight.rs`): the CUDA version cudarc's bindings and
//! candle's PTX were made for (`CUDARC_CUDA_VERSION`, e.g. 13000) and the compute capability
//! candle-kernels compiled for (`CUDA_COMPUTE_CAP`, e.g. 90). `scripts/install-cuda-toolkit.sh`
//! sets both. A CPU build records nothing and rebuilds for no such variable.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in ["CUDARC_CUDA_VERSION", "CUDA_COMPUTE_CAP"] {
        println!("cargo:rerun-if-env-changed={var}");
        if let Ok(value) = std::env::var(var) {
            println!("cargo:rustc-env=EDGERUN_BUILT_{var}={value}");
        }
    }
}
