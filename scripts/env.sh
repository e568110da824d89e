# Source me: the environment that builds and runs LabelFool against the cached libtorch.
#   source scripts/env.sh && cargo build --release
# LABELFOOL_CACHE (default ~/.cache/labelfool) holds the torch venv and the exported models.
export LABELFOOL_CACHE="${LABELFOOL_CACHE:-$HOME/.cache/labelfool}"
export LABELFOOL_TORCH_VERSION="2.13.0"   # what tch 0.26 expects
export LABELFOOL_TORCHVISION_VERSION="0.28.0"   # the torchvision built against that torch (onnx2torch needs one)
export LABELFOOL_VENV="$LABELFOOL_CACHE/torch-$LABELFOOL_TORCH_VERSION"
export LABELFOOL_MLSERVER_VERSION="1.7.1"   # the Open Inference Protocol server the remote-target tests talk to
# torch-sys asks this venv's python where libtorch is (and checks its version).
export LIBTORCH_USE_PYTORCH=1
export VIRTUAL_ENV="$LABELFOOL_VENV"
case ":$PATH:" in
  *":$LABELFOOL_VENV/bin:"*) ;;
  *) export PATH="$LABELFOOL_VENV/bin:$PATH" ;;
esac
# Cargo's intermediate files (every compiled dependency) live in the cache, shared by every
# checkout, as CI caches keep `target/`: a fresh clone compiles only this crate. The binaries
# still land in ./target (target/release/labelfool).
export CARGO_BUILD_BUILD_DIR="${CARGO_BUILD_BUILD_DIR:-$LABELFOOL_CACHE/cargo-build}"
