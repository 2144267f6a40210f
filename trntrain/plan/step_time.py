"""Step time of a layout on a cluster: compute, tp collectives, pipeline transfers and
bubble, dp gradient synchronisation. No term is assumed to overlap another (the
trainer issues its collectives in line with compute), so the estimate is an upper
bound of what the layout can do at the given compute efficiency.

- compute: hardware FLOPs of the busiest pipeline rank / (peak x plan.compute_efficiency).
  Model FLOPs per token are 6 N + 12 L H Q T (`trntrain.metrics.flops`), of which a tp
  rank runs its shard: 1/t, except k and v, which every rank computes whole when t
  exceeds the kv heads (`ReplicatedKVLinear`); activation checkpointing adds a forward
  of what it recomputes (full: the layers, 2 N_layers + 4 L H Q T; selective: the
  attention core, 4 L H Q T), which costs time but is not counted in MFU, as
  Megatron's and PaLM's MFU do not count it;
- tp: per layer and micro-batch, Megatron's two all-reduces forward and two backward of
  the (b, s, h) activation (with sequence parallelism, all-gathers and reduce-scatters
  moving the same bytes), plus the embedding's forward and the head's backward one.
  A ring all-reduce of B bytes over t ranks costs 2 (t - 1) / t x B / bandwidth;
- pp: every micro-batch crosses each chunk boundary once forward and once backward
  (b s h e bytes, / t under sequence parallelism), and the pipeline idles for
  (p - 1) / v micro-batch times (Megatron's bubble, Narayanan et al. 2021: a fraction
  (p - 1) / (v m) of the ideal time);
- dp: sharded optimizer (ZeRO-1, bf16 master weights): reduce-scatter of the gradients
  and all-gather of the weights, (d - 1) / d x B / bandwidth each, in the parameters'
  dtype (fp32 gradients under train.fp32_grad_accumulation; both fp32 with
  parallel.zero1_comm_dtype=fp32);
  otherwise a ring all-reduce of the gradients in their dtype;
- cp: per layer and micro-batch, the attention's exchange of keys and values within
  the cp group (kv heads of the rank, e bytes): all-gather, the keys and the values
  all-gathered forward, again backward, and their gradients reduce-scattered, each
  (c - 1) / c x b s kv e / bandwidth; ring, c - 1 hops of the rank's keys and values
  forward and again backward, and c hops of their fp32 gradients, each 2 b (s / c) kv
  bytes / bandwidth; activation checkpointing repeats the forward exchange. Compute and
  the other terms take the rank's s / c tokens;
- ep (MoE): per MoE layer and micro-batch, the all-to-alls of dispatch and combine
  forward and their two backward (two more under full checkpointing, which recomputes
  the forward), each moving the rank's top_k x b s h e bytes of routed tokens, of
  which (ep - 1) / ep leave the rank.

Bandwidth of a group: `cluster.intra_node_gbps` per core when it sits in one node.
A group spanning nodes goes over EFA, which every core of the node shares: each node
carries the rings of procs_per_node / g groups at once (g: ranks of one group per
node), so a ring gets inter_node_gbps x g / procs_per_node.
"""

from __future__ import annotations

from omegaconf import DictConfig

from trntrain.metrics.flops import mfu
from trntrain.models import family_of
from trntrain.models import head_dim as family_head_dim
from trntrain.plan.layout import Layout
from trntrain.plan.memory import (
    activation_bytes,
    chunk_layers,
    layer_params,
    param_bytes,
    rank_chunks,
    sharded_optimizer,
)


def layer_forward_flops(model: DictConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one transformer layer: 2 x its matmul parameters plus
    the attention scores and their weighting (4 H Q T); the cost by which the trainer
    balances its pipeline chunks (`pipeline.layer_costs`)."""
    return family_of(model).layer_costs(model, seq_len)[0]


def rank_layer_forward_flops(model: DictConfig, seq_len: int, tp: int) -> float:
    """Forward FLOPs per token of one layer on one tp rank: 2 x the rank's matmul
    elements (q, o and the MLP split over tp; k and v split too, or whole on every rank
    when tp exceeds the kv heads) plus its heads' share of the attention core. Equals
    layer_forward_flops / tp when tp divides the kv heads."""
    matmuls = sum(p.numel for p in layer_params(model, tp) if p.matrix)
    return 2 * matmuls + 4 * model.dim * seq_len / tp


def recompute_flops(model: DictConfig, seq_len: int, mode: str, tp: int = 1) -> float:
    """Extra forward FLOPs per token and layer that checkpointing recomputes on a tp rank."""
    if mode == "full":
        return rank_layer_forward_flops(model, seq_len, tp)
    if mode == "selective":
        return 4 * model.dim * seq_len / tp
    return 0.0


def bytes_per_s(gbps: float) -> float:
    return gbps * 1e9 / 8


def group_bandwidth(cfg: DictConfig, ranks: list[int]) -> float:
    """Bytes/s of a ring over `ranks` (global ranks of one group)."""
    c = cfg.cluster
    per_node = c.procs_per_node or len(ranks)
    nodes = {r // per_node for r in ranks}
    intra = bytes_per_s(c.intra_node_gbps)
    if len(nodes) == 1:
        return intra
    g = len(ranks) // len(nodes)
    return min(intra, bytes_per_s(c.inter_node_gbps) * g / per_node)


def step_time(cfg: DictConfig, layout: Layout, params_per_rank: int) -> dict[str, float] | None:
    """Seconds per optimizer step by term, or None where the cluster has no peak
    FLOP/s or bandwidths (cluster=local)."""
    c, m, t = cfg.cluster, cfg.model, cfg.train
    if None in (c.peak_flops_per_core, c.intra_node_gbps, c.inter_node_gbps):
        return None
    s, b, mb = t.seq_len, layout.micro_batch_size, layout.microbatches
    tokens = b * s // layout.cp  # per micro-batch, on this rank
    e = activation_bytes(t.precision)
    mode = layout.activation_checkpointing
    tp = layout.tp
    per_layer = 3 * rank_layer_forward_flops(m, s, tp) + recompute_flops(m, s, mode, tp)
    head = 6 * m.dim * m.vocab_size / tp
    sizes = chunk_layers(m, s, layout.chunks)
    last = layout.chunks - 1
    held = rank_chunks(layout)
    dims = layout.dims
    speed = c.peak_flops_per_core * cfg.plan.compute_efficiency

    # The busiest pipeline rank sets the pace of every micro-batch.
    def rank_flops(r: int) -> float:
        return sum(sizes[i] * per_layer + (head if i == last else 0) for i in held[r])

    busiest = max(range(layout.pp), key=rank_flops)
    compute = tokens * rank_flops(busiest) / speed

    tp_comm = 0.0
    if layout.tp > 1:
        ranks = [dims.rank_of(0, 0, i) for i in range(layout.tp)]
        collectives = 4 * sum(sizes[i] for i in held[busiest])
        collectives += sum((i == 0) + (i == last) for i in held[busiest])
        ring = 2 * (layout.tp - 1) / layout.tp
        tp_comm = collectives * ring * tokens * m.dim * e / group_bandwidth(cfg, ranks)

    p2p = bubble = 0.0
    if layout.pp > 1:
        ranks = [dims.rank_of(i, 0, 0) for i in range(layout.pp)]
        bw = min(group_bandwidth(cfg, ranks[i:i + 2]) for i in range(layout.pp - 1))
        shard = layout.tp if layout.sequence_parallel else 1
        p2p = 2 * layout.virtual_pp * tokens * m.dim * e / shard / bw
    ep_comm = 0.0
    if layout.ep > 1 and getattr(m, "num_experts", None):
        ranks = [dims.rank_of(0, i, 0) for i in range(layout.ep)]
        exchanges = (4 + 2 * (mode == "full")) * sum(sizes[i] for i in held[busiest])
        # With a capacity factor c each exchange moves the (E, C, dim) buffer: c x top_k
        # rows per token; dropless moves top_k.
        rows = m.top_k * (getattr(m, "capacity_factor", None) or 1.0)
        ep_comm = (exchanges * (layout.ep - 1) / layout.ep * rows * tokens * m.dim * e
                   / group_bandwidth(cfg, ranks))
    cp_comm = context_comm_s(cfg, layout, sum(sizes[i] for i in held[busiest]))
    per_microbatch = compute + tp_comm + p2p + ep_comm + cp_comm
    if layout.pp > 1:
        bubble = (layout.pp - 1) / layout.virtual_pp * per_microbatch

    dp_comm = 0.0
    d = layout.replicas  # gradients are reduced over dp x cp
    if d > 1:
        bw = group_bandwidth(cfg, dims.group_ranks("dp", "cp")[0])
        if sharded_optimizer(t, layout):
            fp32 = cfg.parallel.zero1_comm_dtype == "fp32"
            grads = 4 if fp32 or t.fp32_grad_accumulation else param_bytes(t.precision)
            weights = 4 if fp32 else param_bytes(t.precision)
            dp_comm = (d - 1) / d * (grads + weights) * params_per_rank / bw
        else:
            dp_comm = 2 * (d - 1) / d * param_bytes(t.precision) * params_per_rank / bw
    out = {"compute": mb * compute, "tp_comm": mb * tp_comm, "pp_p2p": mb * p2p,
           "pp_bubble": bubble, "dp_comm": dp_comm}
    objective = getattr(cfg, "objective", None)
    if objective is not None and objective.get("name") == "dpo" and (
            objective.get("reference") == "model"):
        # The reference's forward of every micro-batch: a third of the step's FLOPs
        # without recomputation, half of its tp and pp traffic, its own bubble.
        forward = (compute * sum(sizes[i] * rank_layer_forward_flops(m, s, tp)
                                 + (head / 3 if i == last else 0) for i in held[busiest])
                   / rank_flops(busiest) + (tp_comm + p2p) / 2)
        out["reference_forward"] = mb * forward + (layout.pp - 1) / layout.virtual_pp * forward
    if layout.ep > 1:
        out["ep_all_to_all"] = mb * ep_comm
    if layout.cp > 1:
        out["cp_attention"] = mb * cp_comm
    return out


def context_comm_s(cfg: DictConfig, layout: Layout, layers: int) -> float:
    """Seconds of one micro-batch's key and value exchange over the cp group, on a rank
    running `layers` layers (the module docstring's cp term)."""
    cp = layout.cp
    if cp == 1:
        return 0.0
    m, t = cfg.model, cfg.train
    e = activation_bytes(t.precision)
    kv = (m.n_kv_heads or m.n_heads)
    kv_local = (kv // layout.tp if layout.tp <= kv else 1) * family_head_dim(m)
    forward_again = layout.activation_checkpointing != "none"
    bw = group_bandwidth(cfg, layout.dims.group_ranks("cp")[0])
    b, s = layout.micro_batch_size, t.seq_len
    if layout.cp_attention == "allgather":
        one = (cp - 1) / cp * b * s * kv_local * e / bw  # k or v, gathered or scattered
        per_layer = (2 + 2 + 2 + 2 * forward_again) * one
    else:
        hop = 2 * b * (s // cp) * kv_local / bw  # k and v together, per byte of element
        per_layer = (cp - 1) * hop * e * (2 + forward_again) + cp * hop * 4
    return layers * per_layer


def throughput(cfg: DictConfig, layout: Layout, step_s: float) -> tuple[float, float]:
    """(tokens/s, MFU) of the whole job at `step_s` seconds per optimizer step."""
    t = cfg.train
    tokens_per_s = t.global_batch_size * t.seq_len / step_s
    return tokens_per_s, mfu(tokens_per_s, cfg.model, t.seq_len, layout.world_size,
                             cfg.cluster.peak_flops_per_core)
