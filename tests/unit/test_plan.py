"""The planner (`trntrain.plan`): its formulas against hand computations, its memory
model against what the trainer allocates on CPU, and the layout search's validity."""

from __future__ import annotations

import re
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tests.conftest import run_distributed, tiny_config
from trntrain.config import ConfigError, compose, config_dir, validate
from trntrain.distributed import World
from trntrain.metrics.flops import flops_per_token
from trntrain.metrics.memory import ActivationMemory
from trntrain.models import build_model, count_parameters, kv_dim, partition_model
from trntrain.plan import fit_warning, plan, plan_layout
from trntrain.plan.layout import Layout, layout_from_config
from trntrain.plan.memory import (
    GIB,
    Param,
    activation_model,
    chunk_layers,
    gradient_sync_bytes,
    in_flight_counts,
    optimizer_buckets,
    rank_params,
    reducer_buckets,
    sharded_elements,
    stage_memory,
)
from trntrain.plan.search import search
from trntrain.plan.step_time import (
    group_bandwidth,
    layer_forward_flops,
    rank_layer_forward_flops,
    step_time,
)

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
    cfg = compose(["+experiment=llama3_8b_trn1_32nodes",
                   "parallel.activation_checkpointing=selective"])
    h, f = 4096, 14336
    per_token = 2 * (4 * h / 8 + 4 + 2 * h / 8) + 4 * h + 2 * (2 * h / 8 + 256) + 8 * f / 8 + 1024
    act = activation_model(cfg, layout_from_config(cfg, 1024))
    assert act.layer == 8192 * per_token
    # Without checkpointing the unfused core keeps an s x s matrix per local head.
    none = activation_model(cfg, layout(tp=8, sequence_parallel=True))
    core = 4 * 2 * h / 8 + 2 * 32 * 8192 / 8
    assert none.layer - act.layer == 8192 * (core - 2 * (2 * h / 8 + 256))


def test_transient_buffers_per_layer_by_hand():
    """The buffers one layer's backward adds, llama3_8b at tp=8 with sp, 8192 tokens,
    bf16, unfused attention: the gradients of the probabilities and of the scores, two
    8192 x 8192 matrices for each of the 32 / 8 local heads; selective checkpointing
    also rebuilds q, the repeated k and v (h/8 each) and the probabilities; full
    checkpointing the whole block as saved without checkpointing."""
    cfg = compose(["+experiment=llama3_8b_trn1_32nodes"])
    s, h, heads = 8192, 4096, 4
    base = dict(tp=8, sequence_parallel=True)
    none = activation_model(cfg, layout(**base))
    assert none.attention_scores == 2 * 2 * heads * s * s  # 1 GiB
    assert none.recompute == 0
    selective = activation_model(cfg, layout(**base, activation_checkpointing="selective"))
    assert selective.recompute == s * 2 * (3 * h / 8 + heads * s)
    full = activation_model(cfg, layout(**base, activation_checkpointing="full"))
    assert full.recompute == none.layer and full.layer == s * 2 * h / 8
    fused = activation_model(compose(["+experiment=llama3_8b_trn1_32nodes",
                                      "plan.fused_attention=true"]), layout(**base))
    assert fused.attention_scores == 0


class LiveTensors(TorchDispatchMode):
    """The live and peak bytes of tensor storages created by the operations run inside
    the mode (and of those passed to `track`), each storage counted once, until the
    last tensor holding it is freed. An in-place operation or a view of a storage not
    tracked allocates nothing and is not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, int] = {}
        self.current = self.peak = 0

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0:
            return
        if key not in self.refs:
            self.refs[key] = 0
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self.refs[key] += 1
        weakref.finalize(tensor, self._release, key, storage.nbytes())

    def _release(self, key: int, nbytes: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage().data_ptr()
                if key in self.refs or key not in inputs:
                    self.track(t)
        return out


@pytest.mark.parametrize("mode", ["none", "selective"])
def test_decomposed_attention_backward_buffers_measured(mode):
    """SDPA's math path (what XLA traces) on CPU: what one attention core's backward
    holds beyond what it kept from forward equals the planner's s x s buffers, plus,
    under selective checkpointing, its recomputation."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.checkpoint import checkpoint

    from trntrain.models.llama import Attention, LlamaArgs

    cfg = compose(["model=llama_tiny", "train.seq_len=512", "plan.fused_attention=false"])
    m, s = cfg.model, 512  # 8 heads of 16, 4 kv heads, fp32
    attention = Attention(LlamaArgs(dim=m.dim, n_layers=1, n_heads=m.n_heads,
                                    n_kv_heads=m.n_kv_heads, vocab_size=8, ffn_hidden_dim=8))
    attend = attention.attend if mode == "none" else (
        lambda q, k, v: checkpoint(attention.attend, q, k, v, use_reentrant=False))
    q = torch.randn(1, s, m.n_heads, 16, requires_grad=True)
    k, v = (torch.randn(1, s, m.n_kv_heads, 16, requires_grad=True) for _ in range(2))
    grad = torch.randn(1, s, m.n_heads, 16)
    with sdpa_kernel(SDPBackend.MATH), LiveTensors() as live:
        out = attend(q, k, v)
        kept = live.current
        live.peak = kept
        out.backward(grad)
    act = activation_model(cfg, layout(activation_checkpointing=mode))
    assert act.attention_scores == 2 * 4 * 8 * s * s  # 16 MiB: two s x s per head, fp32
    assert live.peak - kept == pytest.approx(act.recompute + act.attention_scores, rel=0.02)


def test_gradient_sync_buffers_by_hand():
    from trntrain.plan.memory import sharded_reduction, sharded_step_transient

    # Two matrices of 10 and 7 elements, a vector of 3: buckets [10, 7] and [3].
    params = [Param(10, True, False), Param(3, False, False), Param(7, True, False)]
    assert optimizer_buckets(params, 25.0) == [17, 3]
    assert optimizer_buckets(params, 48 / 2**20) == [10, 7, 3]  # 12 fp32 elements a bucket
    bf16 = compose(["train.precision=bf16"])
    zero1 = layout(dp=4, zero1=True)
    # bf16 collectives (the default): bucket 17, padded 20: flat 40 bytes, no copies (the
    # gradients are bf16 already), reduce-scatter 10 and its fp32 cast 20 = 70; then its
    # 34 bytes of gradients go, a 20-byte slice gradient stays (-14), and the flat
    # lingers: bucket 3 peaks at -14 + 40 + 8.
    assert sharded_reduction(bf16, zero1, params) == (70, -14 + 4 - 6)
    # The step: AdamW's 3 temporaries of the 5-element slice (60) on top of what the
    # reduction left (-16); the gather of 5 x 4 bf16 with the cast slice peaks at 50.
    assert sharded_step_transient(bf16, zero1, params) == 3 * 4 * 5
    assert gradient_sync_bytes(bf16, zero1, params) == 70
    # fp32 collectives: fp32 copies 68 + flat 80 (the copies go before the scatter).
    fp32_comm = compose(["train.precision=bf16", "parallel.zero1_comm_dtype=fp32"])
    assert gradient_sync_bytes(fp32_comm, zero1, params) == 68 + 80
    # fp32 accumulation: fp32 gradients, no copies; bucket 17: flat 80 + scatter 20.
    fp32_acc = compose(["train.precision=bf16", "train.fp32_grad_accumulation=true"])
    assert gradient_sync_bytes(fp32_acc, zero1, params) == 80 + 20
    # dp=1, bf16: each slice gradient (fp32, 4 bytes an element) replaces 2 of bf16:
    # bucket 17 peaks at its flat 34 and its fp32 cast 68; the reduction ends 40 bytes
    # up, and AdamW's temporaries (3 x 68) come on top.
    assert sharded_reduction(bf16, layout(dp=1), params) == (34 + 68, 40)
    assert gradient_sync_bytes(bf16, layout(dp=1), params) == 40 + 204
    # All-reduce (fp32, no ZeRO-1), buckets of 12 elements in reverse order: [7, 3], [10]:
    # one flat of 40 at a time, the previous bucket's gradients released before it.
    assert reducer_buckets([10, 3, 7], 48 / 2**20, 4) == [10, 10]
    small = compose(["parallel.bucket_mb=0.0000457763671875"])  # 48 bytes
    assert gradient_sync_bytes(small, layout(dp=2), params) == 40
    assert gradient_sync_bytes(small, layout(dp=1), params) == 0


def test_fp32_gradient_accumulation_counts_main_grad():
    cfg = compose(["model=llama3_8b", "train.precision=bf16",
                   "train.fp32_grad_accumulation=true"])
    n = sum(p.numel for p in rank_params(cfg.model, layout(), 8192, 0))
    mem = stage_memory(cfg, layout(dp=8), 0)
    assert mem["params"] == 2 * n and mem["grads"] == 4 * n


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
    # dp group (stride 8) inside a node; sharded optimizer (bf16 masters): reduce-scatter
    # and all-gather in the parameters' dtype, bf16 (parallel.zero1_comm_dtype=param).
    assert t["dp_comm"] == pytest.approx(3 / 4 * (2 + 2) * 10**9 / intra, rel=1e-9)


def test_compute_counts_the_kv_weights_every_rank_replicates():
    """tp=32 exceeds Llama-3-8B's 8 kv heads: every rank computes k and v whole."""
    cfg = compose(["model=llama3_8b", "cluster=trn1_32xlarge", "train.seq_len=8192",
                   "train.global_batch_size=32", "train.precision=bf16"])
    h, kv, f, v, s = 4096, 1024, 14336, 128256, 8192
    sharded = 2 * (2 * h * h // 8 + 2 * kv // 8 * h + 3 * f * h // 8) + 4 * h * s / 8
    assert rank_layer_forward_flops(cfg.model, s, 8) == sharded
    assert sharded == layer_forward_flops(cfg.model, s) / 8
    replicated = 2 * (2 * h * h // 32 + 2 * kv * h + 3 * f * h // 32) + 4 * h * s / 32
    assert rank_layer_forward_flops(cfg.model, s, 32) == replicated
    t = step_time(cfg, layout(tp=32, microbatches=1), 10**9)
    assert t["compute"] == pytest.approx(s * (32 * 3 * replicated + 6 * h * v / 32)
                                         / (95e12 * 0.5), rel=1e-12)


def test_fits_means_within_memory_less_the_reserve():
    result = plan(compose(["+experiment=llama3_8b_trn1_32nodes"]))
    assert (result.limit_gib, result.reserved_gib, result.budget_gib) == (16, 2.0, 14.0)
    total = result.memory_per_core_gib
    for reserve, fits in ((16 - total + 0.01, False), (16 - total - 0.01, True)):
        other = plan(compose(["+experiment=llama3_8b_trn1_32nodes",
                              f"cluster.reserved_memory_gib={reserve}"]))
        assert other.memory_per_core_gib == total and other.fits is fits
    with pytest.raises(ConfigError, match="cluster.reserved_memory_gib=16"):
        plan(compose(["+experiment=llama3_8b_trn1_32nodes", "cluster.reserved_memory_gib=16"]))
    assert plan(tiny_config()).fits is None  # cluster=local: no memory limit


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
    # Context parallelism: half of each sequence per rank, and the attention core's
    # saved tensors (the all-gather's gathered keys and values).
    "cp2_ring": (2, ("parallel.cp=2", "parallel.cp_attention=ring")),
    "cp2_allgather_tp2_sp": (4, ("parallel.cp=2", "parallel.cp_attention=allgather",
                                 "parallel.tp=2", "parallel.sequence_parallel=true")),
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


# LoRA: the frozen base counted as weights only, the adapters (cut over tp like their
# layers) with gradients, moments and masters.
LORA_LAYOUTS = {
    "lora_one_process": (1, ("peft.target_modules=[q_proj,v_proj,down_proj]",)),
    "lora_tp2_pp2_zero1_bf16_tied": (4, ("parallel.tp=2", "parallel.pp=2", "parallel.zero1=true",
                                         "train.precision=bf16", "parallel.dp=1",
                                         "parallel.microbatches=2", "model.tie_embeddings=true")),
    "lora_tp4_kv_replicated_sp": (4, ("parallel.tp=4", "model.n_kv_heads=2",
                                      "parallel.sequence_parallel=true")),
    "lora_dp2_zero1": (2, ("parallel.zero1=true", "peft.target_modules=[o_proj,up_proj]")),
}
LORA = ("peft=lora", "peft.allow_random_base=true", "peft.rank=4")


@pytest.mark.parametrize("name", sorted(LORA_LAYOUTS))
def test_lora_static_memory_matches_the_trainer(name):
    world, overrides = LORA_LAYOUTS[name]
    overrides = (*LORA, *overrides)
    cfg = tiny_config(*MEASURE, *overrides)
    validate(cfg, world)
    lay = layout_from_config(cfg, world)
    for got in run_distributed(measure, world, overrides):
        model = stage_memory(cfg, lay, got["pp_rank"])
        assert model["params"] == got["params"], name
        assert model["grads"] == got["grads"], name
        assert model["optimizer_states"] + model["master_weights"] == got["optimizer"], name
        # Against the full fine-tuning of the same layout: the base's weights alone.
        full = stage_memory(tiny_config(*MEASURE, *overrides[1:], "peft=none"), lay,
                            got["pp_rank"])
        assert model["params"] > full["params"] > 10 * model["grads"], name


SYNC_LAYOUTS = {
    "bf16_master": (1, ("train.precision=bf16",)),
    "bf16_fp32_accumulation": (1, ("train.precision=bf16", "train.fp32_grad_accumulation=true")),
    "dp2_zero1": (2, ("parallel.zero1=true",)),
    "dp2_zero1_bf16": (2, ("parallel.zero1=true", "train.precision=bf16")),
    "dp2_zero1_bf16_fp32_comm": (2, ("parallel.zero1=true", "train.precision=bf16",
                                     "parallel.zero1_comm_dtype=fp32")),
    "dp2_all_reduce": (2, ()),
}
# Buckets of 0.1 MB: llama_tiny's parameters spread over many of them.
SYNC = (*MEASURE, "parallel.bucket_mb=0.1")


def measure_gradient_sync(rank: int, world_size: int, overrides: tuple[str, ...]) -> dict:
    """The peak bytes, above what was live before, of the dp gradient reduction and of
    the sharded optimizer's step, on the second step (the optimizer state exists)."""
    from trntrain.parallel.gradients import gradient
    from trntrain.trainer import Trainer

    trainer = Trainer(tiny_config(*SYNC, *overrides), World(rank, world_size, rank))
    trainer.train_step(trainer.train_batches.step(0))
    reduce = trainer.stepper.reduce_gradients
    trainer.stepper.reduce_gradients = lambda: None
    trainer.forward_backward(trainer.train_batches.step(1))
    live = LiveTensors()
    for p in trainer.params:
        live.track(gradient(p))
    grad_bytes, start = sum(gradient(p).nbytes for p in trainer.params), live.current
    with live:
        reduce()
    out = {"reduction": live.peak - start, "grads": grad_bytes, "step": 0}
    if trainer.sharded is not None:
        live = LiveTensors()
        with live:
            trainer.sharded.step()
        out["step"] = live.peak
    return out


@pytest.mark.parametrize("name", sorted(SYNC_LAYOUTS))
def test_gradient_sync_buffers_match_the_trainer(name):
    """The gradient reduction's and the step's buffers as the trainer allocates them on
    CPU (every tensor created, until freed), against the planner's replay."""
    from trntrain.plan.memory import sharded_reduction, sharded_step_transient

    world, overrides = SYNC_LAYOUTS[name]
    cfg = tiny_config(*SYNC, *overrides)
    lay = layout_from_config(cfg, world)
    params = rank_params(cfg.model, lay, cfg.train.seq_len, 0)
    results = (run_distributed(measure_gradient_sync, world, overrides) if world > 1
               else [measure_gradient_sync(0, 1, overrides)])
    model = stage_memory(cfg, lay, 0)
    for got in results:
        assert model["grads"] == got["grads"], name  # fp32 main_grad under accumulation
        if lay.zero1 or cfg.train.precision == "bf16":
            reduction, end = sharded_reduction(cfg, lay, params)
            assert reduction == got["reduction"], name
            # gloo's worker thread may release a finished all-gather's buffer a moment
            # late (measured once under load: one bf16 bucket more): approximately.
            step = sharded_step_transient(cfg, lay, params)
            assert step == pytest.approx(got["step"], rel=0.1), name
            assert model["gradient_sync"] == max(reduction, end + step)
        else:
            assert model["gradient_sync"] == got["reduction"], name


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

@pytest.mark.parametrize("preset", ["llama3_8b_trn1_32nodes", "llama3_8b_trn1_64nodes",
                                    "llama3_70b_trn1_32nodes", "llama3_70b_trn1_64nodes",
                                    "llama3_8b_trn1_128k"])
def test_presets_fit_their_clusters(preset):
    """Every Trn1 preset fits a core's 16 GiB less the runtime's 2, with at least 1 GiB
    to spare, at an MFU in the range AWS reports for these models on Trn1."""
    cfg = compose([f"+experiment={preset}"])
    result = plan(cfg)
    assert result.fits and result.budget_gib == 14.0
    assert result.memory_per_core_gib < result.budget_gib - 1
    assert 0.2 < result.mfu < 0.5
    assert result.tokens_per_s == pytest.approx(
        cfg.train.global_batch_size * cfg.train.seq_len / result.step_time_s, rel=1e-12)
    # k and v sharded (tp divides the 8 kv heads), as the presets' comments reason.
    assert cfg.model.n_kv_heads % result.layout.tp == 0
    # The header states the planner's figures: they must still be what it says.
    header = (config_dir() / "experiment" / f"{preset}.yaml").read_text()
    stated = re.search(r"`trntrain plan \+experiment=" + preset + r"`: ([\d.]+) GiB", header)
    assert float(stated.group(1)) == pytest.approx(result.memory_per_core_gib, abs=0.1)
    stated_mfu = re.search(r"MFU ([\d.]+) %", header)
    assert float(stated_mfu.group(1)) == pytest.approx(100 * result.mfu, abs=0.5)


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
        assert p.world_size == 128
    # Composing a config takes Hydra a while: the fastest ten layouts and every few of
    # the rest are turned back into configs and validated.
    for p in plans[:10] + plans[10::max(1, len(plans) // 20)]:
        lay = p.layout
        trial = compose([*["model=llama3_8b", "cluster=trn1_32xlarge", "cluster.nodes=4",
                           "train.seq_len=4096", "train.global_batch_size=64",
                           "train.precision=bf16"], *lay.overrides()])
        validate(trial, 128)
        assert layout_from_config(trial, 128) == lay
        assert plan_layout(cfg, lay).memory_per_core_gib == p.memory_per_core_gib
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
    # bf16 reduce-scatter and all-gather of this rank's parameters.
    assert p.time["dp_comm"] == pytest.approx(15 / 16 * (2 + 2) * n / (800e9 / 8 * 4 / 32),
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


# -- one layer's saved activations, per family -----------------------------------------------

def block_saved_bytes(cfg, mode: str = "none", block_args: dict | None = None) -> int:
    """Bytes autograd saves for backward in one forward of one block of `cfg.model` (its
    family's, or with `block_args` overriding the model config), micro-batch 1, as the
    trainer runs it (`cfg.train.precision`, checkpointing `mode`): every storage saved
    through `saved_tensors_hooks`, counted once, but for the parameters and the rotary
    tables (the planner's once-per-chunk term). The block's input is a leaf, as the
    previous block's output would be."""
    from omegaconf import open_dict

    from trntrain.models import family_of
    from trntrain.parallel.activation_checkpointing import apply_activation_checkpointing

    m = cfg.model.copy()
    with open_dict(m):
        m.n_layers = 1
        m.update(block_args or {})
    model = family_of(m).build(m)
    model.init_weights(0)
    apply_activation_checkpointing(model, mode, torch.device("cpu"))
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    block = model.layers["0"].to(dtype)
    tables = {model.rope_cos.untyped_storage().data_ptr(),
              model.rope_sin.untyped_storage().data_ptr()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        weight = isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter)
        storage = t.untyped_storage()
        if not weight and storage.data_ptr() not in tables:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(1, cfg.train.seq_len, m.dim, dtype=dtype, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(x, model.rope_cos, model.rope_sin)
    out.float().sum().backward()  # the saved tensors serve a backward
    return sum(saved.values())


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("model", ["llama_tiny", "qwen3_tiny", "qwen3_tiny_head_dim_16"])
def test_layer_activations_equal_what_autograd_saves(model, precision, mode):
    """The planner's one layer (the family's `layer_activations`) against the bytes one
    block saves for backward: Llama's, and Qwen3's with its q and k norms (head_dim 32:
    queries twice the model width; 16: as wide)."""
    overrides = (["model=qwen3_tiny", "model.head_dim=16"] if model.endswith("_16")
                 else [f"model={model}"])
    cfg = compose([*overrides, "train.seq_len=64", f"train.precision={precision}",
                   "plan.fused_attention=true"])
    act = activation_model(cfg, layout(activation_checkpointing=mode))
    # Exact on torch 2.x's CPU kernels; the tolerance leaves room for a scalar or two.
    assert act.layer == pytest.approx(block_saved_bytes(cfg, mode), rel=1e-3)
