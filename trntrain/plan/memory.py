"""Memory per core of a layout, counted from what trntrain allocates.

Static memory (exact, element for element what the trainer holds):
- parameters: this rank's shard of each weight. With tp, q/o/w1/w2/w3, the embedding
  and the head are split; the norms are replicated; k and v are split when tp divides
  the kv heads and replicated whole when tp exceeds them (`ReplicatedKVLinear`);
- gradients: one per parameter, in the parameters' dtype (fp32 `main_grad` buffers
  under `train.fp32_grad_accumulation`);
- LoRA (peft=lora): the base's weights only (frozen: no gradient, no optimizer state,
  no master), and the adapters as the trained parameters (`lora_params`), cut over tp
  as `trntrain/peft/lora.py` cuts them;
- DPO with objective.reference=model (no LoRA): a frozen copy of the weights, sharded
  like them (`reference_weights`);
- optimizer: AdamW's two moments. With ZeRO-1 or bf16 master weights the optimizer
  is `ShardedOptimizer`: parameters packed in flat buckets per category (decay,
  tp-sharded, counted in the norm), each padded to a multiple of dp, and each rank
  keeps fp32 master weights and two fp32 moments of its 1/dp slice: 4 + 8 bytes per
  element (the standard mixed-precision Adam accounting of ZeRO, Rajbhandari et al.
  2020: 2 + 2 + 12 bytes per parameter with bf16 weights and gradients); pure bf16
  (train.master_weights=false) keeps bf16 slices and moments: 2 + 4 bytes. Without
  sharding, the moments have the parameters' dtype and there are no masters.

Activations: the tensors autograd saves for backward, per token of a micro-batch and
per layer, in bytes (e = 2 for bf16, 4 for fp32; h width, f MLP width, a heads, t tp;
h_n = h/t under sequence parallelism, else h). One layer's are its family's
(`ModelFamily.layer_activations`, given an `ActivationSpec` of the layout; Qwen3 adds
its q and k norms, trntrain/models/qwen3/costs.py). The default, Llama's
(trntrain/models/llama/costs.py), is Megatron's accounting (Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models": s b h (34 + 5 a s / h)
bytes per layer in 16-bit) redone for a Llama block as trntrain writes it:
- each RMSNorm: its fp32 input, the fp32 1/rms and the normalised value: 4 h_n + 4 + e h_n;
- the inputs of q/k/v and of w1/w3 (the norm outputs, gathered under sp): 2 e h;
- attention core, fused (flash-style SDPA, as on CPU/GPU): q, k and v (repeated to the
  query heads), the output (shared with wo's input) and fp32 log-sum-exp: 4 e h/t + 4 a/t;
  unfused (XLA decomposes SDPA): q, k, v, wo's input and the s x s probabilities per
  head (Megatron's 5 a s / h term is softmax output 2 + dropout mask 1 + dropout output
  2; Llama has no dropout): 4 e h/t + e a s/t;
- SwiGLU: w1 x, silu(w1 x), w3 x and their product (w2's input): 4 e f/t.
Selective checkpointing keeps only the attention core's inputs (q; k, v before their
repetition) and wo's input; full checkpointing keeps each block's input (e h_n).
Outside the layers: the embedding's token ids, the final norm, the head's input and
the loss's fp32 softmax (V/t per token). Calibrated against `ActivationMemory` on CPU,
see tests/unit/test_plan.py; one layer equals the bytes one block saves, Llama's and
Qwen3's (`test_layer_activations_equal_what_autograd_saves`).

In flight: a pipeline rank holds the activations of every micro-batch it has run
forward and not yet backward; their peak is found by walking the rank's action list
of the schedule (`pipeline_schedule.rank_actions`), the same list the trainer runs.

Transient buffers, one layer (or bucket) at a time, on top of the above:
- recompute: what checkpointing rebuilds for one layer's backward (Megatron's formula
  omits it): full, the whole block as saved without checkpointing; selective, the
  core's q, repeated k and v and, unfused, the s x s probabilities;
- attention s x s (unfused only): the backward of the decomposed softmax(q k^T) v holds
  the gradients of the probabilities and of the scores, 2 e a s / t per token, besides
  the saved probabilities (its forward holds one such matrix fewer);
- gradient buckets: the flat buffers of the gradient reduction after backward
  (`gradient_sync_bytes`).
They are counted as live together with the peak of the activations: an upper bound
(on XLA the reduction runs in the optimizer's graph, after the last micro-batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from omegaconf import DictConfig

from trntrain.models import ParamSpec as Param
from trntrain.models import family_of, partition_model
from trntrain.models import head_dim as family_head_dim
from trntrain.models.family import ActivationSpec
from trntrain.parallel.pipeline_schedule import rank_actions
from trntrain.plan.layout import Layout

GIB = 2**30


def param_bytes(precision: str) -> int:
    return 2 if precision == "bf16" else 4


def activation_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def kv_heads(model: DictConfig) -> int:
    return model.n_kv_heads or model.n_heads


def layer_params(model: DictConfig, tp: int) -> list[Param]:
    """One transformer block's parameters on a tp rank, as its family counts them."""
    return family_of(model).layer_params(model, tp)


def chunk_layers(model: DictConfig, seq_len: int, chunks: int) -> list[int]:
    """Layers in each pipeline chunk, cut as the trainer cuts them (`partition_model`)."""
    return [len(r) for r in partition_model(model, seq_len, chunks)]


def rank_chunks(layout: Layout) -> list[list[int]]:
    """Global chunk indices held by each pipeline rank."""
    p, c = layout.pp, layout.chunks
    return [[i for i in range(c) if i % p == rank] for rank in range(p)]


# LoRA adapters of a block, in the trainer's order: (trntrain module, HF name, tp kind).
LORA_MODULES = (("attention.wq", "q_proj", "column"), ("attention.wk", "k_proj", "column"),
                ("attention.wv", "v_proj", "column"), ("attention.wo", "o_proj", "row"),
                ("feed_forward.w1", "gate_proj", "column"),
                ("feed_forward.w2", "down_proj", "row"), ("feed_forward.w3", "up_proj", "column"))


def lora_params(model: DictConfig, tp: int, peft: DictConfig) -> list[Param]:
    """One block's LoRA adapters on a tp rank (A then B of each targeted layer): a
    column-parallel layer's B and a row-parallel layer's A split over tp, the rest whole
    (k and v whole when tp exceeds the kv heads)."""
    from trntrain.peft.lora import ALL_LINEAR

    h, f, r = model.dim, model.ffn_hidden_dim, peft.rank
    q, kv = model.n_heads * family_head_dim(model), kv_heads(model) * family_head_dim(model)
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, f), "down_proj": (f, h), "up_proj": (h, f)}
    targets = set(peft.target_modules)
    out: list[Param] = []
    for _, name, kind in LORA_MODULES:
        if ALL_LINEAR not in targets and name not in targets:
            continue
        n_in, n_out = shapes[name]
        if name in ("k_proj", "v_proj") and tp > kv_heads(model):
            kind = "replicated"
        split = tp > 1 and kind != "replicated"
        a_split, b_split = split and kind == "row", split and kind == "column"
        out.append(Param(r * (n_in // tp if a_split else n_in), True, a_split))
        out.append(Param((n_out // tp if b_split else n_out) * r, True, b_split))
    return out


def rank_params(model: DictConfig, layout: Layout, seq_len: int, rank: int,
                peft: DictConfig | None = None) -> list[Param]:
    """This pipeline rank's trained parameters in the trainer's order (`Trainer.params`):
    the whole model's, or under LoRA (`peft`) its adapters'."""
    if peft is not None and peft.get("name", "none") == "lora":
        sizes = chunk_layers(model, seq_len, layout.chunks)
        block = lora_params(model, layout.tp, peft)
        return [p for chunk in rank_chunks(layout)[rank] for _ in range(sizes[chunk])
                for p in block]
    h, v_size, tp = model.dim, model.vocab_size, layout.tp
    sizes = chunk_layers(model, seq_len, layout.chunks)
    last = layout.chunks - 1
    out: list[Param] = []
    for chunk in rank_chunks(layout)[rank]:
        if chunk == 0:
            out.append(Param(v_size // tp * h, True, tp > 1))
        for _ in range(sizes[chunk]):
            out.extend(ep_local(layer_params(model, tp), layout.ep))
        if chunk == last:
            out.append(Param(h, False, False))
            # A tied head is the embedding itself, unless pipelining put them apart.
            if not (model.tie_embeddings and chunk == 0):
                duplicate = model.tie_embeddings and layout.pp > 1
                out.append(Param(v_size // tp * h, True, tp > 1, counted=not duplicate))
    return out


def ep_local(params: list[Param], ep: int) -> list[Param]:
    """A layer's parameters on an ep rank: num_experts / ep of the experts."""
    if ep == 1:
        return params
    experts = [p for p in params if p.expert]
    return [p for p in params if not p.expert] + experts[:len(experts) // ep]


def all_rank_params(model: DictConfig, layout: Layout, seq_len: int,
                    peft: DictConfig | None = None) -> list[list[Param]]:
    """`rank_params` of every pipeline rank."""
    return [rank_params(model, layout, seq_len, r, peft) for r in range(layout.pp)]


def frozen_numel(cfg: DictConfig, layout: Layout, rank: int) -> int:
    """Elements of the frozen base on a pipeline rank: the whole model's under LoRA."""
    peft = getattr(cfg, "peft", None)
    if peft is None or peft.get("name", "none") != "lora":
        return 0
    return sum(p.numel for p in rank_params(cfg.model, layout, cfg.train.seq_len, rank))


def holds_reference_copy(cfg: DictConfig) -> bool:
    """Whether the trainer holds a second, frozen model: DPO's reference=model without
    LoRA (under LoRA the reference is the base with its adapters off; precomputed
    reference log-probabilities are a table of 8 bytes per pair)."""
    objective, peft = getattr(cfg, "objective", None), getattr(cfg, "peft", None)
    return (objective is not None and objective.get("name") == "dpo"
            and objective.get("reference") == "model"
            and (peft is None or peft.get("name", "none") != "lora"))


def reference_bytes(cfg: DictConfig, layout: Layout, rank: int) -> int:
    """The frozen reference copy's weights on a pipeline rank (0 where there is none)."""
    if not holds_reference_copy(cfg):
        return 0
    numel = sum(p.numel for p in rank_params(cfg.model, layout, cfg.train.seq_len, rank))
    return numel * param_bytes(cfg.train.precision)


def sharded_optimizer(train: DictConfig, layout: Layout) -> bool:
    """The trainer steps flat fp32 slices under ZeRO-1 and for bf16 master weights
    (sharded over dp either way)."""
    return layout.zero1 or (train.precision == "bf16" and train.master_weights)


def optimizer_bucket_groups(params: list[Param], bucket_mb: float
                            ) -> list[tuple[bool, list[int]]]:
    """(experts?, the elements of each parameter) of each flat bucket of
    `ShardedOptimizer`, in the order it builds them: per category (decay, tp-sharded,
    counted in the norm, expert), at most bucket_mb of fp32 each, a parameter larger
    than that alone in its own."""
    limit = int(bucket_mb * 2**20) // 4
    open_buckets: dict[tuple, list[int]] = {}
    closed: list[tuple[bool, list[int]]] = []
    for p in params:
        key = (p.matrix, p.tp_sharded, p.counted, p.expert)
        current = open_buckets.setdefault(key, [])
        if current and sum(current) + p.numel > limit:
            closed.append((p.expert, current))
            current = open_buckets[key] = []
        current.append(p.numel)
    return closed + [(key[3], b) for key, b in open_buckets.items() if b]


def optimizer_bucket_params(params: list[Param], bucket_mb: float) -> list[list[int]]:
    """The elements of each parameter of each flat bucket of `ShardedOptimizer`."""
    return [b for _, b in optimizer_bucket_groups(params, bucket_mb)]


def optimizer_buckets(params: list[Param], bucket_mb: float) -> list[int]:
    """Elements of each flat bucket of `ShardedOptimizer`."""
    return [sum(b) for b in optimizer_bucket_params(params, bucket_mb)]


def sharded_elements(params: list[Param], dp: int, bucket_mb: float, precision: str,
                     ep: int = 1) -> int:
    """Elements of this rank's slices in `ShardedOptimizer`: each bucket padded to a
    multiple of dp, 1/dp of each."""
    # Experts' buckets are sharded over the dp / ep ranks holding the same experts.
    return sum(-(-sum(b) // (dp // ep if expert else dp))
               for expert, b in optimizer_bucket_groups(params, bucket_mb))


def reducer_bucket_params(numels: list[int], bucket_mb: float, element_bytes: int
                          ) -> list[list[int]]:
    """The parameters' elements of each flat bucket of `GradientReducer`
    (`gradient_buckets`): the parameters in reverse order, consecutive ones up to
    bucket_mb of their own dtype."""
    limit = int(bucket_mb * 2**20)
    buckets: list[list[int]] = []
    size = 0
    for n in reversed(numels):
        if buckets and size + n * element_bytes <= limit:
            buckets[-1].append(n)
            size += n * element_bytes
        else:
            buckets.append([n])
            size = n * element_bytes
    return buckets


def reducer_buckets(numels: list[int], bucket_mb: float, element_bytes: int) -> list[int]:
    """Elements of each flat bucket of `GradientReducer`."""
    return [sum(b) for b in reducer_bucket_params(numels, bucket_mb, element_bytes)]


def all_reduce_peak(numels: list[int], bucket_mb: float, param_element: int,
                    grad_element: int) -> float:
    """Peak above the gradients of `GradientReducer.reduce`: bucket by bucket, the flat
    concatenation of its gradients (`flat.pack`), which then replaces them; the previous
    bucket's gradients are released before it is allocated."""
    return max((grad_element * sum(bucket)
                for bucket in reducer_bucket_params(numels, bucket_mb, param_element)),
               default=0.0)


def master_bytes(train: DictConfig) -> int:
    """Bytes of an element of `ShardedOptimizer`'s slices and of their AdamW moments:
    fp32 master weights, or bf16 for pure bf16 (train.master_weights=false)."""
    return 2 if train.precision == "bf16" and not train.master_weights else 4


def gradient_bytes(train: DictConfig) -> int:
    """Bytes of an accumulated gradient element: fp32 `main_grad` under
    train.fp32_grad_accumulation, else the parameters' dtype."""
    return 4 if train.fp32_grad_accumulation else param_bytes(train.precision)


def comm_bytes(cfg: DictConfig) -> tuple[int, int]:
    """Bytes of an element of the sharded optimizer's dp collectives: (gradients'
    reduce-scatter, weights' all-gather): the parameters' dtype, fp32 gradients under
    train.fp32_grad_accumulation, both fp32 with parallel.zero1_comm_dtype=fp32."""
    t = cfg.train
    fp32 = cfg.parallel.zero1_comm_dtype == "fp32"
    grads = 4 if fp32 or t.fp32_grad_accumulation else param_bytes(t.precision)
    return grads, 4 if fp32 else param_bytes(t.precision)


def sharded_reduction(cfg: DictConfig, layout: Layout, params: list[Param]
                      ) -> tuple[float, float]:
    """(peak, end) above the gradients' bytes of `ShardedOptimizer.reduce_gradients`,
    replayed bucket by bucket as it runs eagerly (an upper bound of what the XLA
    compiler keeps live). Bucket i (N elements, P padded, d the dp size, c, g and m the
    bytes of a communicated, an accumulated gradient and a slice element); the previous
    bucket's gradients are released when its list is replaced, before anything of
    bucket i is allocated:
    1. `flat.pack`: the gradients cast to c (N c; none when g = c), then `flat`, P c
       bytes, while the previous bucket's flat is still bound (unless it became the
       kept gradient);
    2. the casts released, the reduce-scatter output (P/d c; d=1: the flat buffer
       itself) and its cast to the slice's dtype (none when c = m), kept as the slice's
       gradient (m P/d) while the bucket's N g bytes of gradients are released.
    `end`: what the slices' gradients hold beyond the gradients they replaced (positive
    at dp=1: 4 bytes for 2 of bf16)."""
    g, (c, _), m = gradient_bytes(cfg.train), comm_bytes(cfg), master_bytes(cfg.train)
    d = layout.replicas
    held = peak = 0.0  # kept slices' gradients less released gradients so far
    lingering_flat = 0.0
    for bucket in optimizer_bucket_params(params, cfg.parallel.bucket_mb):
        n = sum(bucket)
        padded = -(-n // d) * d
        flat = c * padded
        copies = c * n if c != g else 0
        scattered = c * padded / d if d > 1 else 0
        kept = m * padded / d
        cast = kept if c != m else 0
        peak = max(peak, held + lingering_flat + copies + flat,
                   held + flat + scattered + cast)
        held += kept - g * n
        # The flat buffer stays bound until the next bucket's is returned.
        lingering_flat = 0 if (d == 1 and c == m) else flat
    return peak, held


def sharded_step_transient(cfg: DictConfig, layout: Layout, params: list[Param]) -> float:
    """Peak of the temporaries of `ShardedOptimizer.step`, beyond the slices: AdamW's on
    one slice (torch's single-tensor AdamW: the new sqrt and quotient of
    exp_avg_sq while the previous slice's `denom` is held, 3 x 4 P/d), then per bucket
    the slice cast to the weights' dtype w (P/d w, none for fp32) and the all-gathered
    weights (P w; d=1: the cast itself), the previous bucket's still held (measured
    against the trainer on CPU, tests/unit/test_plan.py). Pure bf16's slices are bf16;
    with stochastic rounding its AdamW works on fp32 copies of a slice's weights, moments
    and gradient, with the denominator and the rounding noise: about 7 x 4 P/d (an
    estimate, not measured)."""
    _, w = comm_bytes(cfg)
    m = master_bytes(cfg.train)
    d = layout.replicas
    slices = [-(-n // d) for n in optimizer_buckets(params, cfg.parallel.bucket_mb)]
    rounds = m == 2 and cfg.train.stochastic_rounding
    adam = (7 * 4 if rounds else 3 * m) * max(slices, default=0)
    gather = previous = 0.0
    for size in slices:
        cast = size * w if w != m else 0
        gathered = size * d * w if d > 1 else 0  # d=1: the gather returns the cast
        gather = max(gather, previous + cast + gathered)
        previous = gathered if d > 1 else cast
    return max(adam, gather)


def gradient_sync_bytes(cfg: DictConfig, layout: Layout, params: list[Param]) -> float:
    """The peak, above the parameters' gradients, of the buffers the gradient reduction
    and the optimizer step build after backward (`Trainer.forward_backward`: tp, then
    dp; then the step), one bucket at a time:

    - tp (`GradientReducer` over the tp group: the norms under sequence parallelism and
      the replicated k/v weights): one flat bucket of gradients, in their dtype, which
      then replaces them;
    - dp with the sharded optimizer: `sharded_reduction`, then the step's temporaries
      (`sharded_step_transient`) on top of what the reduction left;
    - dp otherwise (`GradientReducer` all-reduce): one flat bucket of gradients.
    """
    t, bucket_mb = cfg.train, cfg.parallel.bucket_mb
    pe, ge = param_bytes(t.precision), gradient_bytes(t)
    tp_peak = 0.0
    if layout.tp > 1:
        replicated = [p.numel for p in params
                      if not p.tp_sharded and (p.matrix or layout.sequence_parallel)]
        tp_peak = all_reduce_peak(replicated, bucket_mb, pe, ge)
    dp_peak = 0.0
    if sharded_optimizer(t, layout):
        reduction, end = sharded_reduction(cfg, layout, params)
        dp_peak = max(reduction, end + sharded_step_transient(cfg, layout, params))
    elif layout.replicas > 1:
        dp_peak = all_reduce_peak([p.numel for p in params], bucket_mb, pe, ge)
    return max(tp_peak, dp_peak)


def static_bytes(cfg: DictConfig, layout: Layout, params: list[Param], frozen: int = 0
                 ) -> dict[str, int]:
    """Parameters, gradients, optimizer moments and master weights on a pipeline rank
    training `params` (its `rank_params`) and holding `frozen` elements more (a LoRA
    run's base: weights only)."""
    t = cfg.train
    numel = sum(p.numel for p in params)
    pe = param_bytes(t.precision)
    grads = numel * gradient_bytes(t)
    if sharded_optimizer(t, layout):
        slice_numel = sharded_elements(params, layout.replicas, cfg.parallel.bucket_mb, t.precision,
                                       layout.ep)
        m = master_bytes(t)
        optimizer, master = 2 * m * slice_numel, m * slice_numel
    else:
        optimizer, master = 2 * numel * pe, 0
    return {"params": (numel + frozen) * pe, "grads": grads, "optimizer_states": optimizer,
            "master_weights": master}


@dataclass
class ActivationModel:
    """Saved-activation bytes of one micro-batch through one chunk."""

    layer: float  # one layer as saved for backward
    recompute: float  # what checkpointing rebuilds of one layer for its backward
    attention_scores: float  # the s x s buffers of one layer's attention backward
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


def activation_spec(cfg: DictConfig, layout: Layout) -> ActivationSpec:
    """What the family's `layer_activations` needs of the layout and settings. Under
    context parallelism the attention core is trntrain's tiled one (on every backend),
    which keeps no s x s matrix."""
    return ActivationSpec(tp=layout.tp, sequence_parallel=layout.sequence_parallel,
                          element_bytes=activation_bytes(cfg.train.precision),
                          seq_len=cfg.train.seq_len,
                          fused_attention=fused_attention(cfg) or layout.cp > 1)


def context_attention_bytes(model: DictConfig, layout: Layout, seq_len: int, e: int
                            ) -> float:
    """Per sequence and layer, the bytes context parallelism's attention core
    (`trntrain.parallel.context`) holds during its backward beyond what a fused core
    saves (q, k, v, the output and its normaliser, in the family's accounting; the
    all-gather keeps only the rank's own keys and values between forward and backward),
    on a rank of L = seq_len / (2 cp) tokens per chunk: fp32 copies of q, the output's
    gradient and dq (3 x 4 x 2L q_local); the keys and values it holds with their fp32
    gradients (all-gather: the whole sequence's, 2 (e + 4) S kv_local; ring: those
    visiting and those received, 2 x 2 (e + 4) 2L kv_local); and one tile's scores,
    probabilities and their gradient (3 x 4 x heads x L x min(L, KEY_TILE)) with its
    keys and values expanded to the query heads (2 x 4 x min(L, KEY_TILE) q_local)."""
    from trntrain.parallel.context import KEY_TILE

    tp, cp = layout.tp, layout.cp
    heads = model.n_heads // tp
    hd = family_head_dim(model)
    kv = kv_heads(model)
    kv_local = (kv // tp if tp <= kv else 1) * hd
    q_local = heads * hd
    local = seq_len // cp
    chunk = local // 2
    cols = min(chunk, KEY_TILE)
    copies = 3 * 4 * local * q_local
    if layout.cp_attention == "allgather":
        held = 2 * (e + 4) * seq_len * kv_local
    else:
        held = 2 * 2 * (e + 4) * local * kv_local
    tile = 3 * 4 * heads * chunk * cols + 2 * 4 * cols * q_local
    return copies + held + tile


def activation_model(cfg: DictConfig, layout: Layout) -> ActivationModel:
    m, t = cfg.model, cfg.train
    tokens = layout.micro_batch_size * t.seq_len // layout.cp  # on this rank
    h, tp = m.dim, layout.tp
    head_dim = family_head_dim(m)
    e = activation_bytes(t.precision)
    h_n = h / tp if layout.sequence_parallel else h
    norm = 4 * h_n + 4 + e * h_n
    # One layer, as its family's block saves it (Llama's: the module docstring).
    one = family_of(m).layer_activations(m, activation_spec(cfg, layout))
    mode = layout.activation_checkpointing
    if mode == "full":
        # The block's input; its backward first recomputes the whole block.
        layer, recompute = one.checkpointed, one.saved
    elif mode == "selective":
        layer, recompute = one.selective, one.selective_recompute
    else:
        layer, recompute = one.saved, 0.0
    scores = one.attention_scores
    if layout.cp > 1:
        scores = context_attention_bytes(m, layout, t.seq_len, e) * layout.cp / t.seq_len
    v_local = m.vocab_size / tp
    # Embedding: token ids (int64), under tp also the shifted ids and an out-of-range mask.
    first = 8 + (9 if tp > 1 else 0)
    # Final norm, the head's (gathered) input, the loss's fp32 softmax and int64 labels
    # (under tp also local ids and a mask).
    last = norm + e * h + 4 * v_local + 8 + (9 if tp > 1 else 0)
    per_chunk = 2 * m.max_seq_len * head_dim * 4 if e == 4 else 0
    return ActivationModel(layer * tokens, recompute * tokens, scores * tokens,
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
        params = rank_params(cfg.model, layout, cfg.train.seq_len, rank,
                             getattr(cfg, "peft", None))
    if act is None:
        act = activation_model(cfg, layout)
    out: dict[str, float] = dict(static_bytes(cfg, layout, params,
                                              frozen_numel(cfg, layout, rank)))
    out["reference_weights"] = reference_bytes(cfg, layout, rank)
    sizes = chunk_layers(cfg.model, cfg.train.seq_len, layout.chunks)
    last = layout.chunks - 1
    weights = tuple(sizes[c] * act.layer + (act.first if c == 0 else 0)
                    + (act.last if c == last else 0) for c in rank_chunks(layout)[rank])
    out["activations"] = (peak_in_flight(layout.schedule, layout.pp, layout.virtual_pp,
                                         layout.microbatches, rank, weights)
                          + act.per_chunk * len(weights))
    # One layer at a time is recomputed and differentiated: at most one of each, on
    # top of the micro-batches in flight.
    out["recompute"] = act.recompute
    out["attention_scores"] = act.attention_scores
    out["gradient_sync"] = gradient_sync_bytes(cfg, layout, params)
    return out


def memory_per_core(cfg: DictConfig, layout: Layout, params: list[list[Param]]
                    ) -> tuple[int, dict[str, float]]:
    """(pipeline rank, its bytes by part) of the rank that needs the most memory;
    `params`: the layout's `all_rank_params`."""
    act = activation_model(cfg, layout)
    stages = [stage_memory(cfg, layout, r, params[r], act) for r in range(layout.pp)]
    rank = max(range(layout.pp), key=lambda r: sum(stages[r].values()))
    return rank, stages[rank]
