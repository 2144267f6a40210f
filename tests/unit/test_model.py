"""The Llama model against published parameter counts and Hugging Face's implementation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from trntrain.config import compose
from trntrain.models import build_model, count_parameters
from trntrain.models.llama import Llama, LlamaArgs, RopeScaling

# -- parameter counts ---------------------------------------------------------------------------

# Counts of the Hugging Face checkpoints. By hand, with V vocab, d dim, L layers, f ffn dim,
# kv = n_kv_heads * head_dim: 2Vd (embeddings + untied head) + d (final norm)
# + L * (2d^2 + 2d*kv (q, o, k, v) + 3df (SwiGLU) + 2d (norms)). E.g. llama2_7b:
# 2*32000*4096 + 4096 + 32 * (4*4096^2 + 3*4096*11008 + 2*4096) = 6,738,415,616.
PUBLISHED_PARAMETERS = {
    "llama2_7b": 6_738_415_616,
    "llama2_13b": 13_015_864_320,
    "llama2_70b": 68_976_648_192,
    "llama3_2_1b": 1_235_814_400,
    "llama3_8b": 8_030_261_248,
    "llama3_70b": 70_553_706_496,
    "llama3_405b": 405_853_388_800,
    "mistral_7b": 7_241_732_096,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_parameter_count_matches_published(name: str) -> None:
    with torch.device("meta"):
        model = build_model(compose([f"model={name}"]).model)
    assert count_parameters(model) == PUBLISHED_PARAMETERS[name]


# -- equivalence with Hugging Face ---------------------------------------------------------------

SEQ_LEN = 48
# A larger init std than training's 0.02 so that attention is far from uniform and the
# positions (hence rope) visibly shape the logits.
SMALL = LlamaArgs(dim=64, n_layers=2, n_heads=4, vocab_size=128, ffn_hidden_dim=160,
                  max_seq_len=64, init_std=0.2)
# Scaling with a short original context: at head_dim 16 and theta 5e5 one frequency is
# smoothed and the rest are divided by `factor` (wavelengths 6.3, 32, 167, ... vs 4 and 16).
LLAMA31_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=16)

CASES = {
    "mha": SMALL,
    "gqa": dataclasses.replace(SMALL, n_kv_heads=2),
    "tied": dataclasses.replace(SMALL, tie_embeddings=True),
    "llama31_rope": dataclasses.replace(SMALL, n_kv_heads=2, rope_theta=500000.0,
                                        rope_scaling=LLAMA31_ROPE),
}

HF_LAYER_MODULES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
HF_TOP_LEVEL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(name: str) -> str:
    """The Hugging Face name of a trntrain parameter, e.g. layers.0.attention.wq.weight."""
    if name in HF_TOP_LEVEL:
        return HF_TOP_LEVEL[name]
    _, index, rest = name.split(".", 2)
    module = rest.removesuffix(".weight")
    return f"model.layers.{index}.{HF_LAYER_MODULES[module]}.weight"


def hf_rope_fields(args: LlamaArgs) -> dict:
    """Rope settings in the spelling of the installed transformers (5.x or 4.x)."""
    scaling = {}
    if args.rope_scaling is not None:
        scaling = {"rope_type": "llama3", **dataclasses.asdict(args.rope_scaling)}
    if int(transformers.__version__.split(".")[0]) >= 5:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta,
                                    **scaling}}
    return {"rope_theta": args.rope_theta, "rope_scaling": scaling or None}


def hf_model(args: LlamaArgs) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.kv_heads,
        rms_norm_eps=args.norm_eps,
        max_position_embeddings=args.max_seq_len,
        tie_word_embeddings=args.tie_embeddings,
        attn_implementation="eager",
        **hf_rope_fields(args),
    )
    return LlamaForCausalLM(config).float().eval()


def initialised(args: LlamaArgs, seed: int = 0) -> Llama:
    model = Llama(args)
    model.init_weights(seed)
    return model


def hf_copy(model: Llama) -> LlamaForCausalLM:
    """A Hugging Face model holding the weights of `model`; every HF weight is covered."""
    reference = hf_model(model.args)
    state = {hf_name(name): tensor for name, tensor in model.state_dict().items()}
    reference.load_state_dict(state, strict=True)
    return reference


def sample_tokens(args: LlamaArgs, seq_len: int = SEQ_LEN) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, args.vocab_size, (2, seq_len + 1), generator=gen)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_gradients_match_hugging_face(case: str) -> None:
    model = initialised(CASES[case])
    reference = hf_copy(model)
    tokens = sample_tokens(model.args)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    logits = model(inputs)
    expected = reference(input_ids=inputs).logits
    # Logits reach ~7; rtol 1e-4 allows for inverse frequencies computed in float64 here and
    # float32 there (an ulp apart, so angles differ by ~4e-6 at position 47).
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)

    next_token_loss(logits, targets).backward()
    next_token_loss(expected, targets).backward()
    hf_params = dict(reference.named_parameters(remove_duplicate=False))
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, hf_params[hf_name(name)].grad,
                                   atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("case", ["mha", "llama31_rope"])
def test_rope_tables_match_hugging_face(case: str) -> None:
    model = initialised(CASES[case])
    positions = torch.arange(model.args.max_seq_len)[None]
    probe = torch.zeros(1, model.args.max_seq_len, model.args.dim)
    cos, sin = hf_copy(model).model.rotary_emb(probe, positions)
    torch.testing.assert_close(model.rope_cos, cos[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(model.rope_sin, sin[0], atol=1e-5, rtol=0)


def test_rope_scaling_case_changes_the_logits() -> None:
    """The Llama-3.1 case would not tell a correct scaling from none at all otherwise."""
    scaled = CASES["llama31_rope"]
    with_scaling = initialised(scaled)
    without = initialised(dataclasses.replace(scaled, rope_scaling=None))
    inputs = sample_tokens(scaled)[:, :-1]
    with torch.no_grad():
        difference = (with_scaling(inputs) - without(inputs)).abs().max()
    assert difference > 1e-2


def test_tied_embeddings_share_one_tensor() -> None:
    tied = initialised(CASES["tied"])
    untied = initialised(SMALL)
    assert tied.output.weight is tied.tok_embeddings.weight
    assert count_parameters(untied) - count_parameters(tied) == SMALL.vocab_size * SMALL.dim


# -- deterministic initialisation ----------------------------------------------------------------


def parameters_of(model: Llama) -> dict[str, torch.Tensor]:
    return {name: param.detach() for name, param in model.named_parameters()}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_same_seed_gives_same_weights() -> None:
    args = CASES["gqa"]
    assert_same_tensors(parameters_of(initialised(args, seed=7)),
                        parameters_of(initialised(args, seed=7)))


def test_different_seed_gives_different_weights() -> None:
    args = CASES["gqa"]
    first, second = parameters_of(initialised(args, seed=7)), parameters_of(initialised(args, 8))
    random_names = [name for name in first if not name.endswith("norm.weight")]
    assert len(random_names) == 2 + 7 * args.n_layers
    for name in random_names:
        assert not torch.equal(first[name], second[name]), name


def residual_std(args: LlamaArgs) -> float:
    return args.init_std / math.sqrt(2 * args.n_layers)


def is_residual_projection(name: str) -> bool:
    return name.endswith(("wo.weight", "w2.weight"))


def test_init_std_by_parameter_kind() -> None:
    args = dataclasses.replace(SMALL, dim=256, ffn_hidden_dim=512, n_layers=4, init_std=0.02)
    for name, param in parameters_of(initialised(args)).items():
        if name.endswith("norm.weight"):
            assert torch.equal(param, torch.ones_like(param)), name
            continue
        std = residual_std(args) if is_residual_projection(name) else args.init_std
        assert param.std().item() == pytest.approx(std, rel=0.05), name
        assert abs(param.mean().item()) < 0.05 * std, name


def test_parameter_values_do_not_depend_on_the_rest_of_the_model() -> None:
    """Layers 0 and 1 of a 2- and a 3-layer model from one seed hold the same draws.

    Residual projections (wo, w2) are drawn with a std scaled by the depth, so there the
    draws agree once divided by each model's std.
    """
    shallow_args = CASES["gqa"]
    deep_args = dataclasses.replace(shallow_args, n_layers=3)
    shallow = parameters_of(initialised(shallow_args, seed=3))
    deep = parameters_of(initialised(deep_args, seed=3))
    assert shallow.keys() < deep.keys()
    for name, value in shallow.items():
        if is_residual_projection(name):
            torch.testing.assert_close(value / residual_std(shallow_args),
                                       deep[name] / residual_std(deep_args))
            assert not torch.equal(value, deep[name])
        else:
            assert torch.equal(value, deep[name]), name


# -- meta-device construction --------------------------------------------------------------------


def built_on_meta(args: LlamaArgs, seed: int) -> Llama:
    with torch.device("meta"):
        model = Llama(args)
    model.to_empty(device="cpu")
    model.init_weights(seed)
    return model


def all_tensors(model: Llama) -> dict[str, torch.Tensor]:
    """Parameters and buffers, the non-persistent rope buffers included."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    return {name: tensor.detach() for name, tensor in tensors.items()}


def test_meta_build_equals_cpu_build() -> None:
    args = CASES["llama31_rope"]
    on_meta = all_tensors(built_on_meta(args, seed=5))
    on_cpu = all_tensors(initialised(args, seed=5))
    assert {"rope_cos", "rope_sin"} <= on_meta.keys()
    assert_same_tensors(on_meta, on_cpu)


def test_meta_build_keeps_embeddings_tied() -> None:
    model = built_on_meta(CASES["tied"], seed=5)
    assert model.output.weight is model.tok_embeddings.weight
    assert_same_tensors(all_tensors(model), all_tensors(initialised(CASES["tied"], seed=5)))
