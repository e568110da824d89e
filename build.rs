//! Link-time facts about libtorch that the binary needs at run time.
//!
//! `torch-sys` tells us (as `DEP_TCH_LIBTORCH_LIB`) where the libtorch it linked lives. We:
//! * embed that directory as an rpath, so `target/release/labelfool` runs without `LD_LIBRARY_PATH`;
//! * force-link `libtorch_cuda` when the wheel ships it. The linker's default `--as-needed` drops it
//!   (no symbol of ours refers to it), and then libtorch silently reports CUDA as unavailable.
//!
//! It also compiles Triton's vendored `model_config.proto` into Rust types (prost) and a
//! descriptor set (for the text-format parser that reads `config.pbtxt`). Pure Rust: no `protoc`.
use std::path::PathBuf;

fn main() {
    compile_model_config();
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

fn compile_model_config() {
    let dir = "src/model/repository/proto";
    println!("cargo:rerun-if-changed={dir}/model_config.proto");
    let fds = protox::compile(["model_config.proto"], [dir]).expect("model_config.proto compiles");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    std::fs::write(out.join("model_config.bin"), prost::Message::encode_to_vec(&fds)).expect("OUT_DIR is writable");
    prost_build::Config::new().compile_fds(fds).expect("prost-build generates model_config types");
}
