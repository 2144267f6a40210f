"""The planner (`trntrain.plan`): its formulas against hand computations, its memory
model against what the trainer allocates on CPU, and the layout search's validity."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import run_distributed, tiny_config
from trntrain.config import ConfigError, compose, validate
from trntrain.distributed import World
from trntrain.metrics.flops import flops_per_token, kv_dim
from trntrain.metrics.memory import ActivationMemory
from trntrain.models import build_model, count_parameters
from trntrain.parallel.pipeline import partition_model
from trntrain.plan import fit_warning, plan, plan_layout
from trntrain.plan.layout import Layout, layout_from_config
from trntrain.plan.memory import (
    GIB,
    Param,
    activation_model,
    chunk_layers,
    in_flight_counts,
    rank_params,
    sharded_elements,
    stage_memory,
)
from trntrain.plan.search import search
from trntrain.plan.step_time import group_bandwidth, layer_forward_flops, step_time

MODELS = ["llama_tiny", "llama2_7b", "llama2_13b", "llama2_70b", "llama3_8b", "llama3_70b",
          "llama3_405b", "mistral_7b"]


def layout(**kw) -> Layout:
    base = dict(tp=1, pp=1, dp=1, sequence_parallel=False, zero1=False,
                activation_checkpointing="none", schedule="1f1b", virtual_pp=1, microbatches=1,
                micro_batch_size=1)
    return Layout(**{**base, **kw})


# -- formulas against hand computations ------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_parameter_inventory_counts_every_parameter(name):
    cfg = compose([f"model={name}"])
    with torch.device("meta"):
        expected = count_parameters(build_model(cfg.model))
    assert sum(p.numel for p in rank_params(cfg.model, layout(), 128, 0)) == expected


def test_tensor_parallel_shards_and_replicas_by_hand():
    m = compose(["model=llama3_70b"]).model  # h 8192, 8 kv heads of 128, f 28672
    h, kv, f, v = 8192, 1024, 28672, 128256
    per_layer = lambda tp, kv_rows: 2 * h + 2 * h * h // tp + 2 * kv_rows * h + 3 * f * h // tp  # noqa: E731
    # tp=8 divides the kv heads: k and v sharded; tp=32 exceeds them: replicated whole.
    for tp, kv_rows in ((8, kv // 8), (32, kv)):
        params = rank_params(m, layout(tp=tp, pp=8), 8192, 0)
        layers = sum(p.numel for p in params) - v // tp * h
        assert layers == 10 * per_layer(tp, kv_rows)


def test_sharded_optimizer_pads_each_bucket_to_dp():
    params = [Param(10, True, False), Param(3, False, False), Param(7, True, False)]
    # Buckets by category: matrices 10 + 7 = 17 -> padded 20, 5 per rank; vectors 3 -> 4, 1.
    assert sharded_elements(params, 4, 25.0, "fp32") == 6
    # A bucket limit of 12 elements (48 bytes) splits the matrices: 10 -> 12 and 7 -> 8.
    assert sharded_elements(params, 4, 48 / 2**20, "fp32") == 3 + 2 + 1


def test_static_memory_of_mixed_precision_adam_by_hand():
    cfg = compose(["model=llama3_8b", "train.precision=bf16"])
    n = sum(p.numel for p in rank_params(cfg.model, layout(), 8192, 0))
    mem = stage_memory(cfg, layout(dp=1), 0)
    # bf16 weights and gradients, fp32 master and two fp32 moments: 2 + 2 + 4 + 8 bytes.
    assert (mem["params"], mem["grads"]) == (2 * n, 2 * n)
    assert mem["master_weights"] == pytest.approx(4 * n, abs=64)
    assert mem["optimizer_states"] == pytest.approx(8 * n, abs=128)
    sharded = stage_memory(cfg, layout(dp=64, zero1=True), 0)
    assert sharded["optimizer_states"] == pytest.approx(8 * n / 64, rel=1e-5)


def test_activations_per_layer_by_hand():
    # llama3_8b, bf16, tp=8 with sp, selective, one 8192-token sequence, attention unfused
    # (trn cluster): norms 2 (4 h/8 + 4 + 2 h/8), q/k/v and w1/w3 inputs 2 * 2 h,
    # attention inputs 2 (h/8 + 2 * 128 + h/8), MLP 4 * 2 f/8, rope casts 4 * 2 * 128.
    cfg = compose(["+experiment=llama3_8b_trn1_32nodes"])
    h, f = 4096, 14336
    per_token = 2 * (4 * h / 8 + 4 + 2 * h / 8) + 4 * h + 2 * (2 * h / 8 + 256) + 8 * f / 8 + 1024
    act = activation_model(cfg, layout_from_config(cfg, 1024))
    assert act.layer == 8192 * per_token
    # Without checkpointing the unfused core keeps an s x s matrix per local head.
    none = activation_model(cfg, layout(tp=8, sequence_parallel=True))
    core = 4 * 2 * h / 8 + 2 * 32 * 8192 / 8
    assert none.layer - act.layer == 8192 * (core - 2 * (2 * h / 8 + 256))


def test_in_flight_micro_batches_follow_the_schedules():
    assert in_flight_counts(layout(pp=4, microbatches=8)) == [4, 3, 2, 1]
    assert in_flight_counts(layout(pp=4, microbatches=8, schedule="gpipe")) == [8, 8, 8, 8]
    assert in_flight_counts(layout(pp=4, microbatches=8, schedule="interleaved_1f1b",
                                   virtual_pp=2)) == [11, 9, 7, 5]


def test_flops_per_token_is_6n_plus_12lhqt():
    m = compose(["model=llama3_8b"]).model
    assert 3 * 32 * layer_forward_flops(m, 8192) + 6 * 4096 * 128256 == pytest.approx(
        flops_per_token(m, 8192), rel=1e-12)
    # By hand, Llama-3-8B: h 4096, 8 kv heads of 128, f 14336, L 32, V 128256, s 8192.
    h, kv, f, n_layers, v, s = 4096, 1024, 14336, 32, 128256, 8192
    assert kv_dim(m) == kv and kv_dim(compose(["model=llama2_7b"]).model) == 4096  # no GQA
    layer_matmuls = 2 * h * h + 2 * h * kv + 3 * h * f  # q, o; k, v; w1, w2, w3
    assert flops_per_token(m, s) == 6 * (n_layers * layer_matmuls + v * h) + 12 * n_layers * h * s
    assert 3 * n_layers * layer_forward_flops(m, s) == (6 * n_layers * layer_matmuls
                                                        + 12 * n_layers * h * s)


def test_pipeline_cut_by_hand():
    """`partition_model`, the cut of the planner (and of the trainer's `layer_costs` /
    `partition_layers`), balances forward FLOPs per token; the last chunk runs the head."""
    m = compose(["model=llama3_8b"]).model
    h, kv, f, v, s = 4096, 1024, 14336, 128256, 4096
    lf = 2 * (2 * h * h + 2 * h * kv + 3 * h * f) + 4 * h * s  # 503,316,480
    head = 2 * h * v  # 1,050,673,152: about 2.09 layers
    assert partition_model(m, s, 1) == [range(32)]
    # Two chunks: 17 | 15 + head; one layer either way makes the larger chunk larger.
    assert max(17 * lf, 15 * lf + head) < min(16 * lf + head, 18 * lf)
    assert partition_model(m, s, 2) == [range(0, 17), range(17, 32)]
    assert chunk_layers(m, s, 2) == [17, 15]
    # Four chunks: the head's chunk takes 6 layers (6 + 2.09 < 9 < 7 + 2.09), the other
    # 26 go 9, 9, 8 in some order: the most expensive chunk costs 9 layers.
    sizes = chunk_layers(m, s, 4)
    assert sum(sizes) == 32 and sizes[-1] == 6 and sorted(sizes[:3]) == [8, 9, 9]
    assert 6 * lf + head < 9 * lf < 7 * lf + head


def test_step_time_terms_by_hand():
    cfg = compose(["model=llama3_8b", "cluster=trn1_32xlarge", "cluster.nodes=2",
                   "train.seq_len=4096", "train.global_batch_size=32", "train.precision=bf16"])
    lay = layout(tp=8, pp=2, dp=4, microbatches=8, micro_batch_size=1)
    t = step_time(cfg, lay, 10**9)
    intra = 768e9 / 8
    # The head costs about 2 layers: the cut is 17 | 15 + head, the last stage the busiest.
    assert chunk_layers(cfg.model, 4096, 2) == [17, 15]
    # 4 all-reduces per layer + the head's one, ring 2 (t-1)/t, (4096, 4096) bf16.
    per_mb = (4 * 15 + 1) * 2 * 7 / 8 * 4096 * 4096 * 2 / intra
    assert t["tp_comm"] == pytest.approx(8 * per_mb, rel=1e-9)
    h, kv, f, s = 4096, 1024, 14336, 4096
    lf = 2 * (2 * h * h + 2 * h * kv + 3 * h * f) + 4 * h * s  # a layer's forward per token
    compute = 4096 * (15 * 3 * lf + 6 * 4096 * 128256) / 8 / (95e12 * 0.5)
    assert lf == layer_forward_flops(cfg.model, 4096)
    assert t["compute"] == pytest.approx(8 * compute, rel=1e-9)
    # pp neighbours 32 ranks apart: on different nodes; one (tp, dp) pair of 32 per node
    # shares the node's 800 Gbps.
    p2p = 2 * 4096 * 4096 * 2 / (800e9 / 8 / 32)
    assert t["pp_p2p"] == pytest.approx(8 * p2p, rel=1e-9)
    assert t["pp_bubble"] == pytest.approx((2 - 1) * (compute + per_mb + p2p), rel=1e-9)
    # dp group (stride 8) inside a node; sharded optimizer (bf16 masters): fp32 RS + AG.
    assert t["dp_comm"] == pytest.approx(2 * 3 / 4 * 4 * 10**9 / intra, rel=1e-9)


def test_group_bandwidth_shares_efa_between_a_nodes_cores():
    cfg = compose(["cluster=trn1_32xlarge", "cluster.nodes=4"])
    assert group_bandwidth(cfg, list(range(0, 32, 8))) == 768e9 / 8
    # dp stride 8 over 4 nodes: 4 ranks of the group per node, 8 such rings per node.
    assert group_bandwidth(cfg, list(range(0, 128, 8))) == 800e9 / 8 * 4 / 32


# -- against the trainer on CPU --------------------------------------------------------------

LAYOUTS = {
    "single": (1, ()),
    "bf16_master": (1, ("train.precision=bf16",)),
    "selective": (1, ("parallel.activation_checkpointing=selective",)),
    "full": (1, ("parallel.activation_checkpointing=full",)),
    "tp2": (2, ("parallel.tp=2",)),
    "tp4_kv_replicated_sp": (4, ("parallel.tp=4", "model.n_kv_heads=2",
                                 "parallel.sequence_parallel=true")),
    "pp2_tied": (2, ("parallel.pp=2", "model.tie_embeddings=true", "parallel.microbatches=4")),
    "dp2_zero1": (2, ("parallel.zero1=true",)),
    "tp2_pp2_zero1_bf16": (4, ("parallel.tp=2", "parallel.pp=2", "parallel.zero1=true",
                               "train.precision=bf16", "parallel.dp=1",
                               "parallel.microbatches=2")),
    "pp2_interleaved_full": (2, ("parallel.pp=2", "parallel.virtual_pp=2",
                                 "parallel.schedule=interleaved_1f1b", "parallel.microbatches=4",
                                 "parallel.activation_checkpointing=full")),
}
MEASURE = ("train.seq_len=64", "train.global_batch_size=8")


def measure(rank: int, world_size: int, overrides: tuple[str, ...]) -> dict:
    from trntrain.trainer import Trainer

    trainer = Trainer(tiny_config(*MEASURE, *overrides), World(rank, world_size, rank))
    trainer.train_step(trainer.train_batches.step(0))  # the optimizer state exists after one
    with ActivationMemory() as memory:
        trainer.forward_backward(trainer.train_batches.step(1))
    return {**trainer.memory_bytes(), "activations": memory.peak,
            "pp_rank": trainer.mesh.pp_rank}


def layouts_measured(name: str) -> tuple[list[dict], object, Layout]:
    world, overrides = LAYOUTS[name]
    cfg = tiny_config(*MEASURE, *overrides)
    validate(cfg, world)
    results = (run_distributed(measure, world, overrides) if world > 1
               else [measure(0, 1, overrides)])
    return results, cfg, layout_from_config(cfg, world)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_memory_model_matches_the_trainer(name):
    results, cfg, lay = layouts_measured(name)
    for got in results:
        model = stage_memory(cfg, lay, got["pp_rank"])
        # Static memory: exact, byte for byte.
        assert model["params"] == got["params"], name
        assert model["grads"] == got["grads"], name
        assert model["optimizer_states"] + model["master_weights"] == got["optimizer"], name
        # Saved activations: within 15 % of the measured peak.
        assert model["activations"] == pytest.approx(got["activations"], rel=0.15), (
            name, got["pp_rank"], model["activations"], got["activations"])


def test_fused_and_unfused_attention_on_cpu():
    """plan.fused_attention=false: the s x s probabilities SDPA's math path keeps."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from trntrain.trainer import Trainer

    cfg = tiny_config(*MEASURE, "train.seq_len=256", "plan.fused_attention=false")
    trainer = Trainer(cfg, World())
    with sdpa_kernel(SDPBackend.MATH), ActivationMemory() as memory:
        trainer.forward_backward(trainer.train_batches.step(0))
    model = stage_memory(cfg, layout_from_config(cfg, 1), 0)["activations"]
    assert model == pytest.approx(memory.peak, rel=0.15)


# -- plan, search, the train warning ---------------------------------------------------------

def test_presets_fit_their_clusters():
    for preset in ("llama3_8b_trn1_32nodes", "llama3_70b_trn1_32nodes"):
        result = plan(compose([f"+experiment={preset}"]))
        assert result.fits and 0.2 < result.mfu < 0.5
        assert result.tokens_per_s == pytest.approx(
            1024 * 8192 / result.step_time_s, rel=1e-12)


def test_search_returns_valid_fitting_layouts_fastest_first():
    cfg = compose(["model=llama3_8b", "cluster=trn1_32xlarge", "cluster.nodes=4",
                   "train.seq_len=4096", "train.global_batch_size=64", "train.precision=bf16"])
    plans = search(cfg)
    assert plans
    speeds = [p.tokens_per_s for p in plans]
    assert speeds == sorted(speeds, reverse=True)
    for p in plans:
        lay = p.layout
        assert p.fits and lay.world_size == 128
        assert 32 % lay.tp == 0 and cfg.model.n_layers % lay.pp == 0
        assert cfg.model.n_heads % lay.tp == 0 and cfg.model.vocab_size % lay.tp == 0
        assert 64 % lay.dp == 0 and lay.microbatches * lay.micro_batch_size * lay.dp == 64
        trial = compose([*["model=llama3_8b", "cluster=trn1_32xlarge", "cluster.nodes=4",
                           "train.seq_len=4096", "train.global_batch_size=64",
                           "train.precision=bf16"], *lay.overrides()])
        validate(trial, 128)
        assert layout_from_config(trial, 128) == lay
        assert plan_layout(cfg, lay).memory_per_core_gib == p.memory_per_core_gib
        assert p.world_size == 128
    # One layout by hand: tp=8 with sp, dp=16, ZeRO-1, full checkpointing, 4 micro-batches.
    lay = layout(tp=8, dp=16, sequence_parallel=True, zero1=True,
                 activation_checkpointing="full", microbatches=4)
    (p,) = [p for p in plans if p.layout == lay]
    h, kv, f, v, s = 4096, 1024, 14336, 128256, 4096
    n = 32 * (2 * h + 2 * h * h // 8 + 2 * kv // 8 * h + 3 * f * h // 8) + 2 * v // 8 * h + h
    assert n == 1_004_015_616
    assert p.memory["params"] == 2 * n  # bf16
    lf = 2 * (2 * h * h + 2 * h * kv + 3 * h * f) + 4 * h * s
    # Forward, backward and the full recompute: 4 forwards of each layer; the head 6 h V.
    compute = 4 * s * (32 * 4 * lf + 6 * h * v) / 8 / (95e12 * 0.5)
    assert p.time["compute"] == pytest.approx(compute, rel=1e-12)
    # dp ranks 8 apart over 4 nodes: 4 per node, 8 such rings share a node's 800 Gbps;
    # fp32 reduce-scatter and all-gather of this rank's parameters.
    assert p.time["dp_comm"] == pytest.approx(2 * 15 / 16 * 4 * n / (800e9 / 8 * 4 / 32),
                                              rel=1e-12)
    assert p.tokens_per_s == pytest.approx(64 * 4096 / p.step_time_s, rel=1e-12)


def test_plan_and_search_validate_the_plan_keys():
    cluster = ["model=llama3_8b", "cluster=trn1_32xlarge", "cluster.nodes=4",
               "train.seq_len=4096", "train.global_batch_size=64"]
    with pytest.raises(ConfigError, match="plan.top"):
        search(compose([*cluster, "plan.top=0"]))
    with pytest.raises(ConfigError, match="plan.compute_efficiency"):
        plan(compose([*cluster, "plan.compute_efficiency=1.5"]))
    with pytest.raises(ConfigError, match="plan.format"):
        search(compose([*cluster, "plan.format=yaml"]))


def test_train_warns_only_when_the_layout_overflows():
    too_big = compose(["model=llama3_8b", "cluster=trn1_32xlarge", "train.seq_len=8192",
                       "train.global_batch_size=32", "train.precision=bf16"])
    validate(too_big, 32)
    warning = fit_warning(too_big, 32)
    assert warning and "16 GiB" in warning and "plan.search=true" in warning
    assert fit_warning(compose(["+experiment=llama3_8b_trn1_32nodes"]), 1024) is None
    assert fit_warning(tiny_config(), 1) is None  # cluster=local: no limit
    assert plan(tiny_config()).memory_per_core_gib * GIB > 0
