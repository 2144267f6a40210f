"""Generation under tensor parallelism on gloo ranks: each rank loads its shards (from a
Hugging Face directory or a DCP checkpoint) and every rank decodes transformers' tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.unit.test_generate import (
    NEW_TOKENS,
    PROMPT,
    save_tiny_hf_model,
    transformers_greedy,
)
from trntrain.checkpoint.convert import convert
from trntrain.generate import Sampling, generate_tokens, load_model, resolve_source
from trntrain.parallel import ParallelDims, build_mesh


def _generate(rank: int, world_size: int, directory: str) -> dict[str, list[int]]:
    mesh = build_mesh(ParallelDims(tp=world_size, pp=1, dp=1), rank)
    model = load_model(resolve_source(Path(directory)), torch.device("cpu"),
                       tp_group=mesh.tp_group)
    assert model.layers["0"].attention.wq.weight.shape[0] < model.args.n_heads * model.args.head_dim
    return {"greedy": generate_tokens(model, PROMPT, NEW_TOKENS, tp_group=mesh.tp_group),
            "sampled": generate_tokens(model, PROMPT, 16, sampling=Sampling(1.2, 0.9, seed=1),
                                       tp_group=mesh.tp_group)}


@pytest.mark.parametrize("kind", ["hf", "dcp"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tp2_generates_transformers_tokens(distributed, tmp_path, family, kind):
    hf_dir = save_tiny_hf_model(tmp_path / "hf", family)
    directory = hf_dir
    if kind == "dcp":
        directory = tmp_path / "dcp"
        convert(hf_dir, directory)
    expected = transformers_greedy(hf_dir, PROMPT)
    single = load_model(resolve_source(directory), torch.device("cpu"))
    sampled = generate_tokens(single, PROMPT, 16, sampling=Sampling(1.2, 0.9, seed=1))
    for result in distributed(_generate, 2, str(directory)):
        assert result["greedy"] == expected
        # Every rank draws the same tokens, those of one process.
        assert result["sampled"] == sampled
