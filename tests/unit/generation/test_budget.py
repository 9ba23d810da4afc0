"""The token budget in the core: a request's cost (prompt tokens as the engine holds them,
n x max_new_tokens, the answer's tokens), the over-budget reason with its numbers, KV bytes per
token from a model config, and the budget derived from free device memory. Admission into Serve's
batches is tests/unit/services/test_streaming_budget.py."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlavaConfig

from illume.generation.engine import Prompt
from illume.generation.generator import (
    ANSWER_MAX_NEW_TOKENS,
    CPU_TOKEN_BUDGET,
    GenerateRequest,
    Generator,
    RequestCost,
    SamplingParams,
    derive_token_budget,
    kv_bytes_per_token,
    over_budget,
)
from illume.generation.prompts import rationale_prompt
from illume.models import ModelSettings, load_model

QUESTION = "what colour is the square?"


def test_cost_and_the_over_budget_reason_name_every_number():
    cost = RequestCost(prompt_tokens=600, n=10, max_new_tokens=100, answer_tokens=10)
    assert cost.total == 600 + 10 * 100 + 10
    assert over_budget(cost, 1610) == ""  # exactly the budget fits
    assert over_budget(cost, 1609) == (
        "request needs 1610 tokens (prompt 600 + n x max_new_tokens 10 x 100 + answer 10); the budget is 1609"
    )
    given = RequestCost(prompt_tokens=40, n=2, max_new_tokens=8)
    assert over_budget(given, 10) == (
        "request needs 56 tokens (prompt 40 + n x max_new_tokens 2 x 8); the budget is 10"
    )


def test_kv_bytes_per_token_reads_the_language_model_config():
    # A 7B-shaped Llama with grouped-query attention: 2 x 32 layers x 8 kv heads x 128 x 2 bytes.
    text = LlamaConfig(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_size=4096)
    assert kv_bytes_per_token(text, torch.bfloat16) == 2 * 32 * 8 * 128 * 2
    assert kv_bytes_per_token(text, torch.float32) == 2 * 32 * 8 * 128 * 4
    # A VLM: its text_config counts, not the vision tower's.
    vlm = LlavaConfig(text_config=LlamaConfig(num_hidden_layers=4, num_attention_heads=4, hidden_size=64))
    assert kv_bytes_per_token(vlm, torch.float16) == 2 * 4 * 4 * 16 * 2


@pytest.fixture(scope="module")
def generator(tiny_dir) -> Generator:
    return Generator(load_model(ModelSettings(path=tiny_dir("llava"))), engine="fork")


def test_the_derived_budget_is_free_memory_share_over_bytes_per_token(generator):
    per_token = kv_bytes_per_token(generator.model.config, generator.loaded.dtype)
    assert derive_token_budget(generator.loaded, 0.5, free_bytes=per_token * 1000) == 500
    assert derive_token_budget(generator.loaded) == CPU_TOKEN_BUDGET  # CPU reports no free memory


def test_request_cost_counts_the_prompt_as_the_engine_holds_it(generator, images):
    sampling = SamplingParams(n=3, max_new_tokens=7)
    given = GenerateRequest(image=images[1], question=QUESTION, answer="red", sampling=sampling)
    (state,) = generator.engine.prefill([Prompt(given.image, rationale_prompt(QUESTION, "red"))])
    cost = generator.request_cost(given)
    assert cost == RequestCost(prompt_tokens=len(state), n=3, max_new_tokens=7, answer_tokens=0)
    # Without an answer: the prompt with an empty answer, plus the answer's greedy tokens.
    answered = GenerateRequest(image=images[1], question=QUESTION, sampling=sampling)
    (empty,) = generator.engine.prefill([Prompt(given.image, rationale_prompt(QUESTION, ""))])
    assert generator.request_cost(answered) == RequestCost(len(empty), 3, 7, ANSWER_MAX_NEW_TOKENS)
