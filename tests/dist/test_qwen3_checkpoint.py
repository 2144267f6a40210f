"""qwen3_tiny checkpoints: Hugging Face import and export checked with transformers'
Qwen3ForCausalLM, `trntrain convert` both ways, and exact DCP resume and resharding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from tests.conftest import train_in_run_dir, tiny_config
from trntrain.checkpoint.convert import convert
from trntrain.checkpoint.manager import step_dir_name
from trntrain.distributed import World
from trntrain.parallel import comm
from trntrain.trainer import Trainer

QWEN = ("model=qwen3_tiny",)
TOKENS = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))


def hf_logits(directory: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32,
                                                 attn_implementation="eager")
    assert type(model) is Qwen3ForCausalLM
    with torch.no_grad():
        return model(TOKENS).logits


def full_logits(trainer: Trainer) -> torch.Tensor:
    """The whole model's logits on this rank (vocabulary shards gathered over tp)."""
    with torch.no_grad():
        logits = trainer.model(TOKENS)
    return comm.all_gather_dim(logits, -1, trainer.mesh.tp_group)


# -- import ---------------------------------------------------------------------------------------


def random_hf_qwen3(directory: Path, tied: bool) -> torch.Tensor:
    """A random tiny Qwen3ForCausalLM (qwen3_tiny's shape, 2 layers) saved as safetensors;
    returns its logits."""
    torch.manual_seed(3)
    # qwen3_tiny's rope_theta, spelt as the installed transformers (5.x or 4.x) reads it;
    # Qwen3Config's own default is 1e4.
    rope = ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
            if int(transformers.__version__.split(".")[0]) >= 5 else {"rope_theta": 1e6})
    config = Qwen3Config(vocab_size=264, hidden_size=128, intermediate_size=384,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                         head_dim=32, rms_norm_eps=1e-6, max_position_embeddings=1024,
                         tie_word_embeddings=tied, **rope)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms away from 1, so a missed or swapped one shows
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory, safe_serialization=True)
    with torch.no_grad():
        return model(TOKENS).logits


def import_logits(rank: int, world_size: int, directory: str, tied: bool) -> list:
    cfg = tiny_config(*QWEN, "model.n_layers=2", "parallel.tp=2",
                      f"model.tie_embeddings={str(tied).lower()}",
                      f"checkpoint.init_from={directory}")
    return full_logits(Trainer(cfg, World(rank, world_size, rank))).tolist()


@pytest.mark.parametrize("tied", [True, False])
def test_hugging_face_qwen3_imports_into_tp2(distributed, tmp_path, tied):
    expected = random_hf_qwen3(tmp_path / "hf", tied)
    for logits in distributed(import_logits, 2, str(tmp_path / "hf"), tied):
        torch.testing.assert_close(torch.tensor(logits), expected, rtol=1e-5, atol=1e-5)


# -- export ---------------------------------------------------------------------------------------


def test_export_loads_in_auto_model_with_equal_logits(tmp_path):
    trainer = Trainer(tiny_config(*QWEN, "train.max_steps=2", "checkpoint=hf"), World(),
                      run_dir=tmp_path)
    trainer.fit()
    exported = tmp_path / "checkpoints" / step_dir_name(2)
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
    assert (config["head_dim"], config["num_key_value_heads"]) == (32, 2)
    torch.testing.assert_close(hf_logits(exported), full_logits(trainer), rtol=1e-5, atol=1e-5)


def export(rank: int, world_size: int, run_dir: str, overrides: tuple[str, ...]) -> None:
    cfg = tiny_config(*QWEN, "train.max_steps=2", "checkpoint=hf", *overrides)
    Trainer(cfg, World(rank, world_size, rank), run_dir=Path(run_dir)).fit()


def test_tp_and_pipeline_export_is_one_model(distributed, tmp_path):
    untied = ("model.tie_embeddings=false",)
    distributed(export, 4, str(tmp_path / "pp"), ("parallel.tp=2", "parallel.pp=2", *untied))
    exported = tmp_path / "pp" / "checkpoints" / step_dir_name(2)
    files = sorted(p.name for p in exported.glob("*.safetensors"))
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    single = Trainer(tiny_config(*QWEN, "train.max_steps=2", *untied), World())
    single.fit()
    torch.testing.assert_close(hf_logits(exported), full_logits(single), rtol=1e-5, atol=1e-5)


def test_convert_run_to_hf_and_back(tmp_path):
    trainer = Trainer(tiny_config(*QWEN, "train.max_steps=2", "checkpoint=dcp"), World(),
                      run_dir=tmp_path / "run")
    trainer.fit()
    assert convert(tmp_path / "run", tmp_path / "hf") == "hf"
    torch.testing.assert_close(hf_logits(tmp_path / "hf"), full_logits(trainer), rtol=1e-5,
                               atol=1e-5)
    assert convert(tmp_path / "hf", tmp_path / "dcp") == "dcp"
    again = Trainer(tiny_config(*QWEN, "checkpoint=dcp"), World(), run_dir=tmp_path / "again")
    assert again.load_checkpoint(tmp_path / "dcp") == 0
    for (name, p), q in zip(again.model.named_parameters(), trainer.model.parameters(),
                            strict=True):
        assert torch.equal(p, q), name


# -- DCP resume -----------------------------------------------------------------------------------

RESUME = (*QWEN, "train.max_steps=20", "train.eval_every=0", "train.micro_batch_size=2",
          "checkpoint=dcp", "checkpoint.every=10", "checkpoint.keep=0")
TP2_PP2 = ("parallel.tp=2", "parallel.pp=2")


def run(rank: int, world_size: int, run_dir: str, overrides: tuple[str, ...]) -> dict:
    return train_in_run_dir(rank, world_size, run_dir, (*RESUME, *overrides))


def test_resume_is_bitwise_and_reshards_to_one_process(distributed, tmp_path):
    straight = distributed(run, 4, str(tmp_path / "a"), TP2_PP2)
    halfway = tmp_path / "a" / "checkpoints" / step_dir_name(10)
    resumed = distributed(run, 4, str(tmp_path / "b"), (*TP2_PP2, f"checkpoint.resume={halfway}"))
    for a, b in zip(straight, resumed, strict=True):
        assert sorted(b["loss"]) == list(range(11, 21))
        assert all(b["loss"][s] == a["loss"][s] for s in range(11, 21))  # bitwise
        assert b["params"] == a["params"]
        assert any(".q_norm." in name for name in b["params"])
    # The tp2 x pp2 checkpoint, q and k norms included, continues in one process.
    single = run(0, 1, str(tmp_path / "c"), (f"checkpoint.resume={halfway}",))
    assert [single["loss"][s] for s in range(11, 21)] == pytest.approx(
        [straight[0]["loss"][s] for s in range(11, 21)], rel=1e-5)
