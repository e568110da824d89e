//! Link-time facts about libtorch that the binary needs at run time.
//!
//! `torch-sys` tells us (as `DEP_TCH_LIBTORCH_LIB`) where the libtorch it linked lives. We:
//! * embed that directory as an rpath, so `target/release/labelfool` runs without `LD_LIBRARY_PATH`;
//! * force-link `libtorch_cuda` when the wheel ships it. The linker's default `--as-needed` drops it
//!   (no symbol of ours refers to it), and then libtorch silently reports CUDA as unavailable.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Some(lib_dir) = std::env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
        println!("cargo:warning=torch-sys did not report its libtorch directory; no rpath is set");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        println!("cargo:rustc-cfg=labelfool_cuda_linked");
    }
    println!("cargo:rustc-check-cfg=cfg(labelfool_cuda_linked)");
    println!("cargo:rustc-env=LABELFOOL_LIBTORCH_LIB={}", lib_dir.display());
}
