"""Generation: greedy decoding with the KV cache gives transformers' tokens, token for
token, from a `save_pretrained` directory and from a DCP checkpoint of it; decoding with
the cache gives the logits of full recomputation; sampling, stopping and the sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trntrain.checkpoint.convert import convert
from trntrain.config import compose
from trntrain.errors import UserError
from trntrain.generate import (
    Sampling,
    build_prompt_tokenizer,
    check_options,
    choose,
    generate_tokens,
    load_model,
    parser,
    resolve_source,
)
from trntrain.models import build_model, materialize
from trntrain.models.layers import KVCache

NEW_TOKENS = 64
PROMPT = [5, 17, 33, 2, 90, 41, 7]
FAMILIES = ("llama", "qwen3")


def save_tiny_hf_model(directory: Path, family: str, eos_token_id: int | None = None,
                       vocab_size: int = 256) -> Path:
    """A random two-layer LlamaForCausalLM or Qwen3ForCausalLM (GQA; Qwen3 with heads
    narrower than the width and a tied head) saved with `save_pretrained`. Weights of std
    0.2 make greedy decoding wander over the vocabulary instead of repeating one token,
    and no eos (by default) lets transformers produce all its tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  initializer_range=0.2, bos_token_id=None, eos_token_id=eos_token_id,
                  pad_token_id=None)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=8, tie_word_embeddings=True))
    model.save_pretrained(str(directory))
    return directory


def transformers_greedy(directory: Path, prompt: list[int], new_tokens: int = NEW_TOKENS
                        ) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=FAMILIES)
def hf_dir(request, tmp_path_factory) -> Path:
    return save_tiny_hf_model(tmp_path_factory.mktemp(request.param), request.param)


def test_greedy_equals_transformers_generate(hf_dir):
    expected = transformers_greedy(hf_dir, PROMPT)
    assert len(set(expected)) > 20  # not one token repeated: a real test of the decoding
    model = load_model(resolve_source(hf_dir), torch.device("cpu"))
    assert generate_tokens(model, PROMPT, NEW_TOKENS) == expected


def test_greedy_from_a_dcp_checkpoint(hf_dir, tmp_path):
    convert(hf_dir, tmp_path / "dcp")
    source = resolve_source(tmp_path / "dcp")
    assert source.kind == "dcp"
    model = load_model(source, torch.device("cpu"))
    assert generate_tokens(model, PROMPT, NEW_TOKENS) == transformers_greedy(hf_dir, PROMPT)


@pytest.mark.parametrize("name", ["llama_tiny", "qwen3_tiny"])
@torch.no_grad()
def test_kv_cache_decoding_equals_full_recomputation(name):
    cfg = compose([f"model={name}", "model.init_std=0.05"]).model
    with torch.device("meta"):
        model = build_model(cfg)
    materialize(model, torch.device("cpu"), seed=2)
    tokens = torch.randint(0, 264, (2, 20), generator=torch.Generator().manual_seed(0))
    full = model(tokens)
    cache = KVCache(24)  # more positions than written: the rest must stay unseen
    start = 0
    for length in (7, 1, 1, 5, 1, 1, 4):  # a prefill, single tokens, and chunks
        positions = torch.arange(start, start + length).expand(2, length)
        logits = model(tokens[:, start:start + length], positions, None, cache)
        torch.testing.assert_close(logits, full[:, start:start + length], atol=1e-5, rtol=0)
        start += length
    assert start == 20


def test_generation_stops_before_a_stop_token(hf_dir):
    model = load_model(resolve_source(hf_dir), torch.device("cpu"))
    greedy = generate_tokens(model, PROMPT, 16)
    stop = greedy[5]
    first = greedy.index(stop)
    assert generate_tokens(model, PROMPT, 16, stop_ids=[stop]) == greedy[:first]


def test_sampling_is_seeded_and_top_p_narrows_it(hf_dir):
    model = load_model(resolve_source(hf_dir), torch.device("cpu"))
    hot = Sampling(temperature=1.5, seed=3)
    a = generate_tokens(model, PROMPT, 24, sampling=hot)
    assert a == generate_tokens(model, PROMPT, 24, sampling=hot)
    assert a != generate_tokens(model, PROMPT, 24, sampling=Sampling(temperature=1.5, seed=4))
    assert a != generate_tokens(model, PROMPT, 24)
    # A nucleus smaller than any one token's probability is the argmax.
    narrow = Sampling(temperature=1.0, top_p=1e-6, seed=3)
    assert generate_tokens(model, PROMPT, 24, sampling=narrow) == generate_tokens(
        model, PROMPT, 24)


def test_choose_keeps_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(0)
    drawn = {choose(logits, Sampling(temperature=1.0, top_p=0.7), gen) for _ in range(200)}
    assert drawn == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    assert choose(logits, Sampling(), gen) == 0


def test_sources_and_options_are_checked(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        resolve_source(tmp_path / "missing")
    with pytest.raises(UserError, match="neither"):
        resolve_source(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  name: x\n")
    with pytest.raises(UserError, match="has no checkpoint"):
        resolve_source(run)
    args = parser().parse_args([str(tmp_path), "--prompt", "x", "--pp", "2"])
    with pytest.raises(UserError, match="--pp=1"):
        check_options(args, 1)
    args = parser().parse_args([str(tmp_path), "--prompt", "x", "--tp", "2"])
    with pytest.raises(UserError, match="--tp=2"):
        check_options(args, 3)


def test_stop_ids_from_the_directory(tmp_path, hf_tokenizer_json):
    directory = save_tiny_hf_model(tmp_path, "llama", eos_token_id=3)
    assert resolve_source(directory).stop_ids == {3}
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert resolve_source(directory).stop_ids == {7, 9}
    source = resolve_source(save_tiny_hf_model(tmp_path / "none", "llama"))
    assert source.stop_ids is None and source.tokenizer == "byte"
    byte = build_prompt_tokenizer("byte")
    assert byte.stop_ids == {256} and byte.decode(byte.encode("héllo")) == "héllo"
    # The byte tokenizer's built-in template, as data=chat renders it, then the assistant's
    # header; its turns end at 256.
    assert byte.chat([{"role": "user", "content": "hi"}]) == list(b"<|user|>\nhi\n<|assistant|>\n")
    with pytest.raises(UserError, match="chat template"):
        build_prompt_tokenizer(str(hf_tokenizer_json)).chat([{"role": "user", "content": "hi"}])
