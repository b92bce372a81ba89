"""The pipeline engine on the real embedded model: chat template, decoding, stops, determinism."""

from __future__ import annotations

import pytest

from runner.conversations import Conversation, Message
from runner.engine import PipelineEngine, stop_token_ids, template_supports_system_role
from runner.replay import replay_conversation
from runner.schema import ReplayMode

pytestmark = pytest.mark.slow

QUESTION = (Message("user", "What is the capital of France?"),)
GREEDY = {
    "max_new_tokens": 24,
    "min_new_tokens": 0,
    "do_sample": False,
    "repetition_penalty": 1.0,
    "temperature": None,
    "top_p": None,
    "top_k": None,
}
SAMPLING = {**GREEDY, "do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 50}
# google/gemma-2-9b-it's chat template: it raises on a system message.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


def without_time(reply):
    return (reply.text, reply.prompt_tokens, reply.new_tokens, reply.finish_reason)


def test_greedy_reply_is_correct_deterministic_and_stops_at_eos(smol_pipeline):
    engine = PipelineEngine(smol_pipeline, GREEDY)
    first, second = engine.generate(QUESTION, seed=1), engine.generate(QUESTION, seed=2)
    assert without_time(first) == without_time(second)
    assert "Paris" in first.text
    assert first.finish_reason == "stop" and 0 < first.new_tokens < GREEDY["max_new_tokens"]
    assert "<|im_end|>" not in first.text and "assistant" not in first.text
    prompt_ids = smol_pipeline.tokenizer.apply_chat_template(
        [m.as_dict() for m in QUESTION], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    assert first.prompt_tokens == len(prompt_ids)


def test_length_limit_is_reported(smol_pipeline):
    reply = PipelineEngine(smol_pipeline, {**GREEDY, "max_new_tokens": 3}).generate(QUESTION, seed=0)
    assert (reply.new_tokens, reply.finish_reason) == (3, "length")


def test_min_new_tokens_forces_the_length(smol_pipeline):
    reply = PipelineEngine(smol_pipeline, {**GREEDY, "min_new_tokens": 20}).generate(QUESTION, seed=0)
    assert reply.new_tokens >= 20


def test_seeded_sampling_is_reproducible(smol_pipeline):
    engine = PipelineEngine(smol_pipeline, SAMPLING)
    prompt = (Message("user", "Tell me a short story about a dragon."),)
    runs = [engine.generate(prompt, seed=seed).text for seed in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_stop_ids_include_every_eos_of_the_generation_config(smol_pipeline):
    config = smol_pipeline.model.generation_config
    assert stop_token_ids(config) == {smol_pipeline.tokenizer.convert_tokens_to_ids("<|im_end|>")}
    llama3 = type(config)(eos_token_id=[128001, 128009])
    assert stop_token_ids(llama3) == {128001, 128009}


def test_template_without_system_role_is_detected_and_folded(smol_pipeline):
    tokenizer = smol_pipeline.tokenizer
    original = tokenizer.chat_template
    assert template_supports_system_role(tokenizer)
    try:
        tokenizer.chat_template = GEMMA2_TEMPLATE
        engine = PipelineEngine(smol_pipeline, {**GREEDY, "max_new_tokens": 4})
        assert not engine.supports_system_role
        messages = (Message("system", "Answer like a pirate."), *QUESTION, Message("user", "Why?"))
        conversation = Conversation("g", messages, {}, None, 1)
        result = replay_conversation(conversation, engine, ReplayMode.regenerate, run_seed=0)
    finally:
        tokenizer.chat_template = original
    assert result.system_folded and len(result.turns) == 2
    folded = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Answer like a pirate.\n\nWhat is the capital of France?"}],
        chat_template=GEMMA2_TEMPLATE,
        add_generation_prompt=True,
        return_dict=True,
    )["input_ids"]
    assert result.turns[0].prompt_tokens == len(folded)
