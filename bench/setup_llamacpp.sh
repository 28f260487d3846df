#!/usr/bin/env bash
# Build llama.cpp's own command-line tools (llama-perplexity, llama-bench, llama-cli) for bench/deploy_gguf.py.
# Bench only, never CI. The source comes from the package registry: the llama-cpp-python sdist vendors llama.cpp.
#
#   bash bench/setup_llamacpp.sh [DIR]      # default DIR: $LLAMACPP_DIR, else /tmp/layerprune-llamacpp
#
# Prints the binaries' folder and the build time. Portable x86-64 flags: a -march=native build crashed here with
# "illegal instruction" and the pip-built Python binding segfaulted, so only the stock tools are built and used.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${1:-${LLAMACPP_DIR:-/tmp/layerprune-llamacpp}}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3  # a checkout without the venv (a worktree): any python with pip will do
JOBS="${JOBS:-2}"
mkdir -p "$DIR"
if [ -x "$DIR/build/bin/llama-perplexity" ] && [ -x "$DIR/build/bin/llama-bench" ]; then
  echo "already built: $DIR/build/bin"; exit 0
fi
command -v cmake >/dev/null && command -v ninja >/dev/null || "$PY" -m pip install cmake ninja
if [ ! -d "$DIR/src" ]; then
  "$PY" -m pip download --no-deps --no-binary :all: llama-cpp-python -d "$DIR/sdist"
  tarball="$(ls "$DIR"/sdist/llama_cpp_python-*.tar.gz | head -1)"
  mkdir -p "$DIR/src" && tar -xzf "$tarball" -C "$DIR/src" --strip-components=1
fi
SRC="$DIR/src/vendor/llama.cpp"
start=$(date +%s)
cmake -S "$SRC" -B "$DIR/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX=ON \
  -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TOOLS=ON -DBUILD_SHARED_LIBS=OFF
targets="llama-perplexity llama-bench"
for t in llama-cli llama-completion; do
  ninja -C "$DIR/build" -t targets all 2>/dev/null | grep -q "^$t:" && targets="$targets $t"
done
cmake --build "$DIR/build" -j "$JOBS" --target $targets
end=$(date +%s)
echo "built $targets in $((end - start)) s (-j $JOBS) under $DIR/build/bin"
src_name="$(basename "$(ls "$DIR"/sdist/*.tar.gz | head -1)")"
echo "{\"seconds\": $((end - start)), \"jobs\": $JOBS, \"source\": \"$src_name\"}" > "$DIR/build_time.json"
