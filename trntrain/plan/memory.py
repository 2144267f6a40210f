"""Memory per core of a layout, counted from what trntrain allocates.

Static memory (exact, element for element what the trainer holds):
- parameters: this rank's shard of each weight. With tp, q/o/w1/w2/w3, the embedding
  and the head are split; the norms are replicated; k and v are split when tp divides
  the kv heads and replicated whole when tp exceeds them (`ReplicatedKVLinear`);
- gradients: one per parameter, in the parameters' dtype (fp32 `main_grad` buffers
  under `train.fp32_grad_accumulation`);
- optimizer: AdamW's two moments. With ZeRO-1 or bf16 master weights the optimizer
  is `ShardedOptimizer`: parameters packed in flat buckets per category (decay,
  tp-sharded, counted in the norm), each padded to a multiple of dp, and each rank
  keeps fp32 master weights and two fp32 moments of its 1/dp slice: 4 + 8 bytes per
  element (the standard mixed-precision Adam accounting of ZeRO, Rajbhandari et al.
  2020: 2 + 2 + 12 bytes per parameter with bf16 weights and gradients). Without
  sharding, the moments have the parameters' dtype and there are no masters.

Activations: the tensors autograd saves for backward, per token of a micro-batch and
per layer, in bytes (e = 2 for bf16, 4 for fp32; h width, f MLP width, a heads, t tp;
h_n = h/t under sequence parallelism, else h). This is Megatron's accounting
(Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models": s b h (34 + 5 a s / h) bytes per layer in 16-bit) redone for a Llama block as
trntrain writes it:
- each RMSNorm: its fp32 input, the fp32 1/rms and the normalised value: 4 h_n + 4 + e h_n;
- the inputs of q/k/v and of w1/w3 (the norm outputs, gathered under sp): 2 e h;
- attention core, fused (flash-style SDPA, as on CPU/GPU): q, k and v (repeated to the
  query heads), the output (shared with wo's input) and fp32 log-sum-exp: 4 e h/t + 4 a/t;
  unfused (XLA decomposes SDPA): q, k, v, wo's input and the s x s probabilities per
  head (Megatron's 5 a s / h term is softmax output 2 + dropout mask 1 + dropout output
  2; Llama has no dropout): 4 e h/t + e a s/t;
- SwiGLU: w1 x, silu(w1 x), w3 x and their product (w2's input): 4 e f/t.
Selective checkpointing keeps only the attention core's inputs (q; k, v before their
repetition) and wo's input; full checkpointing keeps each block's input (e h_n) and
recomputes one block at a time in backward, whose activations then live as well
(`recompute`; Megatron's formula omits it). Outside the layers: the embedding's token
ids, the final norm, the head's input and the loss's fp32 softmax (V/t per token).
Calibrated against `ActivationMemory` on CPU, see tests/unit/test_plan.py.

In flight: a pipeline rank holds the activations of every micro-batch it has run
forward and not yet backward; their peak is found by walking the rank's action list
of the schedule (`pipeline_schedule.rank_actions`), the same list the trainer runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from omegaconf import DictConfig

from trntrain.metrics.flops import kv_dim
from trntrain.parallel.pipeline import partition_model
from trntrain.parallel.pipeline_schedule import rank_actions
from trntrain.plan.layout import Layout

GIB = 2**30


@dataclass(frozen=True)
class Param:
    numel: int
    matrix: bool  # ndim >= 2: weight decay
    tp_sharded: bool
    counted: bool = True  # False: a tied head duplicated on the last pipeline stage


def param_bytes(precision: str) -> int:
    return 2 if precision == "bf16" else 4


def activation_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def kv_heads(model: DictConfig) -> int:
    return model.n_kv_heads or model.n_heads


def layer_params(model: DictConfig, tp: int) -> list[Param]:
    """One transformer block's parameters on a tp rank, in the module's order."""
    h, f = model.dim, model.ffn_hidden_dim
    kv = kv_dim(model)
    sharded = tp > 1
    kv_sharded = tp <= kv_heads(model)
    kv_numel = (kv // tp if kv_sharded else kv) * h
    return [
        Param(h, False, False),  # attention_norm
        Param(h * h // tp, True, sharded),  # wq
        Param(kv_numel, True, sharded and kv_sharded),  # wk
        Param(kv_numel, True, sharded and kv_sharded),  # wv
        Param(h * h // tp, True, sharded),  # wo
        Param(h, False, False),  # ffn_norm
        Param(f * h // tp, True, sharded),  # w1
        Param(f * h // tp, True, sharded),  # w2
        Param(f * h // tp, True, sharded),  # w3
    ]


def chunk_layers(model: DictConfig, seq_len: int, chunks: int) -> list[int]:
    """Layers in each pipeline chunk, cut as the trainer cuts them (`partition_model`)."""
    return [len(r) for r in partition_model(model, seq_len, chunks)]


def rank_chunks(layout: Layout) -> list[list[int]]:
    """Global chunk indices held by each pipeline rank."""
    p, c = layout.pp, layout.chunks
    return [[i for i in range(c) if i % p == rank] for rank in range(p)]


def rank_params(model: DictConfig, layout: Layout, seq_len: int, rank: int) -> list[Param]:
    """This pipeline rank's parameters in the trainer's order (`Trainer.params`)."""
    h, v_size, tp = model.dim, model.vocab_size, layout.tp
    sizes = chunk_layers(model, seq_len, layout.chunks)
    last = layout.chunks - 1
    out: list[Param] = []
    for chunk in rank_chunks(layout)[rank]:
        if chunk == 0:
            out.append(Param(v_size // tp * h, True, tp > 1))
        for _ in range(sizes[chunk]):
            out.extend(layer_params(model, tp))
        if chunk == last:
            out.append(Param(h, False, False))
            # A tied head is the embedding itself, unless pipelining put them apart.
            if not (model.tie_embeddings and chunk == 0):
                duplicate = model.tie_embeddings and layout.pp > 1
                out.append(Param(v_size // tp * h, True, tp > 1, counted=not duplicate))
    return out


def all_rank_params(model: DictConfig, layout: Layout, seq_len: int) -> list[list[Param]]:
    """`rank_params` of every pipeline rank."""
    return [rank_params(model, layout, seq_len, r) for r in range(layout.pp)]


def sharded_optimizer(train: DictConfig, layout: Layout) -> bool:
    """The trainer steps flat fp32 slices under ZeRO-1 and for bf16 master weights
    (sharded over dp either way)."""
    return layout.zero1 or (train.precision == "bf16" and train.master_weights)


def sharded_elements(params: list[Param], dp: int, bucket_mb: float, precision: str) -> int:
    """Elements of this rank's slices in `ShardedOptimizer`: buckets per category of at
    most bucket_mb of fp32, each padded to a multiple of dp, 1/dp of each."""
    limit = int(bucket_mb * 2**20) // 4
    open_buckets: dict[tuple, int] = {}
    total = 0
    for p in params:
        key = (p.matrix, p.tp_sharded, p.counted)
        current = open_buckets.get(key, 0)
        if current and current + p.numel > limit:
            total += -(-current // dp)
            current = 0
        open_buckets[key] = current + p.numel
    return total + sum(-(-n // dp) for n in open_buckets.values() if n)


def static_bytes(cfg: DictConfig, layout: Layout, params: list[Param]) -> dict[str, int]:
    """Parameters, gradients, optimizer moments and master weights on a pipeline rank
    holding `params` (its `rank_params`)."""
    t = cfg.train
    numel = sum(p.numel for p in params)
    pe = param_bytes(t.precision)
    grads = numel * (4 if t.fp32_grad_accumulation else pe)
    if sharded_optimizer(t, layout):
        slice_numel = sharded_elements(params, layout.dp, cfg.parallel.bucket_mb, t.precision)
        optimizer, master = 8 * slice_numel, 4 * slice_numel
    else:
        optimizer, master = 2 * numel * pe, 0
    return {"params": numel * pe, "grads": grads, "optimizer_states": optimizer,
            "master_weights": master}


@dataclass
class ActivationModel:
    """Saved-activation bytes of one micro-batch through one chunk."""

    layer: float  # one layer as saved for backward
    layer_uncheckpointed: float  # one layer without checkpointing (the recompute buffer)
    first: float  # embedding (chunk 0)
    last: float  # final norm, head input, loss (last chunk)
    per_chunk: float  # once per chunk whatever the micro-batches (fp32 rope tables)


def fused_attention(cfg: DictConfig) -> bool:
    """plan.fused_attention, or by backend: XLA (and Neuron) decompose SDPA and keep the
    s x s probabilities; CPU and CUDA SDPA kernels keep only the log-sum-exp."""
    setting = cfg.plan.fused_attention
    if setting is not None:
        return bool(setting)
    backend = cfg.backend.name
    if backend == "auto":
        return not str(cfg.cluster.name).startswith("trn")
    return backend not in ("xla", "neuron")


def activation_model(cfg: DictConfig, layout: Layout) -> ActivationModel:
    m, t = cfg.model, cfg.train
    tokens = layout.micro_batch_size * t.seq_len
    h, f, a, tp = m.dim, m.ffn_hidden_dim, m.n_heads, layout.tp
    head_dim = h // a
    kv_local = (kv_heads(m) // tp if tp <= kv_heads(m) else 1) * head_dim
    e = activation_bytes(t.precision)
    h_n = h / tp if layout.sequence_parallel else h
    norm = 4 * h_n + 4 + e * h_n
    inputs = 2 * e * h
    mlp = 4 * e * f / tp
    if fused_attention(cfg):
        core = 4 * e * h / tp + 4 * a / tp
    else:
        core = 4 * e * h / tp + e * a * t.seq_len / tp
    selective_core = e * (h / tp + 2 * kv_local + h / tp)
    # bf16: each rotary application casts its cos and sin tables to bf16 (q and k);
    # fp32: the tables themselves, once per chunk.
    rope = 4 * e * head_dim if e != 4 else 0
    full_layer = 2 * norm + inputs + core + mlp + rope
    mode = layout.activation_checkpointing
    if mode == "full":
        layer = e * h_n
    elif mode == "selective":
        layer = 2 * norm + inputs + selective_core + mlp + rope
    else:
        layer = full_layer
    v_local = m.vocab_size / tp
    # Embedding: token ids (int64), under tp also the shifted ids and an out-of-range mask.
    first = 8 + (9 if tp > 1 else 0)
    # Final norm, the head's (gathered) input, the loss's fp32 softmax and int64 labels
    # (under tp also local ids and a mask).
    last = norm + e * h + 4 * v_local + 8 + (9 if tp > 1 else 0)
    per_chunk = 2 * m.max_seq_len * head_dim * 4 if e == 4 else 0
    return ActivationModel(layer * tokens, full_layer * tokens if mode == "full" else 0.0,
                           first * tokens, last * tokens, per_chunk)


@lru_cache(maxsize=4096)
def peak_in_flight(schedule: str, pp: int, virtual: int, microbatches: int, rank: int,
                   weights: tuple[float, ...]) -> float:
    """Peak of the summed weights of chunks run forward and not yet backward on a rank;
    weights[i] is the cost of this rank's i-th local chunk for one micro-batch."""
    if pp == 1:
        return weights[0]  # forward then backward, one micro-batch at a time
    live = peak = 0.0
    for action in rank_actions(schedule, pp, virtual, microbatches, rank):
        w = weights[action.chunk // pp]
        live += w if action.kind == "F" else -w
        peak = max(peak, live)
    return peak


def in_flight_counts(layout: Layout) -> list[int]:
    """Micro-batches in flight at the peak on each pipeline rank (chunk-micro-batches
    for interleaving)."""
    return [round(peak_in_flight(layout.schedule, layout.pp, layout.virtual_pp,
                                 layout.microbatches, r, (1.0,) * len(rank_chunks(layout)[r])))
            for r in range(layout.pp)]


def stage_memory(cfg: DictConfig, layout: Layout, rank: int,
                 params: list[Param] | None = None, act: ActivationModel | None = None
                 ) -> dict[str, float]:
    """Bytes on one pipeline rank, by part; `params` (the rank's `rank_params`) and `act`
    (the layout's `activation_model`) where the caller has them already."""
    if params is None:
        params = rank_params(cfg.model, layout, cfg.train.seq_len, rank)
    if act is None:
        act = activation_model(cfg, layout)
    out: dict[str, float] = dict(static_bytes(cfg, layout, params))
    sizes = chunk_layers(cfg.model, cfg.train.seq_len, layout.chunks)
    last = layout.chunks - 1
    weights = tuple(sizes[c] * act.layer + (act.first if c == 0 else 0)
                    + (act.last if c == last else 0) for c in rank_chunks(layout)[rank])
    out["activations"] = (peak_in_flight(layout.schedule, layout.pp, layout.virtual_pp,
                                         layout.microbatches, rank, weights)
                          + act.per_chunk * len(weights))
    out["recompute"] = act.layer_uncheckpointed
    return out


def memory_per_core(cfg: DictConfig, layout: Layout, params: list[list[Param]]
                    ) -> tuple[int, dict[str, float]]:
    """(pipeline rank, its bytes by part) of the rank that needs the most memory;
    `params`: the layout's `all_rank_params`."""
    act = activation_model(cfg, layout)
    stages = [stage_memory(cfg, layout, r, params[r], act) for r in range(layout.pp)]
    rank = max(range(layout.pp), key=lambda r: sum(stages[r].values()))
    return rank, stages[rank]
