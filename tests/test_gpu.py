"""The continuous engine on a CUDA GPU (marked `gpu`: skipped without one; benchmarks/gpu_check.sh
runs them on a lent GPU): the same greedy text as the pipeline, decode passes that never wait on
the host inside the model, CUDA graphs recorded and replaying the same text, and each sampling
row drawing from its own generator. The model is prepared as engine=continuous runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import pytest

from runner.config.schema import ReplayMode
from runner.engines.continuous.engine import ContinuousEngine
from runner.engines.pipeline import ChatReplayPipeline, PipelineEngine
from runner.engines.protocol import Sampling
from runner.inputs.conversation import Conversation, Message
from runner.replay import replay_all

pytestmark = pytest.mark.gpu

CONVERSATIONS = [
    Conversation(
        number, tuple(Message("user", text) for text in turns), MappingProxyType({}), Path("gpu"), number
    )
    for number, turns in enumerate(
        [
            ("What is the capital of France?", "And of Italy?"),
            ("Write a haiku about rain.",),
            ("Name three primary colours.", "Mix two of them.", "What do you get?"),
            ("How do I reverse a list in Python?",),
            ("What is photosynthesis?", "Explain it to a five year old."),
            ("Suggest a name for a cat.",),
        ]
    )
]


@pytest.fixture(scope="module")
def cuda_model(gpu_checkpoint):
    """The checkpoint in fp32 on the GPU (fp32: equal greedy text is a fair ask across kernels),
    prepared as engine=continuous runs it: projections joined, the decoder run op by op."""
    import torch

    from runner.engines.continuous import prepare_model
    from runner.model.loading import load_causal_lm, load_tokenizer

    load = {
        "model": str(gpu_checkpoint),
        "dtype": torch.float32,
        "device_map": "cuda",
        "trust_remote_code": False,
    }
    model = load_causal_lm(load)
    prepare_model(model, rows=8)
    return model, load_tokenizer({**load, "task": "text-generation"})


def engine(cuda_model, batch_size=4, cuda_graphs=False, **sampling):
    model, tokenizer = cuda_model
    settings = Sampling(**{"max_new_tokens": 16, **sampling})
    return ContinuousEngine(model, tokenizer, settings, batch_size, 512, cuda_graphs=cuda_graphs)


def texts(chat_engine, run_seed=0):
    results = replay_all(CONVERSATIONS, chat_engine, ReplayMode.regenerate, run_seed=run_seed)
    chat_engine.close()  # its graphs go now, not at some later collection beside another's
    return {result.conversation.id: [m.content for m in result.messages] for result in results}


def test_greedy_replay_on_cuda_equals_the_pipeline_with_and_without_cuda_graphs(cuda_model, gpu_checkpoint):
    from runner.model.loading import load_pipeline

    tokenizer = cuda_model[1]
    load = {"task": "text-generation", "model": str(gpu_checkpoint), "dtype": "float32", "device_map": "cuda"}
    pipeline = PipelineEngine(load_pipeline(load, ChatReplayPipeline, tokenizer), Sampling(max_new_tokens=16))
    reference = texts(pipeline)
    eager = engine(cuda_model)
    assert eager.forward.direct is not None and eager.mixed  # op by op, one ragged pass a step
    assert texts(eager) == reference
    assert eager.counters().steps.mixed_passes > 0
    graphed = engine(cuda_model, batch_size=5, cuda_graphs=True)
    assert texts(graphed) == reference
    assert graphed.graphs.record, "recording a decode pass failed (the log says why)"
    assert graphed.graphs.recorded >= len(graphed.graphs.used) > 1


def test_a_decode_pass_never_waits_on_the_host_inside_the_model(cuda_model):
    import torch

    chat_engine = engine(cuda_model)
    forward = chat_engine.forward
    forward([[1, 2, 3, 4, 5, 6, 7, 8]] * 2, [0, 0], [0, 1])  # two slots hold 8 tokens
    positions = torch.tensor([[8], [8]], device="cuda")
    chat_engine.cache.plan(slice(0, 2), positions, 9)
    tokens = torch.tensor([[9], [10]], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        logits = forward.run(tokens, positions, 9)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert logits.shape == (2, cuda_model[0].config.vocab_size)


def test_seeded_sampling_on_cuda_draws_each_row_from_its_own_generator(cuda_model):
    """The sampler gives a row the same tokens from the same logits alone or among others, and a
    seeded run repeats itself, with and without graphs. Whole texts at different batch sizes are
    not compared here, as they are on the CPU: on CUDA a pass's last bits depend on its shape
    (cuBLAS picks kernels by shape), and the random weights' flat distributions make such bits
    other draws (rehearsed on the CPU, graphs' fixed-shape passes alone changed two draws of one
    reply in ten)."""
    import torch

    from runner.engines.continuous.sampling import next_tokens

    knobs = Sampling(max_new_tokens=16, do_sample=True, temperature=0.9, top_k=40, top_p=0.95)
    vocab = cuda_model[0].config.vocab_size
    logits = torch.randn(6, vocab, generator=torch.Generator("cuda").manual_seed(0), device="cuda") * 3
    stop = torch.tensor([0], device="cuda")

    def rows(seeds):
        return [Row(knobs, [1], [], torch.Generator("cuda").manual_seed(seed)) for seed in seeds]

    together, alone = rows(range(6)), [rows([seed]) for seed in range(6)]
    for _ in range(3):  # each draw moves the row's own generator on
        batched = next_tokens(logits, together, stop)
        assert batched == [next_tokens(logits[i : i + 1], alone[i], stop)[0] for i in range(6)]
    sampled = {"do_sample": True, "temperature": 0.9, "top_k": 40, "top_p": 0.95}
    for graphs in (False, True):
        first = texts(engine(cuda_model, batch_size=6, cuda_graphs=graphs, **sampled))
        assert texts(engine(cuda_model, batch_size=6, cuda_graphs=graphs, **sampled)) == first
        assert texts(engine(cuda_model, batch_size=6, cuda_graphs=graphs, **sampled), run_seed=1) != first


@dataclass
class Row:
    """What the sampler reads of a decoding row (sampling.SamplingRow)."""

    sampling: Sampling
    ids: list[int]
    generated: list[int]
    generator: object
