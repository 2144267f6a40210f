"""Hugging Face export and import, checked with transformers' LlamaForCausalLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.conftest import tiny_config
from trntrain.checkpoint.convert import convert
from trntrain.checkpoint.manager import step_dir_name
from trntrain.distributed import World
from trntrain.errors import UserError
from trntrain.parallel import comm
from trntrain.trainer import Trainer

TOKENS = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))


def hf_logits(directory: Path, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    model = LlamaForCausalLM.from_pretrained(directory, torch_dtype=torch.float32,
                                             attn_implementation="eager")
    with torch.no_grad():
        return model(tokens).logits


def full_logits(trainer: Trainer, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    """The whole model's logits on this rank (vocabulary shards gathered over tp)."""
    with torch.no_grad():
        logits = trainer.model(tokens)
    return comm.all_gather_dim(logits, -1, trainer.mesh.tp_group)


def export(rank: int, world_size: int, run_dir: str, overrides: tuple[str, ...]) -> None:
    cfg = tiny_config("train.max_steps=2", "checkpoint=hf", *overrides)
    Trainer(cfg, World(rank, world_size, rank), run_dir=Path(run_dir)).fit()


@pytest.mark.parametrize("tied", [False, True])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, tied):
    model = (f"model.tie_embeddings={str(tied).lower()}",)
    trainer = Trainer(tiny_config("train.max_steps=2", "checkpoint=hf", *model), World(),
                      run_dir=tmp_path)
    trainer.fit()
    exported = tmp_path / "checkpoints" / step_dir_name(2)
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 4
    torch.testing.assert_close(hf_logits(exported), full_logits(trainer), rtol=1e-5, atol=1e-5)


def test_pipeline_and_tp_export_is_one_model(distributed, tmp_path):
    distributed(export, 4, str(tmp_path / "pp"), ("parallel.tp=2", "parallel.pp=2"))
    exported = tmp_path / "pp" / "checkpoints" / step_dir_name(2)
    files = sorted(p.name for p in exported.glob("*.safetensors"))
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    single = Trainer(tiny_config("train.max_steps=2"), World())
    single.fit()
    torch.testing.assert_close(hf_logits(exported), full_logits(single), rtol=1e-5, atol=1e-5)


def random_hf_llama(directory: Path, tied: bool) -> torch.Tensor:
    """A random tiny LlamaForCausalLM saved as safetensors; returns its logits."""
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=264, hidden_size=128, intermediate_size=384,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                         rms_norm_eps=1e-5, max_position_embeddings=256,
                         tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms away from 1, so a missed norm would show
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory, safe_serialization=True)
    with torch.no_grad():
        return model(TOKENS).logits


def import_logits(rank: int, world_size: int, directory: str, tied: bool) -> list:
    cfg = tiny_config("model.n_layers=2", "model.n_kv_heads=2", "parallel.tp=2",
                      f"model.tie_embeddings={str(tied).lower()}",
                      f"checkpoint.init_from={directory}")
    trainer = Trainer(cfg, World(rank, world_size, rank))
    return full_logits(trainer).tolist()


@pytest.mark.parametrize("tied", [False, True])
def test_hugging_face_llama_imports_into_tp2(distributed, tmp_path, tied):
    expected = random_hf_llama(tmp_path / "hf", tied)
    for logits in distributed(import_logits, 2, str(tmp_path / "hf"), tied):
        torch.testing.assert_close(torch.tensor(logits), expected, rtol=1e-5, atol=1e-5)


def test_convert_run_to_hf_and_back(tmp_path):
    cfg = tiny_config("train.max_steps=2", "checkpoint=dcp")
    trainer = Trainer(cfg, World(), run_dir=tmp_path / "run")
    trainer.fit()
    assert convert(tmp_path / "run", tmp_path / "hf") == "hf"
    torch.testing.assert_close(hf_logits(tmp_path / "hf"), full_logits(trainer), rtol=1e-5,
                               atol=1e-5)
    assert convert(tmp_path / "hf", tmp_path / "dcp") == "dcp"
    again = Trainer(tiny_config("checkpoint=dcp"), World(), run_dir=tmp_path / "again")
    assert again.load_checkpoint(tmp_path / "dcp") == 0
    for (name, p), q in zip(again.model.named_parameters(), trainer.model.parameters(),
                            strict=True):
        assert torch.equal(p, q), name


def test_convert_finds_the_checkpoints_of_a_run_in_its_checkpoint_dir(tmp_path):
    from trntrain.run_dir import write_run_dir

    cfg = tiny_config("train.max_steps=2", "checkpoint=dcp",
                      f"checkpoint.dir={tmp_path / 'elsewhere'}")
    write_run_dir(tmp_path / "run", cfg, overwrite=False)  # config.yaml, as `trntrain train`
    trainer = Trainer(cfg, World(), run_dir=tmp_path / "run")
    trainer.fit()
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert convert(tmp_path / "run", tmp_path / "hf") == "hf"
    torch.testing.assert_close(hf_logits(tmp_path / "hf"), full_logits(trainer), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize(("change", "message"), [
    ("drop lm_head", "has no tensor 'lm_head.weight' (for output.weight)"),
    ("wrong config", "model.embed_tokens.weight has shape [264, 128] but the model its "
                     "config.json describes needs [300, 128]"),
])
def test_converting_a_hugging_face_directory_that_does_not_match_is_a_user_error(
        tmp_path, change, message):
    """An untied model without its lm_head, or tensors that config.json does not describe:
    one clear error, not a KeyError nor the embedding used as the output layer."""
    from safetensors.torch import load_file, save_file

    random_hf_llama(tmp_path / "hf", tied=False)
    weights = tmp_path / "hf" / "model.safetensors"
    if change == "drop lm_head":
        tensors = load_file(weights)
        del tensors["lm_head.weight"]
        save_file(tensors, weights, metadata={"format": "pt"})
    else:
        config = json.loads((tmp_path / "hf" / "config.json").read_text())
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "vocab_size": 300}))
    with pytest.raises(UserError) as info:
        convert(tmp_path / "hf", tmp_path / "dcp")
    assert message in str(info.value) and "valid:" in str(info.value)
    assert str(tmp_path / "hf") in str(info.value)
    assert not (tmp_path / "dcp" / ".metadata").exists()
