"""Checks of a composed config that span several keys, run before any process group.

Hydra and the structured configs already reject unknown keys, unknown group
options and wrong types; this module checks values and their combinations. Each
failure is one `ConfigError` naming the key, the value it got and what is valid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from trntrain.errors import UserError

PRECISIONS = ("fp32", "bf16", "bf16_autocast")
LR_DECAYS = ("cosine", "linear", "constant")
PJRT_DEVICES = ("CPU", "CUDA", "NEURON", "TPU")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(UserError):
    """A config value that cannot work; the message is meant for the user as is."""

    def __init__(self, key: str, got: Any, valid: str, why: str = "") -> None:
        self.key = key
        reason = f" {why}" if why else ""
        super().__init__(f"{key}={got!r} is invalid:{reason} valid: {valid}.")


def require(ok: bool, key: str, got: Any, valid: str, why: str = "") -> None:
    if not ok:
        raise ConfigError(key, got, valid, why)


def data_parallel_size(cfg: DictConfig, world_size: int) -> int:
    """The dp degree the config asks for, derived from the world size when unset."""
    p = cfg.parallel
    if p.dp is not None:
        return p.dp
    return max(world_size // (p.tp * p.pp * p.cp), 1)


def micro_batch_size(cfg: DictConfig, world_size: int) -> int:
    """train.micro_batch_size; unset, the per-rank share of the global batch split into
    parallel.microbatches (default 1)."""
    if cfg.train.micro_batch_size is not None:
        return cfg.train.micro_batch_size
    share = cfg.train.global_batch_size // data_parallel_size(cfg, world_size)
    return max(share // (cfg.parallel.microbatches or 1), 1)


def microbatches(cfg: DictConfig, world_size: int) -> int:
    """Micro-batches per optimizer step on each data-parallel rank."""
    per_step = micro_batch_size(cfg, world_size) * data_parallel_size(cfg, world_size)
    return max(cfg.train.global_batch_size // per_step, 1)


def validate(cfg: DictConfig, world_size: int) -> None:
    """Raise ConfigError for the first value that cannot work with `world_size` processes."""
    try:
        _validate_sections(cfg)
        _validate_known_keys(cfg)
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        _validate_model(cfg.model)
        _validate_parallel(cfg, world_size)
        _validate_train(cfg, world_size)
        _validate_optim(cfg)
        _validate_data(cfg)
        _validate_rest(cfg)
        _validate_peft(cfg)
        _validate_objective(cfg)
        validate_topology(cfg, world_size)
    except MissingMandatoryValue as err:
        raise ConfigError(err.full_key, "???", "a value: the key is mandatory") from None
    except OmegaConfBaseException as err:
        raise ConfigError(err.full_key or "config", getattr(err, "value", None),
                          "a value that resolves", f"{err.msg.splitlines()[0]};") from None


def _validate_sections(cfg: DictConfig) -> None:
    import dataclasses

    from trntrain.config.schema import TrntrainConfig

    sections = [f.name for f in dataclasses.fields(TrntrainConfig)]
    for key in cfg:
        require(key in sections, str(key), cfg.get(key, "???"),
                f"top-level keys {', '.join(sections)}", "not a section of the config;")
    for key in sections:
        require(key in cfg and not OmegaConf.is_missing(cfg, key) and cfg[key] is not None, key,
                "???", f"an option of the config group {key} (conf/{key}/)",
                "the section is missing;")


def _validate_known_keys(cfg: DictConfig) -> None:
    """Every key is one of its section's schema: a key added with `+` (Hydra lets `+`
    add any key, a misspelt one too) would otherwise be silently ignored."""
    import dataclasses

    from trntrain.config.schema import CHECKPOINT_DEFAULTS, DATA_SCHEMAS, TrntrainConfig

    schemas: dict[str, Any] = {f.name: f.default_factory if f.default_factory
                               is not dataclasses.MISSING else f.type
                               for f in dataclasses.fields(TrntrainConfig)}
    schemas["data"] = DATA_SCHEMAS.get(cfg.data.get("source")) if "source" in cfg.data else None
    for section in cfg:
        node = cfg[section]
        if section == "checkpoint":
            known = set(CHECKPOINT_DEFAULTS)
        else:
            schema = schemas.get(section)
            if isinstance(schema, str):  # an annotation under `from __future__ import`
                import trntrain.config.schema as module

                schema = getattr(module, schema.split(" ")[0], None)
            if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
                continue  # a plugin's data source: its own schema
            known = {f.name for f in dataclasses.fields(schema)}
        for key in node:
            require(key in known, f"{section}.{key}", node[key],
                    f"one of the keys of {section}: {', '.join(sorted(known))}",
                    "not a key of the config (added with '+', or misspelt?);")


# Largest counts a run can take: sample indices and token offsets stay well inside int64.
MAX_COUNT = 2**31 - 1


def _positive(node: DictConfig, prefix: str, *keys: str) -> None:
    for key in keys:
        value = node[key]
        require(0 < value <= MAX_COUNT, f"{prefix}.{key}", value,
                f"a positive integer up to {MAX_COUNT}")


def _validate_model(m: DictConfig) -> None:
    from trntrain.models import MODEL_FAMILIES

    require(m.family in MODEL_FAMILIES, "model.family", m.family,
            f"one of {sorted(MODEL_FAMILIES)}")
    _positive(m, "model", "dim", "n_layers", "n_heads", "vocab_size", "ffn_hidden_dim",
              "max_seq_len")
    n_kv = m.n_kv_heads if m.n_kv_heads is not None else m.n_heads
    require(n_kv > 0, "model.n_kv_heads", m.n_kv_heads, "a positive divisor of model.n_heads")
    require(
        m.n_heads % n_kv == 0, "model.n_kv_heads", m.n_kv_heads,
        f"a divisor of model.n_heads={m.n_heads}",
        "grouped-query attention shares each kv head among n_heads / n_kv_heads query heads;",
    )
    if m.head_dim is None:
        require(m.dim % m.n_heads == 0, "model.dim", m.dim,
                f"a multiple of model.n_heads={m.n_heads}, or set model.head_dim")
        require(
            (m.dim // m.n_heads) % 2 == 0, "model.dim", m.dim,
            f"a value with an even head dimension dim / n_heads (now {m.dim // m.n_heads})",
            "rotary embeddings rotate pairs of channels;",
        )
    else:
        require(m.head_dim > 0 and m.head_dim % 2 == 0, "model.head_dim", m.head_dim,
                "null (dim / n_heads) or a positive even integer",
                "rotary embeddings rotate pairs of channels;")
    require(m.norm_eps > 0, "model.norm_eps", m.norm_eps, "a positive float")
    _validate_experts(m)
    require(m.rope_theta > 0, "model.rope_theta", m.rope_theta, "a positive float")
    require(m.init_std > 0, "model.init_std", m.init_std, "a positive float")
    if m.rope_scaling is not None:
        s = m.rope_scaling
        require(s.factor >= 1, "model.rope_scaling.factor", s.factor, "a float >= 1")
        require(
            s.high_freq_factor > s.low_freq_factor, "model.rope_scaling.high_freq_factor",
            s.high_freq_factor, f"a float above low_freq_factor={s.low_freq_factor}",
        )


def _validate_experts(m: DictConfig) -> None:
    from trntrain.models import MODEL_FAMILIES

    moe = MODEL_FAMILIES[m.family].parallelize_experts is not None
    if not moe:
        require(m.num_experts is None, "model.num_experts", m.num_experts,
                f"null for model.family={m.family}, or an MoE family (mixtral, qwen3_moe)",
                f"the {m.family} family has no experts;")
        return
    require(m.num_experts is not None and 0 < m.num_experts <= MAX_COUNT, "model.num_experts",
            m.num_experts, "a positive number of experts per MoE layer")
    require(0 < m.top_k <= m.num_experts, "model.top_k", m.top_k,
            f"1 to model.num_experts={m.num_experts}", "each token is routed to top_k of "
            "the experts;")
    require(m.moe_ffn_hidden_dim is None or m.moe_ffn_hidden_dim > 0,
            "model.moe_ffn_hidden_dim", m.moe_ffn_hidden_dim,
            "null (model.ffn_hidden_dim) or a positive integer")
    require(m.capacity_factor is None or m.capacity_factor > 0, "model.capacity_factor",
            m.capacity_factor, "null (dropless) or a positive number, e.g. 1.25")
    for key in ("router_aux_loss_coef", "router_z_loss_coef"):
        require(m[key] >= 0, f"model.{key}", m[key], "a float >= 0")
    require(m.router_aux_loss_pooling in ("layer", "global"), "model.router_aux_loss_pooling",
            m.router_aux_loss_pooling, "'layer' (each layer's loss, averaged) or 'global' "
            "(all layers' routing pooled, as transformers computes it)")


def _validate_expert_parallel(cfg: DictConfig, world_size: int) -> None:
    from trntrain.backend import AUTO, BACKENDS, detect_backend
    from trntrain.models import MODEL_FAMILIES

    p, m = cfg.parallel, cfg.model
    moe = MODEL_FAMILIES[m.family].parallelize_experts is not None
    backend = detect_backend() if cfg.backend.name == AUTO else cfg.backend.name
    if moe and backend in BACKENDS and BACKENDS[backend].lazy:
        require(m.capacity_factor is not None, "model.capacity_factor", None,
                f"a number (e.g. 1.25) on backend {backend}",
                "dropless routing gives every expert as many tokens as the router sends it, "
                "a shape that changes every step (a graph compile each time on XLA);")
    if moe:
        require(m.router_aux_loss_pooling == "layer" or p.pp == 1,
                "model.router_aux_loss_pooling", m.router_aux_loss_pooling,
                f"'layer' with parallel.pp={p.pp}",
                "the pooled loss of a layer depends on the routing of every layer, which "
                "the other pipeline stages hold;")
        require(not p.sequence_parallel, "parallel.sequence_parallel", True,
                f"false with model.family={m.family}",
                "the router and the experts run on the whole sequence of every tp rank "
                "(experts are replicated over tp, not sharded);")
    require(0 < p.ep <= MAX_COUNT, "parallel.ep", p.ep, "a positive integer")
    if p.ep == 1:
        return
    require(moe, "parallel.ep", p.ep, f"1 for model.family={m.family}",
            "expert parallelism shards the experts of an MoE family (mixtral, qwen3_moe);")
    dp = data_parallel_size(cfg, world_size)
    require(dp % p.ep == 0, "parallel.ep", p.ep, f"a divisor of the data-parallel size {dp}",
            "expert-parallel groups are carved out of the data-parallel ranks;")
    require(m.num_experts % p.ep == 0, "parallel.ep", p.ep,
            f"a divisor of model.num_experts={m.num_experts}",
            "each expert-parallel rank holds num_experts / ep whole experts;")


def _validate_parallel(cfg: DictConfig, world_size: int) -> None:
    p = cfg.parallel
    _positive(p, "parallel", "tp", "pp", "cp")
    require(p.dp is None or p.dp > 0, "parallel.dp", p.dp, "null (derived) or a positive integer")
    _validate_tensor_parallel(cfg)
    _validate_pipeline(cfg, world_size)
    dp = data_parallel_size(cfg, world_size)
    cp = f" * cp={p.cp}" if p.cp > 1 else ""
    require(
        p.tp * p.cp * p.pp * dp == world_size,
        "parallel.dp" if p.dp is not None else "parallel.tp",
        p.dp if p.dp is not None else p.tp,
        f"sizes with tp * {'cp * ' if cp else ''}pp * dp = world size {world_size}",
        f"tp={p.tp}{cp} * pp={p.pp} * dp={dp} = {p.tp * p.cp * p.pp * dp} processes are "
        f"needed but {world_size} were started;",
    )
    _validate_context_parallel(cfg)
    require(p.bucket_mb > 0, "parallel.bucket_mb", p.bucket_mb, "a positive number of MiB")
    _validate_expert_parallel(cfg, world_size)
    from trntrain.parallel.zero import COMM_DTYPES

    require(p.zero1_comm_dtype in COMM_DTYPES, "parallel.zero1_comm_dtype", p.zero1_comm_dtype,
            f"one of {COMM_DTYPES}",
            "the sharded optimizer reduce-scatters gradients and all-gathers weights either "
            "in the parameters' dtype (param, as torch-xla's and neuronx-distributed's "
            "ZeRO-1 do) or in fp32;")
    from trntrain.parallel.activation_checkpointing import MODES

    require(p.activation_checkpointing in MODES, "parallel.activation_checkpointing",
            p.activation_checkpointing, f"one of {MODES}")


def context_attention(cfg: DictConfig) -> str:
    """parallel.cp_attention with auto resolved: allgather on a lazy backend (xla,
    neuron: static shapes, no point-to-point; with backend=auto also on a trn* cluster,
    as the planner sees one from elsewhere), ring elsewhere."""
    from trntrain.backend import AUTO, BACKENDS, detect_backend

    mode = cfg.parallel.cp_attention
    if mode != "auto":
        return mode
    if cfg.backend.name == AUTO and str(cfg.cluster.name).startswith("trn"):
        return "allgather"
    backend = detect_backend() if cfg.backend.name == AUTO else cfg.backend.name
    return "allgather" if backend in BACKENDS and BACKENDS[backend].lazy else "ring"


def _validate_context_parallel(cfg: DictConfig) -> None:
    from trntrain.backend import AUTO, BACKENDS, detect_backend
    from trntrain.models import MODEL_FAMILIES
    from trntrain.parallel.context import CP_ATTENTION

    p, t = cfg.parallel, cfg.train
    require(p.cp_attention in ("auto", *CP_ATTENTION), "parallel.cp_attention",
            p.cp_attention, f"one of {('auto', *CP_ATTENTION)}")
    if p.cp == 1:
        return
    require(t.seq_len % (2 * p.cp) == 0, "train.seq_len", t.seq_len,
            f"a multiple of 2 x parallel.cp = {2 * p.cp}",
            "context parallelism cuts each sequence into 2 x cp equal chunks, two per rank;")
    if p.sequence_parallel and p.tp > 1:
        require((t.seq_len // p.cp) % p.tp == 0, "train.seq_len", t.seq_len,
                f"a multiple of parallel.cp x parallel.tp = {p.cp * p.tp}",
                "sequence parallelism splits each cp rank's tokens evenly over the tp group;")
    family = MODEL_FAMILIES[cfg.model.family]
    require(family.context_parallel, "parallel.cp", p.cp, f"1 for model.family="
            f"{cfg.model.family}", "context parallelism is built for the dense families "
            f"({', '.join(sorted(n for n, f in MODEL_FAMILIES.items() if f.context_parallel))}); "
            "an MoE router's load-balancing loss would see a part of each sequence;")
    objective = cfg.get("objective")
    require(objective is None or objective.name == "causal_lm", "parallel.cp", p.cp,
            f"1 with objective={objective.name if objective is not None else ''}",
            "a preference objective scores whole responses, which context parallelism "
            "splits over ranks;")
    c = cfg.cluster
    if c.procs_per_node is not None:
        require(p.tp * p.cp <= c.procs_per_node, "parallel.cp", p.cp,
                f"at most cluster.procs_per_node / parallel.tp = {c.procs_per_node // p.tp} "
                f"on cluster={c.name}",
                "every layer exchanges keys and values within the cp group, and tp x cp "
                f"ranks beyond a node of {c.procs_per_node} would send them over the "
                "inter-node network instead of the node's own links;")
    backend = detect_backend() if cfg.backend.name == AUTO else cfg.backend.name
    if p.cp_attention == "ring" and backend in BACKENDS:
        require(not BACKENDS[backend].lazy, "parallel.cp_attention", "ring",
                f"allgather (or auto) on backend {backend}",
                "ring attention passes keys and values with point-to-point send and receive, "
                "which torch-xla runs as a collective_permute and a graph sync per transfer;")


def _validate_tensor_parallel(cfg: DictConfig) -> None:
    tp, m = cfg.parallel.tp, cfg.model
    if tp == 1:
        return
    n_kv = m.n_kv_heads if m.n_kv_heads is not None else m.n_heads
    why = "tensor parallelism splits attention heads, MLP columns and the vocabulary evenly;"
    require(m.n_heads % tp == 0, "parallel.tp", tp, f"a divisor of model.n_heads={m.n_heads}",
            why)
    require(n_kv % tp == 0 or tp % n_kv == 0, "parallel.tp", tp,
            f"a divisor or a multiple of model.n_kv_heads={n_kv} (kv heads are sharded, or "
            f"replicated when tp exceeds them)", why)
    require(m.ffn_hidden_dim % tp == 0, "parallel.tp", tp,
            f"a divisor of model.ffn_hidden_dim={m.ffn_hidden_dim}", why)
    require(m.vocab_size % tp == 0, "model.vocab_size", m.vocab_size,
            f"a multiple of parallel.tp={tp} (pad the vocabulary, e.g. "
            f"{-(-m.vocab_size // tp) * tp})", why)
    if cfg.parallel.sequence_parallel:
        require(cfg.train.seq_len % tp == 0, "train.seq_len", cfg.train.seq_len,
                f"a multiple of parallel.tp={tp}",
                "sequence parallelism splits each sequence evenly over the tp group;")


def _validate_pipeline(cfg: DictConfig, world_size: int) -> None:
    from trntrain.backend import AUTO, BACKENDS, detect_backend
    from trntrain.parallel.pipeline import TRANSPORTS
    from trntrain.parallel.pipeline_schedule import SCHEDULES

    p = cfg.parallel
    require(p.virtual_pp > 0, "parallel.virtual_pp", p.virtual_pp, "a positive integer")
    require(p.schedule in SCHEDULES, "parallel.schedule", p.schedule,
            f"one of {tuple(SCHEDULES)}")
    require(p.pp_transport == "auto" or p.pp_transport in TRANSPORTS, "parallel.pp_transport",
            p.pp_transport, f"one of {('auto', *TRANSPORTS)}")
    backend = detect_backend() if cfg.backend.name == AUTO else cfg.backend.name
    if p.pp > 1 and p.pp_transport != "auto" and backend in BACKENDS:
        fit = [t for t in TRANSPORTS if TRANSPORTS[t].lazy_ok]
        require(TRANSPORTS[p.pp_transport].lazy_ok or not BACKENDS[backend].lazy,
                "parallel.pp_transport", p.pp_transport,
                f"auto or {' or '.join(fit)} on backend {backend}",
                "torch-xla runs every send and receive as a collective_permute of its own "
                "followed by a graph sync, which serialises the pipeline at each transfer;")
    require(p.microbatches is None or p.microbatches > 0, "parallel.microbatches",
            p.microbatches, "null (derived) or a positive integer")
    if p.microbatches is not None and cfg.train.micro_batch_size is not None:
        dp = data_parallel_size(cfg, world_size)
        need = cfg.train.micro_batch_size * dp * p.microbatches
        require(need == cfg.train.global_batch_size, "parallel.microbatches", p.microbatches,
                f"train.global_batch_size / (train.micro_batch_size x dp) = "
                f"{cfg.train.global_batch_size / (cfg.train.micro_batch_size * dp):g}, or null",
                "micro-batches, their size and dp make up the global batch;")
    chunks = p.pp * p.virtual_pp
    require(chunks <= cfg.model.n_layers, "parallel.pp", p.pp,
            f"at most model.n_layers={cfg.model.n_layers} stages in all (pp x virtual_pp)",
            f"pp x virtual_pp = {chunks} chunks cannot each hold a layer;")
    if p.schedule == "interleaved_1f1b":
        require(p.virtual_pp >= 2, "parallel.virtual_pp", p.virtual_pp, "2 or more",
                "the interleaved schedule runs several chunks per rank;")
        if p.pp > 1:
            m = microbatches(cfg, world_size)
            require(m % p.pp == 0, "parallel.microbatches", m,
                    f"a multiple of parallel.pp={p.pp}",
                    "the interleaved schedule sends micro-batches through in groups of pp;")
    else:
        require(p.virtual_pp == 1, "parallel.virtual_pp", p.virtual_pp,
                f"1 for parallel.schedule={p.schedule} (interleaved_1f1b for more)")


def _validate_cluster(cfg: DictConfig) -> None:
    c = cfg.cluster
    require(c.nodes > 0, "cluster.nodes", c.nodes, "a positive integer")
    require(c.procs_per_node is None or c.procs_per_node > 0, "cluster.procs_per_node",
            c.procs_per_node, "null or a positive integer")
    limit = c.memory_per_core_gib
    require(c.reserved_memory_gib >= 0 and (limit is None or c.reserved_memory_gib < limit),
            "cluster.reserved_memory_gib", c.reserved_memory_gib,
            f"a size in GiB from 0 up to cluster.memory_per_core_gib={limit} (excluded)",
            "it is the part of a core's memory the device runtime keeps, which trntrain's "
            "tensors cannot use;")
    require(c.efa_devices is None or c.efa_devices > 0, "cluster.efa_devices", c.efa_devices,
            "null (no EFA) or the EFA interfaces of one node, e.g. 8 on trn1.32xlarge, 16 "
            "on trn1n.32xlarge")
    if c.procs_per_node is None:
        return
    tp = cfg.parallel.tp
    require(tp <= c.procs_per_node and c.procs_per_node % tp == 0, "parallel.tp", tp,
            f"a divisor of cluster.procs_per_node={c.procs_per_node} ({c.name})",
            "a tensor-parallel group must sit on one node's NeuronLink;")


def validate_topology(cfg: DictConfig, world_size: int) -> None:
    """On a named cluster, the processes started must fill its nodes exactly."""
    c = cfg.cluster
    if c.procs_per_node is None:
        return
    expected = c.nodes * c.procs_per_node
    require(world_size == expected, "cluster.nodes", c.nodes,
            f"the node count of the job: {world_size} processes were started but "
            f"cluster.nodes x cluster.procs_per_node = {c.nodes} x {c.procs_per_node} = "
            f"{expected} (use cluster=local to run on this machine)",
            f"cluster={c.name} expects every core of every node in use;")


def _validate_train(cfg: DictConfig, world_size: int) -> None:
    t = cfg.train
    _positive(t, "train", "seq_len", "global_batch_size", "max_steps", "eval_batches")
    require(t.micro_batch_size is None or 0 < t.micro_batch_size <= MAX_COUNT,
            "train.micro_batch_size", t.micro_batch_size,
            f"null (global batch / dp) or a positive integer up to {MAX_COUNT}")
    require(
        t.seq_len <= cfg.model.max_seq_len, "train.seq_len", t.seq_len,
        f"at most model.max_seq_len={cfg.model.max_seq_len}",
    )
    dp = data_parallel_size(cfg, world_size)
    mbs = micro_batch_size(cfg, world_size)
    per_step = mbs * dp
    require(
        t.global_batch_size % per_step == 0, "train.global_batch_size", t.global_batch_size,
        f"a multiple of train.micro_batch_size ({mbs}) x data-parallel size "
        f"({dp}) = {per_step}, e.g. {per_step * max(t.global_batch_size // per_step, 1)}",
    )
    require(t.precision in PRECISIONS, "train.precision", t.precision, f"one of {PRECISIONS}")
    require(t.nonfinite in ("stop", "skip", "ignore"), "train.nonfinite", t.nonfinite,
            "stop, skip or ignore")
    require(t.watchdog_s >= 0, "train.watchdog_s", t.watchdog_s, "seconds >= 0 (0: off)")
    require(t.eval_every >= 0, "train.eval_every", t.eval_every, "0 (no evaluation) or more")
    require(not t.fp32_grad_accumulation or (t.precision == "bf16" and t.master_weights),
            "train.fp32_grad_accumulation", t.fp32_grad_accumulation,
            "false, or true with train.precision=bf16 and train.master_weights=true",
            "fp32 gradients are summed for the fp32 master weights;")
    if t.precision == "bf16" and not t.master_weights and t.stochastic_rounding:
        from trntrain.backend import AUTO, detect_backend
        from trntrain.optim import SOFTWARE_ROUNDING_BACKENDS

        backend = detect_backend() if cfg.backend.name == AUTO else cfg.backend.name
        require(backend in (*SOFTWARE_ROUNDING_BACKENDS, "neuron"), "train.stochastic_rounding",
                True, f"false on backend {backend} (or backend cpu, cuda or neuron)",
                "it rounds in the optimizer on cpu and cuda and in the Neuron runtime; "
                "the xla backend has neither;")
        require(backend == "neuron" or cfg.optim.name == "adamw", "train.stochastic_rounding",
                True, f"false with optim.name={cfg.optim.name}",
                "the optimizer that rounds stochastically is AdamW;")


def _validate_optim(cfg: DictConfig) -> None:
    o = cfg.optim
    from trntrain.optim import OPTIMIZERS

    require(o.name in OPTIMIZERS, "optim.name", o.name, f"one of {tuple(OPTIMIZERS)}")
    require(o.lr > 0, "optim.lr", o.lr, "a positive float")
    require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", o.min_lr_ratio, "a float in [0, 1]")
    require(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "an integer >= 0")
    require(o.decay in LR_DECAYS, "optim.decay", o.decay, f"one of {LR_DECAYS}")
    require(
        len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", list(o.betas),
        "two floats in [0, 1), e.g. [0.9, 0.95]",
    )
    require(o.eps > 0, "optim.eps", o.eps, "a positive float")
    require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "a float >= 0")
    require(o.max_grad_norm >= 0, "optim.max_grad_norm", o.max_grad_norm,
            "a float >= 0 (0 disables clipping)")


def _validate_data(cfg: DictConfig) -> None:
    from trntrain.data.blend import data_entries

    for i, (_, entry) in enumerate(data_entries(cfg.data)):
        _validate_data_source(cfg, entry, f"data.blend[{i}]" if cfg.data.blend else "data")


def _validate_data_source(cfg: DictConfig, d: DictConfig, field: str) -> None:
    """One source's keys; `field` names them (data, or data.blend[i] in a blend)."""
    from trntrain.data import DATA_SOURCES

    require(d.source in DATA_SOURCES, f"{field}.source", d.source,
            f"one of {sorted(DATA_SOURCES)}")
    require(0 < d.val_fraction < 1, f"{field}.val_fraction", d.val_fraction, "a float in (0, 1)")
    if d.source == "chat":
        from trntrain.data.chat import TOO_LONG, TRAIN_ON

        require(not cfg.data.blend, f"{field}.source", d.source, "a source other than chat",
                "chat data (packed conversations) cannot be blended yet;")
        require(d.train_on in TRAIN_ON, f"{field}.train_on", d.train_on, " or ".join(TRAIN_ON))
        require(d.too_long in TOO_LONG, f"{field}.too_long", d.too_long, ", ".join(TOO_LONG))
    if d.source == "preference":
        from trntrain.data.preference import TOO_LONG as PAIR_TOO_LONG

        require(not cfg.data.blend, f"{field}.source", d.source, "a source other than "
                "preference", "preference pairs cannot be blended yet;")
        require(d.too_long in PAIR_TOO_LONG, f"{field}.too_long", d.too_long,
                " or ".join(PAIR_TOO_LONG))
    if "path" in d:
        require(bool(d.path), f"{field}.path", d.path,
                "a file, directory, glob or (for indexed) dataset prefix on this machine")
        DATA_SOURCES[d.source].check_files(d)
        if d.source == "preference":
            DATA_SOURCES[d.source].check_lengths(d, cfg.train.seq_len)
    if "on_bad_line" in d:
        require(d.on_bad_line in ("fail", "skip"), f"{field}.on_bad_line", d.on_bad_line,
                "fail or skip")
    source = DATA_SOURCES[d.source]
    require(not d.get("document_masking", False) or source.packed
            or source.marks_document_ends(d), f"{field}.document_masking", True,
            "false for this source", f"its stream does not mark where documents end (give "
            f"{field}.tokenizer, whose end-of-text token ends each document);")
    vocab = DATA_SOURCES[d.source].tokenizer_vocab_size(d, cfg.model)
    require(
        vocab is None or cfg.model.vocab_size >= vocab, "model.vocab_size",
        cfg.model.vocab_size, f"at least {vocab}, the vocabulary of {field}.source={d.source}",
    )


def _validate_rest(cfg: DictConfig) -> None:
    from trntrain.backend import AUTO, BACKENDS
    from trntrain.checkpoint import CHECKPOINTERS

    require(cfg.backend.name == AUTO or cfg.backend.name in BACKENDS, "backend.name",
            cfg.backend.name, f"one of {(AUTO, *BACKENDS)}")
    b = cfg.backend
    require(b.timeout_s > 0, "backend.timeout_s", b.timeout_s, "a positive number of seconds")
    require(b.pjrt_device is None or b.pjrt_device in PJRT_DEVICES, "backend.pjrt_device",
            b.pjrt_device, f"null or one of {PJRT_DEVICES}")
    require(b.neuron_opt_level in (1, 2, 3), "backend.neuron_opt_level", b.neuron_opt_level,
            "1, 2 or 3")
    require(b.precompile_steps > 0, "backend.precompile_steps", b.precompile_steps,
            "a positive integer")
    from trntrain.backend.recompile import POLICIES

    require(b.recompile in POLICIES, "backend.recompile", b.recompile, f"one of {POLICIES}")
    require(b.async_exec_max_inflight_requests > 0, "backend.async_exec_max_inflight_requests",
            b.async_exec_max_inflight_requests,
            "a positive number of graphs the Neuron runtime may queue (AWS: 3, or 7 with pp)")
    ck = cfg.checkpoint
    require(ck.name in CHECKPOINTERS, "checkpoint.name", ck.name,
            f"one of {sorted(CHECKPOINTERS)}")
    for key in ("every", "keep"):
        require(isinstance(ck[key], int) and not isinstance(ck[key], bool) and ck[key] >= 0,
                f"checkpoint.{key}", ck[key], "an integer >= 0")
    require(isinstance(ck["async"], bool), "checkpoint.async", ck["async"], "true or false")
    require(ck.resume in ("auto", "never") or Path(str(ck.resume)).is_dir(), "checkpoint.resume",
            ck.resume, "auto, never, or an existing checkpoint directory")
    require(ck.dir is None or isinstance(ck.dir, str), "checkpoint.dir", ck.dir,
            "null (<run.dir>/checkpoints) or a path")
    require(ck.init_from is None or Path(str(ck.init_from)).is_dir(), "checkpoint.init_from",
            ck.init_from, "null or an existing Hugging Face model directory")
    _validate_cluster(cfg)
    require(cfg.logging.every > 0, "logging.every", cfg.logging.every, "a positive integer")
    require(cfg.logging.level in LOG_LEVELS, "logging.level", cfg.logging.level,
            f"one of {LOG_LEVELS}")
    from trntrain.metrics import SINKS

    for sink in cfg.logging.sinks:
        require(sink in SINKS, "logging.sinks", list(cfg.logging.sinks),
                f"a list of {', '.join(SINKS)}")


PEFT_METHODS = ("none", "lora")


def _validate_peft(cfg: DictConfig) -> None:
    p = cfg.get("peft")
    if p is None:
        return
    require(p.name in PEFT_METHODS, "peft.name", p.name, f"one of {PEFT_METHODS}")
    if p.name != "lora":
        return
    from trntrain.models import MODEL_FAMILIES

    require(MODEL_FAMILIES[cfg.model.family].parallelize_experts is None, "peft.name", p.name,
            f"none for model.family={cfg.model.family}",
            "LoRA adapters on mixture-of-experts models are not implemented yet;")
    from trntrain.peft.lora import ALL_LINEAR, known_targets

    require(isinstance(p.rank, int) and 0 < p.rank <= MAX_COUNT, "peft.rank", p.rank,
            "a positive integer (the adapters' inner dimension, e.g. 8 or 16)")
    require(p.alpha > 0, "peft.alpha", p.alpha, "a positive number (updates scale by alpha / rank)")
    require(0 <= p.dropout < 1, "peft.dropout", p.dropout, "a probability in [0, 1)")
    known = known_targets(cfg.model)
    targets = list(p.target_modules)
    require(bool(targets) and all(t in known or t == ALL_LINEAR for t in targets),
            "peft.target_modules", targets, f"a list of {', '.join(known)}, or [{ALL_LINEAR}]",
            f"it must name linear layers of the {cfg.model.family} blocks;")
    require(cfg.checkpoint.init_from is not None or p.allow_random_base, "peft.name", p.name,
            "checkpoint.init_from=<a Hugging Face model directory>, or "
            "peft.allow_random_base=true for a from-scratch experiment",
            "LoRA trains adapters on a frozen base, and checkpoint.init_from is null (the base "
            "would be random weights);")


def _validate_objective(cfg: DictConfig) -> None:
    o = cfg.get("objective")
    if o is None:
        return
    from trntrain.objective import OBJECTIVES, PREFERENCE_OBJECTIVES
    from trntrain.objective.preference import LOSS_TYPES, REFERENCES

    require(o.name in OBJECTIVES, "objective.name", o.name, f"one of {OBJECTIVES}")
    pairs = cfg.data.get("source") == "preference"
    if o.name == "causal_lm":
        require(not pairs, "objective.name", o.name, f"one of {PREFERENCE_OBJECTIVES}",
                "data=preference holds pairs of responses, which only a preference "
                "objective (objective=dpo, orpo or simpo) trains on;")
        return
    require(pairs, "objective.name", o.name, "objective=causal_lm for this data, or "
            "data=preference", f"{o.name} compares a chosen and a rejected response of each "
            f"prompt, and data.source={cfg.data.get('source')} holds no preference pairs;")
    require(o.beta > 0, "objective.beta", o.beta, "a positive number (e.g. 0.1 for dpo)")
    require(0 <= o.label_smoothing < 0.5, "objective.label_smoothing", o.label_smoothing,
            "a probability in [0, 0.5)")
    if o.name == "dpo":
        require(o.loss_type in LOSS_TYPES, "objective.loss_type", o.loss_type,
                f"one of {LOSS_TYPES}")
        require(o.reference in REFERENCES, "objective.reference", o.reference,
                f"one of {REFERENCES}")
        require(o.loss_type == "sigmoid" or o.label_smoothing == 0, "objective.label_smoothing",
                o.label_smoothing, "0 for loss_type=" + o.loss_type,
                "label smoothing (conservative DPO) applies to the sigmoid loss;")
    if o.name == "simpo":
        require(o.gamma >= 0, "objective.gamma", o.gamma, "a non-negative margin")
