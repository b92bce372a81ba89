"""Speculative decoding on the real embedded model: same greedy text, counted drafts, batch size 1."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import MappingProxyType

import pytest
from conftest import chat
from test_cli import read_jsonl, run_cli
from test_engine import DOZEN, replay_texts

from runner.config.compose import to_run_config
from runner.config.schema import ReplayMode
from runner.engines.continuous.engine import ContinuousEngine
from runner.engines.pipeline import PipelineEngine
from runner.engines.protocol import Request, Sampling
from runner.errors import ConfigError
from runner.inputs.conversation import Conversation, Message
from runner.model.hardware import Hardware
from runner.model.loading import load_assistant
from runner.replay import replay_all

pytestmark = pytest.mark.slow

PASSAGE = (
    "Our team met on Tuesday to review the quarterly budget. Marketing asked for more money for the "
    "spring campaign, and engineering asked for two new servers."
)
REWRITE = (
    Message("user", f"Summarise this in one sentence: {PASSAGE}"),
    Message("assistant", PASSAGE),
    Message("user", "Rewrite your previous response word for word, starting with 'Our team'."),
)


def test_prompt_lookup_gives_the_same_greedy_text_and_drafts_from_the_prompt(smol_pipeline):
    plain = Sampling(max_new_tokens=16)
    lookup = {"prompt_lookup_num_tokens": 6}
    conversations = [*DOZEN[:6], Conversation("rewrite", REWRITE, MappingProxyType({}), Path("t.jsonl"), 1)]
    expected = replay_texts(PipelineEngine(smol_pipeline, plain), conversations)
    engine = PipelineEngine(smol_pipeline, plain, lookup)
    results = list(replay_all(conversations, engine, ReplayMode.regenerate, run_seed=0))
    assert [[m.content for m in r.messages] for r in results] == expected
    summary = engine.counters().speculative
    assert summary.method == "prompt_lookup"
    # The counter saw every generated token, and fewer passes than tokens (drafts were accepted).
    assert summary.new_tokens == sum(turn.new_tokens for r in results for turn in r.turns)
    assert summary.forward_passes < summary.new_tokens
    assert 0 < summary.accepted_tokens <= summary.drafted_tokens
    assert 0 < summary.acceptance_rate <= 1
    # Copying the passage back: most tokens come from accepted drafts, several per forward pass.
    copying = PipelineEngine(smol_pipeline, plain, lookup)
    [reply] = copying.generate([Request(REWRITE, 0)])
    assert reply.text.startswith("Our team met on Tuesday")
    assert copying.speculation.summary().tokens_per_forward_pass > 2


def test_without_speculation_there_is_nothing_to_count(smol_pipeline, smol_model):
    assert PipelineEngine(smol_pipeline, Sampling(24)).counters().speculative is None
    engine = ContinuousEngine(smol_model, smol_pipeline.tokenizer, Sampling(4), 4, 512)
    assert engine.counters().speculative is None


def test_assistant_model_run_equals_the_plain_run_at_batch_size_one(write_jsonl, tmp_path, embedded_dir):
    source = write_jsonl(
        [
            chat(1, ("user", "Name three fruits."), ("user", "And three vegetables?")),
            chat(2, ("user", f"Repeat this exactly: {PASSAGE}")),
        ]
    )
    common = [f"input.path={source}", "generation.max_new_tokens=12"]
    plain = run_cli(*common, f"hydra.run.dir={tmp_path / 'plain'}")
    assert plain.returncode == 0, plain.stderr
    drafted = run_cli(
        *common, "generation.assistant_model=smollm2_135m", f"hydra.run.dir={tmp_path / 'drafted'}"
    )
    assert drafted.returncode == 0, drafted.stderr
    assert "uses batch size 1 (engine.batch_size=auto)" in drafted.stderr

    def texts(run: str) -> list[list[str]]:
        return [
            [m["content"] for m in r["messages"]]
            for r in read_jsonl(tmp_path / run / "chats" / "chats.jsonl")
        ]

    assert texts("drafted") == texts("plain")
    summary = json.loads((tmp_path / "drafted" / "summary.json").read_text())
    assert summary["batch_size"] == {"configured": 1, "final": 1}
    speculative = summary["speculative"]
    assert speculative["method"] == "assistant_model"
    # The draft is the same model: it proposes what the model itself would pick.
    assert speculative["acceptance_rate"] > 0.9
    assert speculative["tokens_per_forward_pass"] > 2
    assert "tokens accepted" in drafted.stderr
    assert json.loads((tmp_path / "plain" / "summary.json").read_text())["speculative"] is None


def test_a_draft_model_with_another_vocabulary_is_refused(compose_config, smol_pipeline, embedded_dir):
    cfg = to_run_config(compose_config("generation.assistant_model=smollm2_135m"))
    tokenizer = copy.deepcopy(smol_pipeline.tokenizer)
    tokenizer.add_tokens(["<a_token_the_draft_lacks>"])
    with pytest.raises(ConfigError, match="does not share smollm2_135m's tokenizer"):
        load_assistant(cfg, Hardware(), tokenizer)
