"""The CUDA parity checks: every single-process feature on a device backend against eager
CPU on the same seed, as functions of the backend under test.

`tests/gpu/test_cuda.py` runs them with backend=cuda (skipped where no GPU is visible);
`tests/gpu/test_harness.py` runs some of them with backend=cpu on both sides, which proves
the harness itself (configs, comparisons, result records) wherever the suite runs.

Each check returns a record for the results file (`results.json` of `tests/gpu/run.sh`)
and raises AssertionError where the device disagrees with the reference.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from tests.conftest import tiny_config
from tests.features import BF16_FEATURES
from tests.features import FP32_FEATURES as SHARED_FP32
from trntrain.distributed import World
from trntrain.trainer import Trainer

STEPS = 6
REFERENCE = "cpu"

# fp32 on a GPU against CPU: the same operations in another order (cuBLAS and SDPA
# kernels), so round-off of ~1e-6 a step that Adam's sign-like updates carry forward.
FP32_REL = 1e-4
# bf16's resolution is 2^-8 (3.9e-3): both sides round matmul outputs to bf16, each
# after its own fp32 accumulation order, so single elements differ by one bf16 step.
# The loss is a mean over thousands of them; the bound is that of one step.
BF16_REL = 4e-3

# Overrides of tests/conftest.py's tiny config for each feature, with its tolerance.
FP32_FEATURES: dict[str, list[str]] = {"plain_step": [], **SHARED_FP32}
FEATURES: dict[str, tuple[list[str], float]] = {
    **{name: (o, FP32_REL) for name, o in FP32_FEATURES.items()},
    **{name: (o, BF16_REL) for name, o in BF16_FEATURES.items()},
}


def device_backend() -> str:
    """The backend under test: cuda, or TRNTRAIN_GPU_BACKEND (cpu proves the harness)."""
    return os.environ.get("TRNTRAIN_GPU_BACKEND", "cuda")


def device_available(backend: str) -> bool:
    return backend == "cpu" or (backend == "cuda" and torch.cuda.is_available())


def run(overrides: Sequence[str], backend: str, steps: int = STEPS,
        run_dir: Path | None = None) -> tuple[Trainer, list[dict[str, Any]]]:
    """A fresh trainer of the tiny config on `backend`, fitted for `steps` steps."""
    cfg = tiny_config(f"train.max_steps={steps}", f"backend={backend}", *overrides)
    trainer = Trainer(cfg, World(), run_dir=run_dir)
    return trainer, trainer.fit()


def relative_gap(measured: Sequence[float], reference: Sequence[float]) -> float:
    """The largest |m - r| / |r| over pairs; inf where the lengths differ or a value is
    not finite on one side only (nan against nan, as a skipped step's, counts as equal)."""
    if len(measured) != len(reference):
        return math.inf
    gap = 0.0
    for m, r in zip(measured, reference, strict=True):
        if math.isnan(m) and math.isnan(r):
            continue
        if not (math.isfinite(m) and math.isfinite(r)):
            return math.inf
        gap = max(gap, abs(m - r) / max(abs(r), 1e-12))
    return gap


def compare(name: str, measured: Sequence[float], reference: Sequence[float], rel: float,
            backend: str, **extra: Any) -> dict[str, Any]:
    """The record of one check; AssertionError (carrying the record) when it fails."""
    gap = relative_gap(measured, reference)
    record = {"check": name, "backend": backend, "reference": REFERENCE,
              "measured": list(measured), "expected": list(reference),
              "max_rel_gap": gap, "tolerance": rel, "passed": gap <= rel, **extra}
    if not record["passed"]:
        raise CheckFailed(record)
    return record


class CheckFailed(AssertionError):
    def __init__(self, record: dict[str, Any]) -> None:
        super().__init__(f"{record['check']}: {record['backend']} differs from "
                         f"{record['reference']} by {record['max_rel_gap']:.3g} "
                         f"(tolerance {record['tolerance']}): {record['measured']} vs "
                         f"{record['expected']}")
        self.record = record


def losses(records: list[dict[str, Any]], key: str = "loss") -> list[float]:
    return [r[key] for r in records if key in r]


# -- the checks ------------------------------------------------------------------------------

def check_feature(name: str, backend: str) -> dict[str, Any]:
    """Six steps of a feature: losses and gradient norms against eager CPU."""
    overrides, rel = FEATURES[name]
    _, reference = run(overrides, REFERENCE)
    _, measured = run(overrides, backend)
    # Gradient norms sum squares of bf16 gradients: a few bf16 steps apart in bf16 runs.
    norm_rel = rel if rel == FP32_REL else 4 * rel
    norms = compare(f"{name}.grad_norm", losses(measured, "grad_norm"),
                    losses(reference, "grad_norm"), norm_rel, backend)
    return compare(name, losses(measured), losses(reference), rel, backend,
                   grad_norm_rel_gap=norms["max_rel_gap"],
                   device_peak_gib=measured[-1].get("mem_device_peak_gib"))


def check_evaluation(backend: str) -> dict[str, Any]:
    overrides = ["train.eval_every=2", "train.eval_batches=2"]
    _, reference = run(overrides, REFERENCE)
    _, measured = run(overrides, backend)
    return compare("evaluation", losses(measured, "eval_loss"), losses(reference, "eval_loss"),
                   FP32_REL, backend)


@contextmanager
def env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def check_nonfinite_skip(backend: str) -> dict[str, Any]:
    """A NaN loss injected at step 3: both sides skip step 3 alone, and agree elsewhere."""
    overrides = ["train.nonfinite=skip"]
    with env("TRNTRAIN_FAULT", "nan:3:0"):
        ref_trainer, reference = run(overrides, REFERENCE, steps=5)
        trainer, measured = run(overrides, backend, steps=5)
    assert ref_trainer.skipped_steps == [3], ref_trainer.skipped_steps
    assert trainer.skipped_steps == ref_trainer.skipped_steps, trainer.skipped_steps
    finite = [r for r in reference if r["step"] != 3]
    return compare("nonfinite_skip", [r["loss"] for r in measured if r["step"] != 3],
                   losses(finite), FP32_REL, backend, skipped_steps=trainer.skipped_steps)


@contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic kernels (cuBLAS workspace, SDPA and embedding backward without
    atomics), so two runs of the same steps on a GPU are bitwise equal."""
    was = torch.are_deterministic_algorithms_enabled()
    with env("CUBLAS_WORKSPACE_CONFIG", os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8")):
        # warn_only: an op without a deterministic kernel warns; the bitwise check decides.
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was)


def check_dcp_resume(backend: str, tmp: Path) -> dict[str, Any]:
    """6 steps saving at 3, then a new run resumed from step 3: steps 4-6 and the final
    weights bitwise equal to the straight run's (deterministic kernels on both runs)."""
    from trntrain.checkpoint.manager import step_dir_name

    common = ["checkpoint=dcp", "checkpoint.every=3", "checkpoint.keep=0"]
    with deterministic():
        straight, records = run(common, backend, run_dir=tmp / "straight")
        halfway = tmp / "straight" / "checkpoints" / step_dir_name(3)
        resumed, resumed_records = run([*common, f"checkpoint.resume={halfway}"], backend,
                                       run_dir=tmp / "resumed")
    expected, measured = losses(records)[3:], losses(resumed_records)
    assert [r["step"] for r in resumed_records] == [4, 5, 6]
    assert measured == expected, f"resumed losses {measured} != straight {expected}"
    for a, b in zip(straight.params, resumed.params, strict=True):
        assert torch.equal(a, b), "weights after the resumed run differ from the straight run"
    return compare("dcp_resume_bitwise", measured, expected, 0.0, backend)


def check_hf_export(backend: str, tmp: Path) -> dict[str, Any]:
    """checkpoint=hf after 3 steps: the device's safetensors against CPU's, and read back
    by transformers' LlamaForCausalLM with the device model's logits."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    overrides = ["checkpoint=hf", "checkpoint.every=0"]
    exported = {}
    for side in (REFERENCE, backend):
        shutil.rmtree(tmp / side, ignore_errors=True)
        trainer, _ = run(overrides, side, steps=3, run_dir=tmp / side)
        exported[side] = tmp / side / "checkpoints" / "step_00000003"
    reference = load_file(exported[REFERENCE] / "model.safetensors")
    measured = load_file(exported[backend] / "model.safetensors")
    assert sorted(measured) == sorted(reference)
    # Adam moves an element by about lr (3e-3) a step whatever its gradient's size, so
    # near-zero gradients carry round-off at that scale; the bound is a tenth of a step.
    worst = max((measured[k] - reference[k]).abs().max().item() for k in reference)
    assert worst < 3e-4, f"exported weights differ by {worst}"
    hf = LlamaForCausalLM.from_pretrained(exported[backend]).float().eval()
    tokens = torch.randint(0, trainer.cfg.model.vocab_size, (2, 32),
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = trainer.model(tokens.to(trainer.backend.device)).float().cpu()
        theirs = hf(tokens).logits.float()
    gap = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    record = {"check": "hf_export_read_back", "backend": backend, "reference": "transformers",
              "weights_max_abs_gap": worst, "logits_rel_gap": gap, "tolerance": FP32_REL,
              "max_rel_gap": gap, "measured": [gap], "expected": [0.0],
              "passed": gap <= FP32_REL}
    if not record["passed"]:
        raise CheckFailed(record)
    return record


# The layout of the memory check: large enough that the allocator's rounding and the
# kernels' workspaces are small against the tensors the planner counts.
MEMORY_OVERRIDES = ["model.dim=1024", "model.n_layers=8", "model.n_heads=16",
                    "model.n_kv_heads=8", "model.ffn_hidden_dim=2816", "model.vocab_size=32000",
                    "model.max_seq_len=1024", "train.seq_len=1024", "train.global_batch_size=4",
                    "data=synthetic", "train.precision=bf16"]
# Measured peak over planned: the planner counts saved tensors and the optimizer's
# transients; kernels' workspaces and the allocator's 2 MiB blocks come on top.
MEMORY_BAND = (0.9, 1.15)


def memory_layouts() -> dict[str, list[str]]:
    return {"bf16_none": [],
            "bf16_full_checkpointing": ["parallel.activation_checkpointing=full"],
            "bf16_selective_checkpointing": ["parallel.activation_checkpointing=selective"]}


def planned_gib(overrides: Sequence[str], backend: str) -> dict[str, float]:
    """The planner's memory per core of the layout, by part and in total (GiB)."""
    from trntrain.plan import plan_layout
    from trntrain.plan.layout import layout_from_config
    from trntrain.plan.memory import GIB

    cfg = tiny_config(*MEMORY_OVERRIDES, f"backend={backend}", "train.max_steps=3",
                      *overrides)
    result = plan_layout(cfg, layout_from_config(cfg, 1))
    return {**{k: v / GIB for k, v in result.memory.items()},
            "total": result.memory_per_core_gib}


def check_memory(name: str, backend: str, steps: int = 3) -> dict[str, Any]:
    """mem_device_peak_gib of a few steps against the planner's estimate for the same
    layout (on cpu, which reports no device peak, the plan alone is recorded)."""
    overrides = memory_layouts()[name]
    planned = planned_gib(overrides, backend)
    cfg = tiny_config(*MEMORY_OVERRIDES, f"backend={backend}", f"train.max_steps={steps}",
                      *overrides)
    records = Trainer(cfg, World()).fit()
    return memory_record(f"memory_{name}", backend, planned, records[-1].get("mem_device_peak_gib"),
                         records[-1].get("mem_device_reserved_peak_gib"))


def memory_record(name: str, backend: str, planned: dict[str, float], peak: float | None,
                  reserved: float | None) -> dict[str, Any]:
    """The record of a memory check: the measured peak over the planned total within
    MEMORY_BAND (no verdict without a device peak); CheckFailed outside it."""
    record: dict[str, Any] = {"check": name, "backend": backend, "planned_gib": planned,
                              "measured_peak_gib": peak, "reserved_peak_gib": reserved,
                              "band": list(MEMORY_BAND), "ratio": None, "passed": True}
    if peak is None:
        return record
    ratio = peak / planned["total"]
    record.update(ratio=ratio, passed=MEMORY_BAND[0] <= ratio <= MEMORY_BAND[1])
    if not record["passed"]:
        raise CheckFailed({**record, "reference": "planner", "max_rel_gap": abs(ratio - 1),
                           "tolerance": MEMORY_BAND, "measured": [peak],
                           "expected": [planned["total"]]})
    return record
