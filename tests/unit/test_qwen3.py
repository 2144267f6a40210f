"""The Qwen3 family against transformers' Qwen3ForCausalLM and the published sizes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import Qwen3Config, Qwen3ForCausalLM

from trntrain.config import ConfigError, compose, validate
from trntrain.errors import UserError
from trntrain.models import build_model, count_parameters, family_for_hf, family_of
from trntrain.models.qwen3 import Qwen3, Qwen3Args
from trntrain.plan.layout import Layout
from trntrain.plan.memory import rank_params

# -- sizes ---------------------------------------------------------------------------------------

# The published configs (config.json of Qwen/Qwen3-<size> on the Hugging Face hub: all with
# head_dim 128, vocabulary 151936, 40960 positions, rope_theta 1e6, rms_norm_eps 1e-6) and
# parameter totals (keras-hub's Qwen3 presets; the hub's safetensors totals for 4B to 32B:
# those of 0.6B and 1.7B are larger by one vocab x hidden matrix, as their files store the
# tied lm_head as well). By hand, V vocab, d width, L layers, f ffn, q = heads x 128, kv =
# kv heads x 128: Vd (x2 untied) + d + L (2dq + 2d kv + 3df + 2d + 2 x 128).
# hidden, intermediate, layers, heads, kv heads, tied, parameters
PUBLISHED = {
    "qwen3_0_6b": (1024, 3072, 28, 16, 8, True, 596_049_920),
    "qwen3_1_7b": (2048, 6144, 28, 16, 8, True, 1_720_574_976),
    "qwen3_4b": (2560, 9728, 36, 32, 8, True, 4_022_468_096),
    "qwen3_8b": (4096, 12288, 36, 32, 8, False, 8_190_735_360),
    "qwen3_14b": (5120, 17408, 40, 40, 8, False, 14_768_307_200),
    "qwen3_32b": (5120, 25600, 64, 64, 8, False, 32_762_123_264),
}


def published_hf_config(name: str) -> Qwen3Config:
    hidden, ffn, layers, heads, kv, tied, _ = PUBLISHED[name]
    return Qwen3Config(vocab_size=151936, hidden_size=hidden, intermediate_size=ffn,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, head_dim=128, max_position_embeddings=40960,
                       rms_norm_eps=1e-6, tie_word_embeddings=tied)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_equals_transformers_and_published(name):
    model_cfg = compose([f"model={name}"]).model
    with torch.device("meta"):
        ours = count_parameters(build_model(model_cfg))
        reference = Qwen3ForCausalLM(published_hf_config(name))
    # transformers counts a tied lm_head once, as its parameters() yields it once.
    assert ours == sum(p.numel() for p in reference.parameters()) == PUBLISHED[name][-1]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_size_configs_are_the_published_ones(name):
    """The config.json trntrain writes for each size names the published architecture."""
    model_cfg = compose([f"model={name}"]).model
    written = family_of(model_cfg).hf.hf_config(model_cfg, torch.bfloat16)
    expected = published_hf_config(name)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim",
                "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                "attention_bias", "use_sliding_window"):
        assert written[key] == getattr(expected, key), key
    assert written["rope_theta"] == 1e6
    assert written["architectures"] == ["Qwen3ForCausalLM"] and written["model_type"] == "qwen3"


@pytest.mark.parametrize("name", ["qwen3_tiny", "qwen3_0_6b", "qwen3_8b", "qwen3_32b"])
def test_planner_inventory_counts_every_parameter(name):
    """The planner's per-layer parameters (q and k norms included) add up to the model."""
    cfg = compose([f"model={name}"])
    with torch.device("meta"):
        expected = count_parameters(build_model(cfg.model))
    one_rank = Layout(tp=1, pp=1, dp=1, sequence_parallel=False, zero1=False,
                      activation_checkpointing="none", schedule="1f1b", virtual_pp=1,
                      microbatches=1, micro_batch_size=1)
    assert sum(p.numel for p in rank_params(cfg.model, one_rank, 128, 0)) == expected


def test_planner_layer_follows_the_module_order():
    """layer_params lists one block's parameters in named_parameters() order."""
    cfg = compose(["model=qwen3_tiny"]).model
    with torch.device("meta"):
        block = build_model(cfg).layers["0"]
    shapes = [p.numel() for _, p in block.named_parameters()]
    assert shapes == [p.numel for p in family_of(cfg).layer_params(cfg, 1)]
    names = [n for n, _ in block.named_parameters()]
    assert names[5:7] == ["attention.q_norm.weight", "attention.k_norm.weight"]


def test_planner_static_memory_equals_the_trainer():
    """Parameters, gradients and optimizer state of qwen3_tiny, byte for byte."""
    from tests.conftest import tiny_config
    from trntrain.distributed import World
    from trntrain.plan.layout import layout_from_config
    from trntrain.plan.memory import stage_memory
    from trntrain.trainer import Trainer

    cfg = tiny_config("model=qwen3_tiny", "train.seq_len=64")
    trainer = Trainer(cfg, World())
    trainer.train_step(trainer.train_batches.step(0))  # the optimizer state exists after one
    measured = trainer.memory_bytes()
    model = stage_memory(cfg, layout_from_config(cfg, 1), 0)
    assert model["params"] == measured["params"] and model["grads"] == measured["grads"]
    assert model["optimizer_states"] + model["master_weights"] == measured["optimizer"]


def test_tiny_query_width_differs_from_the_model_width():
    """qwen3_tiny keeps Qwen3-0.6B's trait that would hide a q width = dim confusion."""
    cfg = compose(["model=qwen3_tiny"])
    validate(cfg, 1)
    m = cfg.model
    assert m.n_heads * m.head_dim != m.dim and m.tie_embeddings and m.n_kv_heads == 2


def test_flops_count_the_query_width_not_the_model_width():
    m = compose(["model=qwen3_0_6b"]).model
    h, q, kv, f, v, layers = 1024, 2048, 1024, 3072, 151936, 28
    matmul = layers * (h * q + 2 * h * kv + q * h + 3 * h * f) + v * h
    assert family_of(m).flops_per_token(m, 4096) == 6 * matmul + 12 * layers * q * 4096


def test_tensor_parallel_limits_apply():
    with pytest.raises(ConfigError) as info:
        validate(compose(["model=qwen3_tiny", "parallel.tp=3"]), 3)
    assert info.value.key == "parallel.tp"


# -- equivalence with transformers ---------------------------------------------------------------

SEQ_LEN = 48
# Heads of 32 on a width of 64: the query width (128) is twice the model width, as in
# Qwen3-0.6B. A larger init std than training's 0.02 so that attention is far from uniform.
SMALL = Qwen3Args(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, vocab_size=128,
                  ffn_hidden_dim=160, max_seq_len=64, init_std=0.2, rope_theta=10000.0)
CASES = {
    "gqa": SMALL,
    "gqa_tied": dataclasses.replace(SMALL, tie_embeddings=True),
    # Qwen3's own rope_theta and eps, multi-head, heads a split of the width.
    "mha_qwen_rope": dataclasses.replace(SMALL, n_kv_heads=None, head_dim=16,
                                         rope_theta=1e6),
}

# The Hugging Face names of trntrain's parameters, spelt out here rather than taken from
# the family's adapter, which is tested against this.
HF_MODULES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "attention.q_norm": "self_attn.q_norm", "attention.k_norm": "self_attn.k_norm",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
HF_TOP_LEVEL = {"tok_embeddings.weight": "model.embed_tokens.weight",
                "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def hf_name(name: str) -> str:
    if name in HF_TOP_LEVEL:
        return HF_TOP_LEVEL[name]
    _, index, rest = name.split(".", 2)
    return f"model.layers.{index}.{HF_MODULES[rest.removesuffix('.weight')]}.weight"


def hf_rope_fields(theta: float) -> dict:
    """rope_theta in the spelling of the installed transformers (5.x or 4.x)."""
    if int(transformers.__version__.split(".")[0]) >= 5:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    return {"rope_theta": theta}


def hf_model(args: Qwen3Args) -> Qwen3ForCausalLM:
    config = Qwen3Config(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
        num_key_value_heads=args.kv_heads, head_dim=args.head_dim, rms_norm_eps=args.norm_eps,
        max_position_embeddings=args.max_seq_len, tie_word_embeddings=args.tie_embeddings,
        attn_implementation="eager", **hf_rope_fields(args.rope_theta))
    return Qwen3ForCausalLM(config).float().eval()


@torch.no_grad()
def initialised(args: Qwen3Args, seed: int = 0) -> Qwen3:
    model = Qwen3(args)
    model.init_weights(seed)
    # Norm weights start at one; moved away from it, a norm applied to the wrong tensor
    # (q's to k, or none at all) changes the logits.
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def hf_copy(model: Qwen3) -> Qwen3ForCausalLM:
    """A transformers model holding the weights of `model`; every HF weight is covered."""
    reference = hf_model(model.args)
    reference.load_state_dict({hf_name(n): t for n, t in model.state_dict().items()},
                              strict=True)
    return reference


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_gradients_match_transformers(case):
    model = initialised(CASES[case])
    reference = hf_copy(model)
    tokens = torch.randint(0, model.args.vocab_size, (2, SEQ_LEN + 1),
                           generator=torch.Generator().manual_seed(1234))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    logits = model(inputs)
    expected = reference(input_ids=inputs).logits
    # rtol 1e-4 as for Llama: inverse frequencies are computed in float64 here and
    # float32 there (an ulp apart).
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)

    next_token_loss(logits, targets).backward()
    next_token_loss(expected, targets).backward()
    hf_params = dict(reference.named_parameters(remove_duplicate=False))
    names = [name for name, _ in model.named_parameters()]
    assert "layers.0.attention.q_norm.weight" in names
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, hf_params[hf_name(name)].grad,
                                   atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_qk_norm_weights_shape_the_logits():
    """The equivalence above would not notice QK-norm missing on both sides."""
    model = initialised(SMALL)
    inputs = torch.randint(0, SMALL.vocab_size, (2, SEQ_LEN))
    with torch.no_grad():
        before = model(inputs)
        model.layers["0"].attention.k_norm.weight.mul_(2.0)
        assert (model(inputs) - before).abs().max() > 1e-2


def test_adapter_names_every_parameter_as_transformers_does():
    model = initialised(CASES["gqa"])
    to_hf_name = family_of(compose(["model=qwen3_tiny"]).model).hf.to_hf_name
    hf_names = set(hf_copy(model).state_dict())
    for name, _ in model.named_parameters():
        assert to_hf_name(name) == hf_name(name) and hf_name(name) in hf_names


def test_tied_embeddings_survive_a_meta_build():
    cfg = compose(["model=qwen3_tiny"]).model
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device="cpu")
    model.init_weights(0)
    assert model.output.weight is model.tok_embeddings.weight
    norms = [p for n, p in model.named_parameters() if n.endswith(("q_norm.weight",
                                                                   "k_norm.weight"))]
    assert len(norms) == 2 * cfg.n_layers
    assert all(torch.equal(p, torch.ones(cfg.head_dim)) for p in norms)


# -- Hugging Face config.json both ways -----------------------------------------------------------


def test_config_json_round_trips_through_transformers(tmp_path):
    """trntrain's config.json builds, in transformers, the model trntrain counts; read back
    (as `trntrain convert` does), it gives the model config again."""
    import json

    cfg = compose(["model=qwen3_0_6b"]).model
    family = family_of(cfg)
    written = family.hf.hf_config(cfg, torch.bfloat16)
    (tmp_path / "config.json").write_text(json.dumps(written))
    loaded = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is Qwen3Config and loaded.head_dim == 128
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(loaded)
    assert type(reference) is Qwen3ForCausalLM
    assert sum(p.numel() for p in reference.parameters()) == PUBLISHED["qwen3_0_6b"][-1]
    # What transformers writes back (rope_parameters in 5.x) reads as the same model.
    loaded.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert family_for_hf(again["model_type"]) is family
    back = family.hf.model_config(again)
    for key in ("family", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size",
                "ffn_hidden_dim", "norm_eps", "rope_theta", "max_seq_len", "tie_embeddings"):
        assert back[key] == cfg[key], key


def test_head_dim_left_out_of_config_json_is_qwen3s_default():
    cfg = compose(["model=qwen3_8b"]).model
    written = family_of(cfg).hf.hf_config(cfg, torch.bfloat16)
    del written["head_dim"]
    assert family_of(cfg).hf.model_config(written).head_dim == 128


@pytest.mark.parametrize(("change", "named"), [
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
])
def test_qwen3_variants_the_model_lacks_are_refused(change, named):
    cfg = compose(["model=qwen3_0_6b"]).model
    written = {**family_of(cfg).hf.hf_config(cfg, torch.bfloat16), **change}
    with pytest.raises(UserError, match=named):
        family_of(cfg).hf.model_config(written)


# -- the planner's activations -------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("head_dim", [32, 16])
def test_qk_norm_activations_are_what_the_norms_save(precision, head_dim):
    """What a Qwen3 block saves beyond a Llama block of the same size (q width, heads, kv
    heads) is the q and k norms' fp32 inputs, fp32 1/rms per head and normalised values:
    Qwen3's `qk_norm_activations`, and the difference of the two families' layers."""
    from tests.unit.test_plan import block_saved_bytes
    from trntrain.models.family import ActivationSpec
    from trntrain.models.qwen3.costs import qk_norm_activations

    seq = 64
    cfg = compose(["model=qwen3_tiny", f"model.head_dim={head_dim}", f"train.seq_len={seq}",
                   f"train.precision={precision}"])
    extra = block_saved_bytes(cfg) - block_saved_bytes(cfg, block_args={"family": "llama"})
    e = 2 if precision == "bf16" else 4
    spec = ActivationSpec(tp=1, sequence_parallel=False, element_bytes=e, seq_len=seq,
                          fused_attention=True)
    m = cfg.model
    q, k = m.n_heads * head_dim, m.n_kv_heads * head_dim
    by_hand = sum(4 * w + 4 * w // head_dim + e * w for w in (q, k))
    assert qk_norm_activations(m, spec) == by_hand
    assert extra == by_hand * seq
    same_size_llama = m.copy()
    same_size_llama.family = "llama"
    qwen3_layer = family_of(m).layer_activations(m, spec)
    llama_layer = family_of(same_size_llama).layer_activations(same_size_llama, spec)
    assert qwen3_layer.saved - llama_layer.saved == by_hand
    assert qwen3_layer.selective - llama_layer.selective == by_hand  # outside the core
    assert qwen3_layer.checkpointed == llama_layer.checkpointed
    assert qwen3_layer.selective_recompute == llama_layer.selective_recompute


def test_families_bring_their_activation_models():
    """Qwen3's bundle has its own; Llama's is the default, which is Llama's costs."""
    from trntrain.models.family import ActivationSpec, llama_layer_activations
    from trntrain.models.llama import costs as llama_costs
    from trntrain.models.qwen3 import costs as qwen3_costs

    qwen3, llama = (compose([f"model={n}"]).model for n in ("qwen3_tiny", "llama_tiny"))
    assert family_of(qwen3).layer_activations is qwen3_costs.layer_activations
    assert family_of(llama).layer_activations is llama_layer_activations
    spec = ActivationSpec(tp=2, sequence_parallel=True, element_bytes=2, seq_len=128,
                          fused_attention=False)
    assert llama_layer_activations(llama, spec) == llama_costs.layer_activations(llama, spec)


@pytest.mark.parametrize(("overrides", "rel"), [
    ((), 1e-3),
    (("parallel.activation_checkpointing=selective",), 1e-3),
    (("parallel.activation_checkpointing=full",), 1e-3),
    # bf16: Llama's accounting counts the rotary tables' bf16 casts per token; they are
    # per position (shared by a micro-batch's rows): +2.3 % here.
    (("train.precision=bf16",), 0.03),
])
def test_planner_activations_match_the_trainer(overrides, rel):
    """qwen3_tiny's saved activations as the trainer measures them (`ActivationMemory`)
    against the planner's; before the q and k norms were counted: 84 % (82 % in bf16)."""
    from tests.conftest import tiny_config
    from tests.unit.test_plan import MEASURE, measure
    from trntrain.plan.layout import layout_from_config
    from trntrain.plan.memory import stage_memory

    overrides = ("model=qwen3_tiny", *overrides)
    got = measure(0, 1, overrides)["activations"]
    cfg = tiny_config(*MEASURE, *overrides)
    model = stage_memory(cfg, layout_from_config(cfg, 1), 0)["activations"]
    assert model == pytest.approx(got, rel=rel)
