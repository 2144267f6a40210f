"""Composition and validation: every bad value ends in one ConfigError naming its key."""

from __future__ import annotations

import pytest
from hydra.errors import HydraException
from omegaconf import OmegaConf

from trntrain.config import ConfigError, compose, config_dir, validate
from trntrain.config.compose_errors import explain


def test_default_config_composes_and_validates():
    cfg = compose()
    validate(cfg, world_size=1)
    assert cfg.model.name == "llama_tiny"
    assert cfg.data.source == "corpus"
    assert set(cfg.keys()) == {"run", "model", "parallel", "train", "optim", "data",
                               "checkpoint", "backend", "cluster", "logging", "plan", "peft",
                               "objective"}
    groups = {p.name for p in config_dir().iterdir() if p.is_dir()}
    assert {"model", "parallel", "train", "optim", "data", "checkpoint", "backend", "cluster",
            "logging"} <= groups


def test_every_model_option_validates():
    for path in sorted((config_dir() / "model").glob("*.yaml")):
        cfg = compose([f"model={path.stem}"])
        assert cfg.model.name == path.stem
        validate(cfg, world_size=1)


@pytest.mark.parametrize(
    ("overrides", "world_size", "key", "valid"),
    [
        (["model.n_kv_heads=3"], 1, "model.n_kv_heads", "divisor of model.n_heads=8"),
        (["model.n_heads=6"], 1, "model.n_kv_heads", "divisor of model.n_heads=6"),
        (["model.dim=100"], 1, "model.dim", "multiple of model.n_heads=8"),
        (["model.dim=0"], 1, "model.dim", "positive integer"),
        (["model.vocab_size=200"], 1, "model.vocab_size", "at least 257"),
        (["model.family=gpt"], 1, "model.family", "llama"),
        (["train.max_steps=0"], 1, "train.max_steps", "positive integer"),
        (["train.max_steps=-5"], 1, "train.max_steps", "positive integer"),
        (["train.seq_len=0"], 1, "train.seq_len", "positive integer"),
        (["train.seq_len=4096"], 1, "train.seq_len", "model.max_seq_len=1024"),
        (["train.global_batch_size=10", "train.micro_batch_size=4"], 1,
         "train.global_batch_size", "multiple of train.micro_batch_size (4) x data-parallel "
         "size (1) = 4"),
        (["train.global_batch_size=6", "train.micro_batch_size=2"], 2,
         "train.global_batch_size", "= 4, e.g. 4"),
        (["train.global_batch_size=3"], 2, "train.global_batch_size", "data-parallel size (2)"),
        (["train.micro_batch_size=0"], 1, "train.micro_batch_size", "positive integer"),
        (["train.precision=fp16"], 1, "train.precision", "bf16_autocast"),
        (["train.eval_every=-1"], 1, "train.eval_every", "0 (no evaluation)"),
        (["optim.lr=0"], 1, "optim.lr", "positive float"),
        (["optim.decay=step"], 1, "optim.decay", "cosine"),
        (["optim.betas=[0.9]"], 1, "optim.betas", "two floats"),
        (["optim.min_lr_ratio=2"], 1, "optim.min_lr_ratio", "[0, 1]"),
        (["optim.max_grad_norm=-1"], 1, "optim.max_grad_norm", "0 disables"),
        (["optim.name=sgd"], 1, "optim.name", "adamw"),
        (["parallel.dp=3"], 2, "parallel.dp", "world size 2"),
        (["parallel.tp=3"], 3, "parallel.tp", "a divisor of model.n_heads=8"),
        (["parallel.tp=4", "model.n_kv_heads=1", "model.n_heads=6", "model.dim=96"], 4,
         "parallel.tp", "a divisor of model.n_heads=6"),
        (["parallel.tp=8", "model.n_kv_heads=null", "model.n_heads=8", "model.dim=128",
          "model.ffn_hidden_dim=100"], 8, "parallel.tp", "model.ffn_hidden_dim=100"),
        (["parallel.tp=4", "model.n_kv_heads=3", "model.n_heads=12", "model.dim=96"], 4,
         "parallel.tp", "a divisor or a multiple of model.n_kv_heads=3"),
        (["parallel.tp=4", "model.vocab_size=266"], 4, "model.vocab_size", "e.g. 268"),
        (["parallel.tp=2", "parallel.sequence_parallel=true", "train.seq_len=33"], 2,
         "train.seq_len", "a multiple of parallel.tp=2"),
        (["parallel.tp=2"], 3, "parallel.tp", "tp * pp * dp = world size 3"),
        (["parallel.activation_checkpointing=some"], 1, "parallel.activation_checkpointing",
         "selective"),
        (["parallel.pp=0"], 1, "parallel.pp", "positive integer"),
        (["data.val_fraction=1.5"], 1, "data.val_fraction", "(0, 1)"),
        (["backend.name=tpu"], 1, "backend.name", "cuda"),
        (["logging.every=0"], 1, "logging.every", "positive integer"),
        (["logging.level=LOUD"], 1, "logging.level", "INFO"),
        (["+extra=1"], 1, "extra", "top-level keys run, model"),
        (["checkpoint=dcp", "checkpoint.every=-1"], 1, "checkpoint.every", "integer >= 0"),
        (["checkpoint=dcp", "checkpoint.async=maybe"], 1, "checkpoint.async", "true or false"),
        (["checkpoint=dcp", "checkpoint.resume=/nowhere"], 1, "checkpoint.resume",
         "an existing checkpoint directory"),
        (["checkpoint.init_from=/nowhere"], 1, "checkpoint.init_from", "Hugging Face"),
        (["checkpoint=zip"], 1, None, None),
        (["train.seed=${nowhere}"], 1, "train.seed", "resolves"),
    ],
)
def test_invalid_values_name_key_and_valid_range(overrides, world_size, key, valid):
    if key is None:  # an unknown group option: Hydra refuses it while composing
        with pytest.raises(HydraException) as composing:
            compose(overrides)
        assert explain(composing.value) == (
            "checkpoint=zip is invalid: conf/checkpoint/ has no option 'zip'; valid: one of "
            "dcp, hf, none.")
        return
    cfg = compose(overrides)
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size=world_size)
    message = str(info.value)
    assert info.value.key == key
    assert message.startswith(f"{key}=")
    assert valid in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model=llama_foo"], "model=llama_foo is invalid: conf/model/ has no option "
                              "'llama_foo'; valid: one of llama2_13b,"),
        (["data=parquet"], "valid: one of chat, corpus, hf, indexed, jsonl, preference, "
                           "synthetic, text."),
        (["model.heads=4"], "model.heads is not a key of model; valid keys of model: name,"),
        (["nonsense=1"], "nonsense is not a key of the config root; valid keys of the config "
                         "root: run, model,"),
        (["train.max_steps=many"], "train.max_steps='many' is invalid: Value 'many' of type "
                                   "'str' could not be converted to Integer; valid: a value of "
                                   "type int."),
        (["train.seed=="], "Error parsing override 'train.seed=='"),
    ],
)
def test_hydra_composition_errors_are_restated(overrides, expected):
    with pytest.raises(HydraException) as info:
        compose(overrides)
    message = explain(info.value)
    assert expected in message
    assert "\n" not in message and "Config search path" not in message


def test_structured_schema_checks_types_in_group_files():
    cfg = compose(["model=llama3_8b", "train.seq_len=2048"])
    assert OmegaConf.get_type(cfg.model).__name__ == "ModelConfig"
    assert OmegaConf.get_type(cfg.data).__name__ == "CorpusDataConfig"
    with pytest.raises(HydraException) as info:
        compose(["data=synthetic", "data.root=/tmp"])  # a corpus-only key
    assert explain(info.value) == ("data.root is not a key of data; valid keys of data: "
                                   "source, val_fraction, blend, document_masking, num_tokens.")
