"""Structured configs: the types behind every key of `conf/`.

Each config group has a dataclass here, registered in Hydra's ConfigStore as the
schema its YAML files extend, so Hydra rejects unknown keys and wrong types while
composing. Semantic checks that need several keys at once live in `validate.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class RunConfig:
    # None: runs/<timestamp> (a sweep: <sweep dir>/<job number>), agreed by all ranks.
    dir: str | None = None
    # Reuse a run directory that already holds metrics.jsonl, replacing its files.
    overwrite: bool = False


@dataclass
class RopeScalingConfig:
    """Llama-3.1 scaling: long wavelengths slowed by `factor`, short ones kept."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelConfig:
    name: str = MISSING
    family: str = "llama"
    dim: int = MISSING
    n_layers: int = MISSING
    n_heads: int = MISSING
    # None: multi-head attention (n_kv_heads = n_heads).
    n_kv_heads: int | None = None
    vocab_size: int = MISSING
    ffn_hidden_dim: int = MISSING
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama-3.1 frequency-dependent scaling (factor, low/high_freq_factor, original length).
    rope_scaling: RopeScalingConfig | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Size of an attention head; None: dim / n_heads (set where heads are wider or
    # narrower than a split of the width, as in Qwen3).
    head_dim: int | None = None
    # Mixture of experts (families mixtral, qwen3_moe; docs/moe.md): experts per MoE
    # layer (None: a dense model) and experts each token is routed to.
    num_experts: int | None = None
    top_k: int = 2
    # Hidden width of one expert; None: ffn_hidden_dim.
    moe_ffn_hidden_dim: int | None = None
    # Divide the top-k router probabilities by their sum (Mixtral always; Qwen3-MoE's flag).
    norm_topk_prob: bool = True
    # Weight of the load-balancing loss (Switch Transformer) and of the router z-loss.
    router_aux_loss_coef: float = 0.0
    router_z_loss_coef: float = 0.0
    # "layer": the load-balancing loss of each layer, averaged (Switch, Megatron,
    # torchtitan); "global": the routing of all layers pooled before the product, as
    # transformers computes it (pp=1 only).
    router_aux_loss_pooling: str = "layer"
    # None: dropless (every token reaches its experts; cpu/cuda); a number c: each expert
    # takes at most ceil(c x tokens x top_k / num_experts) assignments per micro-batch,
    # the rest pass through the residual (static shapes: required on xla/neuron).
    capacity_factor: float | None = None


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    # None: world size / (tp * pp).
    dp: int | None = None
    # Expert parallelism: the experts of each MoE layer sharded over ep ranks carved out
    # of dp (ep divides dp and model.num_experts; consecutive dp ranks form a group).
    ep: int = 1
    # Context parallelism: each sequence split over cp ranks in 2 * cp chunks, rank i
    # holding chunks i and 2 * cp - 1 - i (causal work balanced); ranks: tp innermost,
    # then cp, then dp, then pp.
    cp: int = 1
    # How attention crosses the shards: auto (allgather on xla and neuron, ring
    # elsewhere) | allgather (keys and values all-gathered) | ring (passed around the
    # ring, needs point-to-point send and receive: cpu, cuda).
    cp_attention: str = "auto"
    # Shard norms and residual activations along the sequence over the tp group
    # (all-gather / reduce-scatter instead of all-reduce).
    sequence_parallel: bool = False
    # ZeRO-1: optimizer states and fp32 master weights sharded over dp.
    zero1: bool = False
    # dtype of the sharded optimizer's dp collectives (ZeRO-1, bf16 master weights over
    # dp): param (the gradients' and parameters' dtype: bf16 on bf16 runs, fp32 gradients
    # under train.fp32_grad_accumulation) | fp32.
    zero1_comm_dtype: str = "param"
    # none | full (every transformer block) | selective (the attention core)
    activation_checkpointing: str = "none"
    # Pipeline: model chunks per pp rank (interleaving), the schedule, the micro-batches
    # per step (None: global batch / (dp * train.micro_batch_size)), the transport.
    virtual_pp: int = 1
    # gpipe | 1f1b | interleaved_1f1b
    schedule: str = "1f1b"
    microbatches: int | None = None
    # auto (allgather on XLA, isend elsewhere) | isend | allgather
    pp_transport: str = "auto"
    # Gradients are all-reduced over dp in flat buckets of about this size.
    bucket_mb: float = 25.0


@dataclass
class TrainConfig:
    seq_len: int = 128
    # Sequences per optimizer step, summed over data-parallel ranks.
    global_batch_size: int = 16
    # Sequences per forward/backward on one data-parallel rank; None: global / dp
    # (no gradient accumulation).
    micro_batch_size: int | None = None
    max_steps: int = 600
    seed: int = 1234
    # fp32 | bf16 (bf16 weights and activations) | bf16_autocast (fp32 weights, bf16 matmuls)
    precision: str = "fp32"
    # bf16: keep fp32 master weights in the optimizer (false: pure bf16, worse).
    master_weights: bool = True
    # bf16 with master weights: sum micro-batch gradients in fp32 rather than bf16.
    fp32_grad_accumulation: bool = False
    # Pure bf16 (precision bf16, master_weights false): round the optimizer's bf16
    # weights and moments stochastically (software on cpu/cuda, seeded; the runtime's on
    # neuron); false: round to nearest, for comparison.
    stochastic_rounding: bool = True
    # A non-finite loss or gradient norm: stop (before applying it), skip the step
    # (weights and optimizer state unchanged; every rank agrees), or ignore (no check:
    # the check reads the norm back every step, which lazy backends do at logging steps).
    nonfinite: str = "stop"
    # Stop a rank that makes no progress (a step, a collective) for this many seconds,
    # naming what it waits in; 0 disables. Graph compilation on Neuron counts: raise it.
    watchdog_s: float = 1800.0
    eval_every: int = 100
    eval_batches: int = 8


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3
    # The cosine decays to min_lr_ratio * lr at train.max_steps.
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    # cosine | linear | constant (after warm-up)
    decay: str = "cosine"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    # Clip the global gradient norm to this value; 0 disables clipping.
    max_grad_norm: float = 1.0


@dataclass
class DataConfig:
    source: str = MISSING
    # Fraction of documents held out for evaluation.
    val_fraction: float = 0.02
    # Several sources mixed by weight, e.g. [{weight: 0.7, path: a}, {weight: 0.3,
    # source: jsonl, path: b.jsonl}]: each entry is this data config with its keys
    # replaced by the entry's. Empty: this source alone.
    blend: list[Any] = field(default_factory=list)
    # Attention stays within a document (documents end at the end-of-text token) and
    # rotary positions restart at each: as if each were trained alone.
    document_masking: bool = False


@dataclass
class CorpusDataConfig(DataConfig):
    """The Python standard library's source files, byte-level tokenized."""

    source: str = "corpus"
    # None: the running interpreter's standard library.
    root: str | None = None
    # Stop reading files after this many bytes (None: read them all).
    max_bytes: int | None = None


@dataclass
class SyntheticDataConfig(DataConfig):
    """Uniform random tokens: for benchmarks, the loss cannot fall."""

    source: str = "synthetic"
    num_tokens: int = 1_000_000


@dataclass
class IndexedDataConfig(DataConfig):
    """A Megatron-Core indexed dataset (<path>.bin + <path>.idx), memory-mapped."""

    source: str = "indexed"
    # The prefix: `data/corpus_text_document` for data/corpus_text_document.{bin,idx}.
    path: str | None = None
    # The tokenizer that wrote it (byte, a tokenizer.json or tiktoken file), to check
    # model.vocab_size before the run; None: token ids are checked as they are read.
    tokenizer: str | None = None
    eot_token: str | None = None


@dataclass
class TextFilesDataConfig(DataConfig):
    # A file, a directory or a glob.
    path: str | None = None
    # byte | the path of a Hugging Face tokenizer.json (or its directory) | the path of
    # a tiktoken BPE file (e.g. Llama 3's tokenizer.model).
    tokenizer: str = "byte"
    # The token put between documents; None: the tokenizer's end-of-text token.
    eot_token: str | None = None


@dataclass
class JsonlDataConfig(TextFilesDataConfig):
    """JSON lines, a document per line, tokenized at start-up."""

    source: str = "jsonl"
    text_key: str = "text"
    # fail: stop at the first malformed line; skip: skip such lines and count them.
    on_bad_line: str = "fail"


@dataclass
class TextDataConfig(TextFilesDataConfig):
    """Plain UTF-8 text files, a document per file, tokenized at start-up."""

    source: str = "text"


@dataclass
class HFDataConfig(TextFilesDataConfig):
    """A Hugging Face dataset on local disk (save_to_disk, or parquet/arrow/json files)."""

    source: str = "hf"
    # The split of a saved DatasetDict.
    split: str = "train"
    text_key: str = "text"
    # A column of token ids to read as they are, instead of tokenizing text_key.
    tokens_key: str | None = None


@dataclass
class ChatDataConfig(TextFilesDataConfig):
    """Conversations in JSON lines (`messages`, or `prompt`/`completion`), rendered with
    the tokenizer's chat template and packed whole into windows (docs/fine-tuning.md)."""

    source: str = "chat"
    # demo: the conversations shipped with trntrain (trntrain/data/examples/).
    path: str | None = "demo"
    # The tokens the loss counts: assistant (the assistant turns' own, their end-of-turn
    # token included) | all.
    train_on: str = "assistant"
    # Pack whole conversations into train.seq_len windows (first-fit decreasing), each
    # attending only to itself; false: one conversation per window, padded.
    packing: bool = True
    # A conversation longer than a window: truncate (keep its start) | drop | fail.
    too_long: str = "truncate"
    # fail: stop at the first bad line (malformed, or one its template cannot render);
    # skip: skip such lines and count them.
    on_bad_line: str = "fail"


@dataclass
class PreferenceDataConfig(TextFilesDataConfig):
    """Preference pairs in JSON lines (`prompt`, `chosen`, `rejected`), rendered with the
    tokenizer's chat template, one pair per row (docs/preference.md)."""

    source: str = "preference"
    # demo: pairs of a learnable preference shipped with trntrain.
    path: str | None = "demo"
    # A pair whose two conversations do not fit one row of train.seq_len: fail | drop.
    too_long: str = "fail"
    on_bad_line: str = "fail"


DATA_SCHEMAS: dict[str, type[DataConfig]] = {
    "corpus": CorpusDataConfig,
    "synthetic": SyntheticDataConfig,
    "indexed": IndexedDataConfig,
    "jsonl": JsonlDataConfig,
    "text": TextDataConfig,
    "hf": HFDataConfig,
    "chat": ChatDataConfig,
    "preference": PreferenceDataConfig,
}


# The checkpoint group's keys include `async`, a Python keyword no dataclass field may
# have: its schema is a struct-mode dict, its types are checked in validate.py.
CHECKPOINT_DEFAULTS: dict[str, Any] = {
    # none | dcp | hf
    "name": "none",
    # None: <run.dir>/checkpoints, so that a run directory is self-contained.
    "dir": None,
    # Save every N optimizer steps (0: only at the end) and at the last step.
    "every": 0,
    # Keep this many newest checkpoints (0: all).
    "keep": 2,
    # auto: continue from the newest complete checkpoint in the directory, if any;
    # never; or a checkpoint directory's path.
    "resume": "auto",
    # Save in the background after a staging copy; training goes on.
    "async": False,
    # Starting weights: a Hugging Face Llama directory (safetensors + config.json).
    "init_from": None,
}


@dataclass
class BackendConfig:
    # auto | cpu | cuda | xla | neuron
    name: str = "auto"
    # Seconds a collective may wait before the process group gives up.
    timeout_s: float = 600.0
    # xla, neuron: the PJRT device (CPU, CUDA, NEURON); None: $PJRT_DEVICE, else the
    # backend's own (CPU for xla, NEURON for neuron).
    pjrt_device: str | None = None
    # xla, neuron: persistent compiled-graph cache, ideally on storage all nodes share.
    compile_cache_dir: str | None = None
    # neuron: neuronx-cc optimisation level (2, the compiler's own default and what AWS's
    # training recipes run, which pass no -O flag).
    neuron_opt_level: int = 2
    # neuron: further neuronx-cc flags, appended to NEURON_CC_FLAGS.
    neuron_cc_flags: str = ""
    # neuron: stochastic rounding of bf16 in the runtime; None: as train.stochastic_rounding
    # for pure bf16 (train.precision=bf16 with train.master_weights=false), else off.
    stochastic_rounding: bool | None = None
    # neuron: NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS, graphs the runtime queues ahead
    # of the host (AWS: 3 for tp runs, 7 for tp x pp runs).
    async_exec_max_inflight_requests: int = 3
    # neuron: trace this many steps to extract graphs for neuron_parallel_compile and
    # skip real work (also on when neuron_parallel_compile sets
    # NEURON_EXTRACT_GRAPHS_ONLY).
    precompile: bool = False
    precompile_steps: int = 3
    # xla, neuron: a graph compiled after warm-up (a step or evaluation whose inputs or
    # traced values changed) is reported (warn), stops the run (error) or is ignored.
    recompile: str = "warn"


@dataclass
class ClusterConfig:
    name: str = "local"
    nodes: int = 1
    # Worker processes per node, one per NeuronCore (or GPU); None on `local`: any.
    procs_per_node: int | None = None
    # Accelerator memory per process, GiB (None: not a constraint).
    memory_per_core_gib: float | None = None
    # Of that, what the device runtime keeps per process for itself (compiled code,
    # scratchpad, DMA rings, collective buffers), GiB: the planner's layouts must fit in
    # memory_per_core_gib - reserved_memory_gib. Each cluster file gives its source.
    reserved_memory_gib: float = 0.0
    # Dense BF16 peak of one core (process), FLOP/s.
    peak_flops_per_core: float | None = None
    # Interconnects, for the planner: within a node (NeuronLink) and between nodes (EFA).
    intra_node_gbps: float | None = None
    inter_node_gbps: float | None = None
    # EFA network interfaces per node, requested by the launchers (Kubernetes'
    # vpc.amazonaws.com/efa); None: not an EFA instance.
    efa_devices: int | None = None


@dataclass
class LoggingConfig:
    # Write a metrics record every N optimizer steps (and at the first and last).
    every: int = 10
    progress_bar: bool = True
    # Python logging level of rank 0 on the console (every rank logs to
    # <run.dir>/logs/rank_<r>.log at this level).
    level: str = "INFO"
    # Where metric records go, several at once: console, jsonl (metrics.jsonl),
    # tensorboard (<run.dir>/tensorboard), wandb (offline), mlflow (local files).
    sinks: list[str] = field(default_factory=lambda: ["console", "jsonl"])


@dataclass
class PlanConfig:
    """`trntrain plan`: the memory and step-time model of a layout (trntrain/plan/)."""

    # Enumerate the valid layouts of the model on the cluster, rank those that fit.
    search: bool = False
    # text | json
    format: str = "text"
    # Fraction of the peak FLOP/s that matmuls sustain. 0.5: large bf16 matmuls reach
    # about half the dense peak on NeuronCore-v2 and on GPUs once the elementwise work,
    # layout changes and kernel launches between them are counted; calibrate it from
    # a run's measured MFU.
    compute_efficiency: float = 0.5
    # Layouts shown by a search (text format).
    top: int = 10
    # Whether attention keeps no s x s matrix for backward (a flash-style kernel);
    # None: by backend (false on xla/neuron and on trn* clusters, true elsewhere).
    fused_attention: bool | None = None


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning (trntrain/peft/): LoRA adapters on a frozen base."""

    # none | lora
    name: str = "none"
    # LoRA: the adapters' inner dimension r, and alpha (the update is scaled by alpha / r).
    rank: int = 8
    alpha: float = 16.0
    # Dropout on the adapters' input (0: none; masks are drawn per tp rank).
    dropout: float = 0.0
    # Hugging Face module names the adapters attach to (q_proj, k_proj, v_proj, o_proj,
    # gate_proj, up_proj, down_proj), or [all-linear]: every linear layer of the blocks.
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # LoRA starts from checkpoint.init_from's weights; true allows a randomly
    # initialised base instead (from-scratch experiments).
    allow_random_base: bool = False


@dataclass
class ObjectiveConfig:
    """What the model is trained to minimise (trntrain/objective/, docs/preference.md)."""

    # causal_lm (next-token cross-entropy) | dpo | orpo | simpo (on data=preference)
    name: str = "causal_lm"
    # dpo: the KL weight; orpo: the odds-ratio term's weight (lambda); simpo: the reward
    # scale.
    beta: float = 0.1
    # dpo: sigmoid (the DPO paper) | ipo | hinge
    loss_type: str = "sigmoid"
    # dpo (sigmoid) and simpo: the assumed probability that a pair's label is flipped
    # (conservative DPO); 0: none.
    label_smoothing: float = 0.0
    # dpo: model (a frozen copy of the initial weights; under peft=lora the base with
    # the adapters off) | precomputed (one pass before training, stored in run.dir)
    reference: str = "model"
    # simpo: the target reward margin.
    gamma: float = 1.0


@dataclass
class TrntrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = MISSING
    parallel: ParallelConfig = MISSING
    train: TrainConfig = MISSING
    optim: OptimConfig = MISSING
    data: Any = MISSING
    checkpoint: Any = MISSING
    backend: BackendConfig = MISSING
    cluster: ClusterConfig = MISSING
    logging: LoggingConfig = MISSING
    plan: PlanConfig = field(default_factory=PlanConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)


def register_configs() -> None:
    """Register the schemas that `conf/config.yaml` and `conf/data/*.yaml` extend."""
    cs = ConfigStore.instance()
    cs.store(name="trntrain_schema", node=TrntrainConfig)
    # The data group's options differ in their keys, so each has its own schema.
    for name, schema in DATA_SCHEMAS.items():
        cs.store(group="schema/data", name=name, node=schema)
    cs.store(group="schema/checkpoint", name="base", node=CHECKPOINT_DEFAULTS)
