"""`trntrain plan` output: a readable breakdown, a ranked table, or JSON."""

from __future__ import annotations

import json

from omegaconf import DictConfig

from trntrain.plan import Plan
from trntrain.plan.memory import GIB

PARTS = {"params": "parameters", "grads": "gradients", "optimizer_states": "optimizer states",
         "master_weights": "master weights", "reference_weights": "reference model",
         "activations": "activations",
         "recompute": "recompute buffer", "attention_scores": "attention s x s",
         "gradient_sync": "gradient buckets"}
TERMS = {"compute": "compute", "tp_comm": "tp collectives", "pp_p2p": "pipeline transfers",
         "pp_bubble": "pipeline bubble", "dp_comm": "dp gradient sync",
         "ep_all_to_all": "ep all-to-all", "cp_attention": "cp keys and values",
         "reference_forward": "reference forward"}


def layout_line(plan: Plan) -> str:
    lay = plan.layout
    parts = [f"tp={lay.tp}", f"pp={lay.pp}", f"dp={lay.dp}"]
    if lay.cp > 1:
        parts.append(f"cp={lay.cp} ({lay.cp_attention})")
    if lay.ep > 1:
        parts.append(f"ep={lay.ep}")
    if lay.sequence_parallel:
        parts.append("sp")
    if lay.zero1:
        parts.append("zero1")
    parts.append(f"ac={lay.activation_checkpointing}")
    if lay.pp > 1:
        parts.append(lay.schedule + (f" v={lay.virtual_pp}" if lay.virtual_pp > 1 else ""))
    parts.append(f"mb={lay.microbatches}x{lay.micro_batch_size}")
    return " ".join(parts)


def moe_lines(model: DictConfig) -> list[str]:
    """Total and active parameters of an MoE model (FLOPs and MFU count the active)."""
    if not model.get("num_experts"):
        return []
    from trntrain.models import family_of
    from trntrain.models.moe_costs import parameter_counts

    total, active = parameter_counts(model, family_of(model).layer_params)
    return [f"parameters: {total / 1e9:.2f} B, {active / 1e9:.2f} B active ({model.top_k} of "
            f"{model.num_experts} experts per token; FLOPs and MFU from the active)"]


def text(plan: Plan, cfg: DictConfig) -> str:
    c, t = cfg.cluster, cfg.train
    cores = f"{plan.world_size} core{'s' if plan.world_size > 1 else ''}"
    lines = [
        f"plan: {cfg.model.name} on {c.nodes} x {c.name} ({cores}), "
        f"{t.global_batch_size} x {t.seq_len} tokens per step, {t.precision}",
        f"layout: {layout_line(plan)}",
        *moe_lines(cfg.model),
        "",
        f"memory per core (pipeline stage {plan.stage}, the largest):",
    ]
    for key, label in PARTS.items():
        if plan.memory.get(key):
            lines.append(f"  {label:<22}{plan.memory[key] / GIB:>9.2f} GiB")
    total = plan.memory_per_core_gib
    if plan.limit_gib is None:
        verdict = "no limit set (cluster.memory_per_core_gib)"
    else:
        budget = (f"{plan.budget_gib:g} GiB ({plan.limit_gib:g} less "
                  f"{plan.reserved_gib:g} reserved)")
        verdict = f"fits in {budget}" if plan.fits else f"DOES NOT FIT in {budget}"
    lines.append(f"  {'total':<22}{total:>9.2f} GiB   {verdict}")
    if plan.layout.pp > 1:
        lines.append(f"  micro-batches in flight per stage: {plan.in_flight}")
    lines.append("")
    if plan.time is None:
        lines.append(f"step time: not estimated: cluster={c.name} sets no peak FLOP/s or "
                     "bandwidths (try cluster=trn1_32xlarge)")
        return "\n".join(lines)
    step = plan.step_time_s
    lines.append(f"step time (compute at {cfg.plan.compute_efficiency:g} of "
                 f"{c.peak_flops_per_core / 1e12:g} TFLOP/s per core, no overlap):")
    for key, label in TERMS.items():
        if plan.time.get(key):
            lines.append(f"  {label:<22}{plan.time[key]:>9.3f} s  "
                         f"{100 * plan.time[key] / step:>5.1f} %")
    lines.append(f"  {'total':<22}{step:>9.3f} s")
    lines.append("")
    lines.append(f"throughput: {plan.tokens_per_s:,.0f} tokens/s, "
                 f"{plan.tokens_per_s / plan.world_size:,.0f} per core, MFU {100 * plan.mfu:.1f} %")
    return "\n".join(lines)


def table(plans: list[Plan], cfg: DictConfig, top: int) -> str:
    c, t = cfg.cluster, cfg.train
    lines = [f"search: {cfg.model.name} on {c.nodes} x {c.name}, {t.global_batch_size} x "
             f"{t.seq_len} tokens per step, {t.precision}: {len(plans)} layouts fit"
             + (f", the {top} fastest:" if len(plans) > top else ":")]
    if not plans:
        budget = (c.memory_per_core_gib or 0) - (c.reserved_memory_gib or 0)
        return (lines[0] + f" none within {budget:g} GiB per core; more nodes "
                f"(cluster.nodes={c.nodes} now), train.precision=bf16 or a shorter "
                f"train.seq_len would make room")
    lines.append(f"{'#':>3}  {'tokens/s':>10}  {'MFU':>6}  {'GiB':>6}  {'step s':>7}  layout")
    for i, plan in enumerate(plans[:top], 1):
        tokens = f"{plan.tokens_per_s:,.0f}" if plan.tokens_per_s else "-"
        mfu = f"{100 * plan.mfu:.1f}%" if plan.mfu is not None else "-"
        step = f"{plan.step_time_s:.2f}" if plan.step_time_s is not None else "-"
        lines.append(f"{i:>3}  {tokens:>10}  {mfu:>6}  {plan.memory_per_core_gib:>6.2f}  "
                     f"{step:>7}  {layout_line(plan)}")
    lines.append("")
    lines.append("overrides of #1: " + " ".join(plans[0].layout.overrides()))
    return "\n".join(lines)


def as_json(result: Plan | list[Plan]) -> str:
    if isinstance(result, list):
        return json.dumps([p.as_dict() for p in result])
    return json.dumps(result.as_dict(), indent=2)
