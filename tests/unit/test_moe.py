"""The MoE families against transformers' MixtralForCausalLM and Qwen3MoeForCausalLM:
parameter counts (total, active) of the published sizes, logits, gradients and the
auxiliary losses on the same weights, the capacity rule against a token-by-token
reference, and Hugging Face export and import."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from tests.conftest import tiny_config
from trntrain.config import ConfigError, compose, validate
from trntrain.distributed import World
from trntrain.models import build_model, count_parameters, family_for_hf, family_of
from trntrain.models.mixtral import Mixtral, MixtralArgs
from trntrain.models.moe import MoE, moe_modules
from trntrain.models.moe_costs import parameter_counts
from trntrain.models.qwen3_moe import Qwen3Moe, Qwen3MoeArgs
from trntrain.trainer import Trainer

# -- sizes ---------------------------------------------------------------------------------------

# Published totals and active parameters, in the precision the model cards give them
# (Mixtral: 46.7 B / 12.9 B, 141 B / 39 B; Qwen3: 30.5 B / 3.3 B, 235 B / 22 B), and that
# precision. The exact totals are transformers' count of the published config.json.
PUBLISHED = {
    "mixtral_8x7b": (46.7e9, 12.9e9, 0.1e9),
    "mixtral_8x22b": (141e9, 39e9, 1e9),
    "qwen3_30b_a3b": (30.5e9, 3.3e9, 0.1e9),
    "qwen3_235b_a22b": (235e9, 22e9, 1e9),
}


def hf_rope(theta: float) -> dict:
    if int(transformers.__version__.split(".")[0]) >= 5:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    return {"rope_theta": theta}


def hf_config_of(m) -> transformers.PretrainedConfig:
    """The transformers config of a trntrain model config or args, spelt out here."""
    common = dict(vocab_size=m.vocab_size, hidden_size=m.dim, num_hidden_layers=m.n_layers,
                  num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
                  max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
                  tie_word_embeddings=m.tie_embeddings, num_experts_per_tok=m.top_k,
                  router_aux_loss_coef=m.router_aux_loss_coef, output_router_logits=True,
                  attn_implementation="eager", **hf_rope(m.rope_theta))
    if isinstance(m, MixtralArgs) or getattr(m, "family", None) == "mixtral":
        return MixtralConfig(intermediate_size=m.ffn_hidden_dim, num_local_experts=m.num_experts,
                             **common)
    return Qwen3MoeConfig(intermediate_size=m.ffn_hidden_dim, head_dim=m.head_dim,
                          moe_intermediate_size=m.moe_ffn_hidden_dim,
                          num_experts=m.num_experts, norm_topk_prob=m.norm_topk_prob,
                          decoder_sparse_step=1, mlp_only_layers=[], **common)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_equal_transformers_and_published(name):
    model_cfg = compose([f"model={name}"]).model
    family = family_of(model_cfg)
    with torch.device("meta"):
        reference = transformers.AutoModelForCausalLM.from_config(hf_config_of(model_cfg))
        # Qwen3-MoE's 128 experts x 94 layers are modules of their own here: built only
        # for the smaller model (the planner's count, checked below, builds nothing).
        if model_cfg.num_experts * model_cfg.n_layers <= 8 * 56:
            assert count_parameters(build_model(model_cfg)) == sum(
                p.numel() for p in reference.parameters())
    hf_total = sum(p.numel() for p in reference.parameters())
    total, active = parameter_counts(model_cfg, family.layer_params)
    assert hf_total == total
    # Active: the whole model less the experts a token does not run.
    expert = 3 * model_cfg.dim * (model_cfg.moe_ffn_hidden_dim or model_cfg.ffn_hidden_dim)
    idle = model_cfg.n_layers * (model_cfg.num_experts - model_cfg.top_k) * expert
    assert active == hf_total - idle
    published_total, published_active, precision = PUBLISHED[name]
    # Within the last digit the cards give (rounded or truncated).
    assert abs(total - published_total) < precision
    assert abs(active - published_active) < precision


@pytest.mark.parametrize("name", ["mixtral_tiny", "qwen3_moe_tiny"])
def test_planner_layer_follows_the_module_order(name):
    cfg = compose([f"model={name}"]).model
    with torch.device("meta"):
        model = build_model(cfg)
    assert ([p.numel() for _, p in model.layers["0"].named_parameters()]
            == [p.numel for p in family_of(cfg).layer_params(cfg, 1)])
    assert count_parameters(model) == parameter_counts(cfg, family_of(cfg).layer_params)[0]


@pytest.mark.parametrize("name", ["mixtral_8x7b", "qwen3_30b_a3b"])
def test_flops_count_active_parameters(name):
    m = compose([f"model={name}"]).model
    _, active = parameter_counts(m, family_of(m).layer_params)
    # The active matmul parameters: all active ones but the embedding lookup and the norms.
    norms = m.n_layers * sum(p.numel for p in family_of(m).layer_params(m, 1) if not p.matrix)
    matmul = active - m.vocab_size * m.dim - norms - m.dim
    q = m.n_heads * (m.head_dim or m.dim // m.n_heads)
    assert family_of(m).flops_per_token(m, 4096) == 6 * matmul + 12 * m.n_layers * q * 4096


# -- equivalence with transformers ---------------------------------------------------------------

SEQ = 24
MIXTRAL = MixtralArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64,
                      ffn_hidden_dim=48, max_seq_len=64, init_std=0.2, num_experts=4, top_k=2,
                      router_aux_loss_coef=0.05)
QWEN = Qwen3MoeArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=64,
                    ffn_hidden_dim=80, moe_ffn_hidden_dim=24, max_seq_len=64, init_std=0.2,
                    num_experts=6, top_k=3, norm_topk_prob=True, rope_theta=10000.0,
                    router_aux_loss_coef=0.05)
CASES = {
    "mixtral": MIXTRAL,
    "qwen3_moe": QWEN,
    # Qwen3-MoE's un-normalised top-k weights.
    "qwen3_moe_raw_topk": dataclasses.replace(QWEN, norm_topk_prob=False),
}


def build(args) -> torch.nn.Module:
    model = (Mixtral if isinstance(args, MixtralArgs) else Qwen3Moe)(args)
    model.init_weights(0)
    with torch.no_grad():  # norms away from one, so that a misplaced one shows
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


ATTENTION = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
             "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
             "attention.q_norm": "self_attn.q_norm", "attention.k_norm": "self_attn.k_norm",
             "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "feed_forward.gate": "mlp.gate"}


def hf_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """transformers 5's module layout of our weights: the experts fused per layer into
    gate_up_proj (E, 2f, dim: w1 then w3) and down_proj (E, dim, f)."""
    state, args = {}, model.args
    state["model.embed_tokens.weight"] = model.tok_embeddings.weight
    state["model.norm.weight"] = model.norm.weight
    state["lm_head.weight"] = model.output.weight
    for i, layer in model.layers.items():
        for name, p in layer.named_parameters():
            module = name.removesuffix(".weight")
            if module in ATTENTION:
                state[f"model.layers.{i}.{ATTENTION[module]}.weight"] = p
        experts = [layer.feed_forward.experts[str(e)] for e in range(args.num_experts)]
        state[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([e.w1.weight, e.w3.weight]) for e in experts])
        state[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(
            [e.w2.weight for e in experts])
    return {k: v.detach().clone() for k, v in state.items()}


def hf_copy(model: torch.nn.Module) -> torch.nn.Module:
    config = hf_config_of(model.args)
    reference = (MixtralForCausalLM if isinstance(config, MixtralConfig)
                 else Qwen3MoeForCausalLM)(config).float().eval()
    reference.load_state_dict(hf_state(model), strict=True)
    return reference


def our_gradients_in_hf_layout(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {}
    for i, layer in model.layers.items():
        experts = [layer.feed_forward.experts[str(e)] for e in range(model.args.num_experts)]
        grads[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([e.w1.weight.grad, e.w3.weight.grad]) for e in experts])
        grads[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(
            [e.w2.weight.grad for e in experts])
        for name, p in layer.named_parameters():
            module = name.removesuffix(".weight")
            if module in ATTENTION:
                grads[f"model.layers.{i}.{ATTENTION[module]}.weight"] = p.grad
    grads["model.embed_tokens.weight"] = model.tok_embeddings.weight.grad
    grads["lm_head.weight"] = model.output.weight.grad
    grads["model.norm.weight"] = model.norm.weight.grad
    return grads


def assert_gradients_equal_transformers(model: torch.nn.Module,
                                        reference: torch.nn.Module) -> None:
    """Every gradient of `model` equals that of the same weight in `reference`."""
    hf_params = dict(reference.named_parameters())
    grads = our_gradients_in_hf_layout(model)
    assert set(grads) == set(hf_params)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, hf_params[name].grad, atol=1e-5, rtol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")


def tokens(vocab: int, rows: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.randint(0, vocab, (rows, SEQ + 1), generator=torch.Generator().manual_seed(7))
    return t[:, :-1], t[:, 1:]


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_gradients_and_aux_loss_match_transformers(case):
    """Logits, gradients of cross-entropy plus the load-balancing loss, and each layer's
    load-balancing loss (transformers' `load_balancing_loss_func` on that layer's router
    logits; trntrain's is the mean of the layers', see trntrain/models/moe.py)."""
    model = build(CASES[case])
    reference = hf_copy(model)
    inputs, targets = tokens(model.args.vocab_size)
    logits = model(inputs)
    out = reference(input_ids=inputs)
    torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=1e-4)

    a = model.args
    per_layer = [load_balancing_loss_func((r,), a.num_experts, a.top_k)
                 for r in out.router_logits]
    ours = [m.stats.lb_loss for m in moe_modules(model)]
    for mine, theirs in zip(ours, per_layer, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-5)

    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    expected = (F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())
                + a.router_aux_loss_coef * torch.stack(per_layer).mean())
    expected.backward()
    assert_gradients_equal_transformers(model, reference)


@pytest.mark.parametrize("case", ["mixtral", "qwen3_moe"])
def test_one_layer_loss_equals_transformers_loss_with_its_aux_loss(case):
    """On one layer the two definitions of the load-balancing loss coincide: transformers'
    `aux_loss` and its loss (cross-entropy + coef x aux) and their gradients."""
    args = dataclasses.replace(CASES[case], n_layers=1)
    model = build(args)
    reference = hf_copy(model)
    inputs, _ = tokens(args.vocab_size)
    out = reference(input_ids=inputs, labels=inputs)  # transformers shifts the labels
    logits = model(inputs)
    torch.testing.assert_close(moe_modules(model)[0].stats.lb_loss, out.aux_loss,
                               atol=1e-6, rtol=1e-5)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), inputs[:, 1:].flatten()).backward()
    out.loss.backward()
    assert_gradients_equal_transformers(model, reference)


@pytest.mark.parametrize("case", ["mixtral", "qwen3_moe"])
def test_global_pooling_gives_transformers_loss_gradients_on_several_layers(case):
    """model.router_aux_loss_pooling=global: the gradients of transformers' loss
    (cross-entropy + coef x aux_loss, the routing of all layers pooled) on three layers,
    where the pooled loss differs from the mean of the layers' losses."""
    args = dataclasses.replace(CASES[case], n_layers=3, router_aux_loss_pooling="global")
    model = build(args)
    reference = hf_copy(model)
    inputs, _ = tokens(args.vocab_size)
    out = reference(input_ids=inputs, labels=inputs)
    logits = model(inputs)
    with torch.no_grad():  # a forward no backward follows (evaluation) leaves the pool alone
        model(tokens(args.vocab_size, rows=3)[0])
    layers_mean = torch.stack([
        load_balancing_loss_func((r,), args.num_experts, args.top_k) for r in out.router_logits
    ]).mean()
    assert abs(layers_mean - out.aux_loss) > 1e-4  # the two definitions differ here
    F.cross_entropy(logits[:, :-1].flatten(0, 1), inputs[:, 1:].flatten()).backward()
    out.loss.backward()
    assert_gradients_equal_transformers(model, reference)


def test_global_pooling_under_activation_checkpointing_and_micro_batches(one_thread):
    """Each micro-batch's forward rewrites the pool, and so does the recomputation of a
    checkpointed block: the trainer's gradients over two micro-batches with full
    activation checkpointing are those of transformers' loss on each micro-batch
    (cross-entropy over the step's tokens + coef x aux_loss / micro-batches)."""
    trainer = Trainer(tiny_config(
        "model=mixtral_tiny", "model.n_layers=3", "model.router_aux_loss_coef=0.1",
        "model.router_aux_loss_pooling=global", "train.max_steps=1",
        "train.micro_batch_size=4", "parallel.activation_checkpointing=full"), World())
    reference = hf_copy(trainer.model)
    micro_batches = trainer.train_batches.step(0)
    assert len(micro_batches) == 2
    trainer.forward_backward(micro_batches)
    tokens = sum(b.labels.numel() for b in micro_batches)
    for batch in micro_batches:
        out = reference(input_ids=batch.inputs)
        ce = F.cross_entropy(out.logits.flatten(0, 1), batch.labels.flatten(), reduction="sum")
        (ce / tokens + reference.config.router_aux_loss_coef * out.aux_loss / 2).backward()
    assert_gradients_equal_transformers(trainer.model, reference)


def test_z_loss_is_the_mean_squared_logsumexp_of_the_router_logits():
    args = dataclasses.replace(MIXTRAL, router_aux_loss_coef=0.0, router_z_loss_coef=0.1)
    model = build(args)
    reference = hf_copy(model)
    inputs, _ = tokens(args.vocab_size)
    logits = model(inputs)
    router_logits = reference(input_ids=inputs).router_logits
    for block, r in zip(moe_modules(model), router_logits, strict=True):
        torch.testing.assert_close(block.stats.z_loss, torch.logsumexp(r, -1).pow(2).mean())
    # Its gradient reaches the router: 0.1 x the mean over layers.
    logits.sum().backward()
    gate = model.layers["0"].feed_forward.gate.weight
    expected_gate = torch.autograd.grad(
        0.1 * torch.stack([torch.logsumexp(r, -1).pow(2).mean()
                           for r in reference(input_ids=inputs).router_logits]).mean()
        + reference(input_ids=inputs).logits.sum(),
        reference.model.layers[0].mlp.gate.weight)[0]
    torch.testing.assert_close(gate.grad, expected_gate, atol=1e-5, rtol=1e-4)


# -- capacity ------------------------------------------------------------------------------------


def capacity_reference(block: MoE, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Token by token: first choices of every token (in token order), then second ones...;
    an expert takes ceil(c x tokens x k / E) of them, the rest contribute nothing."""
    probs = F.softmax(block.gate(x).float(), -1)
    weights, chosen = torch.topk(probs, block.top_k, -1)
    if block.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    cap = math.ceil(block.capacity_factor * x.shape[0] * block.top_k / block.num_experts)
    taken = [0] * block.num_experts
    out = torch.zeros_like(x)
    dropped = 0
    for slot in range(block.top_k):
        for t in range(x.shape[0]):
            e = int(chosen[t, slot])
            if taken[e] >= cap:
                dropped += 1
                continue
            taken[e] += 1
            out[t] += weights[t, slot] * block.experts[str(e)](x[t:t + 1])[0]
    return out, dropped


@pytest.mark.parametrize("factor", [0.5, 1.0, 1.25])
def test_capacity_keeps_the_first_assignments_and_drops_the_rest(factor):
    torch.manual_seed(0)
    block = MoE(16, 24, num_experts=4, top_k=2, capacity_factor=factor)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(2, 20, 16)
    out = block(x)
    expected, dropped = capacity_reference(block, x.reshape(-1, 16))
    torch.testing.assert_close(out.reshape(-1, 16), expected, atol=1e-5, rtol=1e-5)
    assert int(block.stats.dropped) == dropped
    if factor < 1:
        assert dropped > 0


def test_capacity_large_enough_equals_dropless():
    """With a capacity of every assignment (c = E / k) nothing is dropped."""
    torch.manual_seed(0)
    dropless = MoE(16, 24, num_experts=4, top_k=2)
    capped = MoE(16, 24, num_experts=4, top_k=2, capacity_factor=2.0)
    capped.load_state_dict(dropless.state_dict())
    x = torch.randn(3, 10, 16, requires_grad=True)
    torch.testing.assert_close(capped(x), dropless(x), atol=1e-6, rtol=1e-5)
    assert int(capped.stats.dropped) == 0


# -- Hugging Face export and import --------------------------------------------------------------


@pytest.mark.parametrize("name", ["mixtral_tiny", "qwen3_moe_tiny"])
def test_export_loads_in_transformers_with_equal_logits_and_imports_back(name, tmp_path):
    from tests.conftest import tiny_config
    from trntrain.checkpoint.hf import load_hf_weights
    from trntrain.distributed import World
    from trntrain.trainer import Trainer

    cfg = tiny_config(f"model={name}", "checkpoint=hf", f"run.dir={tmp_path / 'run'}",
                      "train.max_steps=1")
    trainer = Trainer(cfg, World(), tmp_path / "run")
    trainer.fit()
    exported = sorted((tmp_path / "run").rglob("config.json"))[-1].parent
    written = json.loads((exported / "config.json").read_text())
    assert family_for_hf(written["model_type"]) is family_of(cfg.model)
    reference = transformers.AutoModelForCausalLM.from_pretrained(exported).float().eval()
    inputs, _ = tokens(cfg.model.vocab_size)
    model = trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), reference(input_ids=inputs).logits,
                                   atol=1e-5, rtol=1e-4)
    back = family_of(cfg.model).hf.model_config(written)
    for key in ("family", "dim", "n_layers", "num_experts", "top_k", "norm_topk_prob",
                "vocab_size", "n_kv_heads"):
        assert back[key] == cfg.model[key], key
    # Imported into a fresh model of that config: the same weights.
    with torch.device("meta"):
        fresh = build_model(cfg.model)
    fresh.to_empty(device="cpu")
    fresh.init_weights(99)
    load_hf_weights(exported, [fresh], cfg.model)
    for (n, p), (_, q) in zip(fresh.named_parameters(), model.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=n)


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "world", "key"), [
    (["model=mixtral_tiny", "model.top_k=9"], 1, "model.top_k"),
    (["model=mixtral_tiny", "parallel.ep=3"], 3, "parallel.ep"),
    (["model=mixtral_tiny", "parallel.ep=2"], 4 * 1, None),
    (["model=mixtral_tiny", "parallel.ep=4", "parallel.tp=2"], 4, "parallel.ep"),
    (["model=qwen3_moe_tiny", "model.num_experts=6", "parallel.ep=4"], 4, "parallel.ep"),
    (["model=mixtral_tiny", "backend.name=xla"], 1, "model.capacity_factor"),
    # On XLA the dispatch runs torch-xla's all-to-all over the ep group's replica groups.
    (["model=mixtral_tiny", "backend.name=xla", "model.capacity_factor=1.25", "parallel.ep=2"],
     2, None),
    (["model=mixtral_tiny", "backend.name=xla", "model.capacity_factor=1.25"], 1, None),
    (["model=llama_tiny", "parallel.ep=2"], 2, "parallel.ep"),
    (["model=llama_tiny", "model.num_experts=4"], 1, "model.num_experts"),
    (["model=mixtral_tiny", "parallel.tp=2", "parallel.sequence_parallel=true"], 2,
     "parallel.sequence_parallel"),
    (["model=mixtral_tiny", "model.capacity_factor=0"], 1, "model.capacity_factor"),
    (["model=mixtral_tiny", "model.router_aux_loss_pooling=all"], 1,
     "model.router_aux_loss_pooling"),
    (["model=mixtral_tiny", "model.router_aux_loss_pooling=global", "parallel.pp=2"], 2,
     "model.router_aux_loss_pooling"),
    (["model=mixtral_tiny", "model.router_aux_loss_pooling=global", "parallel.ep=2"], 2, None),
    (["model=mixtral_tiny", "peft=lora", "peft.allow_random_base=true"], 1, "peft.name"),
])
def test_bad_moe_settings_are_one_clear_line(overrides, world, key):
    cfg = compose(overrides)
    if key is None:
        validate(cfg, world)
        return
    with pytest.raises(ConfigError) as info:
        validate(cfg, world)
    assert info.value.key == key
    assert "\n" not in str(info.value)


# -- the planner ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ep", [1, 2, 8])
def test_planner_holds_num_experts_over_ep_experts_per_rank(ep):
    """Parameters on a rank: the trainer's model with its experts sharded over ep (the
    experts of the other ep ranks dropped as `MoE.shard` does), and ZeRO-1 slices of the
    experts over dp / ep."""
    from trntrain.plan.layout import Layout
    from trntrain.plan.memory import rank_params, sharded_elements

    cfg = compose(["model=mixtral_tiny"]).model
    with torch.device("meta"):
        model = build_model(cfg)
    local = cfg.num_experts // ep
    kept = sum(p.numel() for n, p in model.named_parameters()
               if ".experts." not in n or int(n.split(".experts.")[1].split(".")[0]) < local)
    layout = Layout(tp=1, pp=1, dp=8, sequence_parallel=False, zero1=True,
                    activation_checkpointing="none", schedule="1f1b", virtual_pp=1,
                    microbatches=1, micro_batch_size=1, ep=ep)
    params = rank_params(cfg, layout, 32, 0)
    assert sum(p.numel for p in params) == kept
    expert = sum(p.numel for p in params if p.expert)
    dense = kept - expert
    # One bucket per category here (the tiny model is far below bucket_mb).
    assert sharded_elements(params, 8, 25.0, "fp32", ep) == pytest.approx(
        dense / 8 + expert / (8 // ep), abs=8)


def test_plan_reports_active_parameters_and_the_all_to_all():
    from trntrain.plan import plan_layout
    from trntrain.plan.layout import layout_from_config

    overrides = ["model=mixtral_8x7b", "cluster=trn1_32xlarge", "cluster.nodes=4",
                 "train.seq_len=4096", "train.global_batch_size=128", "train.precision=bf16",
                 "parallel.pp=4", "parallel.activation_checkpointing=full",
                 "parallel.zero1=true", "train.micro_batch_size=1"]
    plans = {ep: plan_layout(compose([*overrides, f"parallel.ep={ep}"]),
                             layout_from_config(compose([*overrides, f"parallel.ep={ep}"]), 128))
             for ep in (1, 4)}
    assert "ep_all_to_all" not in plans[1].time and plans[4].time["ep_all_to_all"] > 0
    # A capacity factor c moves c x top_k rows per token instead of top_k.
    capacity = [*overrides, "parallel.ep=4", "model.capacity_factor=1.25"]
    with_capacity = plan_layout(compose(capacity), layout_from_config(compose(capacity), 128))
    assert with_capacity.time["ep_all_to_all"] == pytest.approx(
        1.25 * plans[4].time["ep_all_to_all"], rel=1e-12)
    assert plans[4].memory["params"] < plans[1].memory["params"] / 2
    # MFU counts the active parameters: the same tokens/s at either ep gives the same MFU.
    m = compose(overrides).model
    _, active = parameter_counts(m, family_of(m).layer_params)
    assert family_of(m).flops_per_token(m, 4096) < 6 * 0.3 * count_total(m)
    assert active < 0.3 * count_total(m)


def count_total(m) -> int:
    return parameter_counts(m, family_of(m).layer_params)[0]
