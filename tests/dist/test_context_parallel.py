"""Context parallelism on gloo ranks against the single-process run, at a sequence
length of 1024: cp 2 and 4, cp2 x tp2 with sp, cp2 x pp2, cp2 x dp2 ZeRO-1, with the
all-gather and the ring attention, on plain and packed (document-masked) rows, for
Llama and Qwen3: the first step's gradients of every parameter, then the losses, the
evaluation loss and the gradient norms; and DCP checkpoints of a cp run resumed under
another cp and under none."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_config, train_in_run_dir
from tests.packed_source import NAME
from trntrain.checkpoint.manager import step_dir_name
from trntrain.distributed import World
from trntrain.trainer import Trainer

SEQ = 1024
# Two of the models' four layers: one a stage under pp2, and half the time on 2 cores.
BASE = ("model.n_layers=2", f"train.seq_len={SEQ}", "train.global_batch_size=2",
        "train.micro_batch_size=1", "train.max_steps=2", "train.eval_every=2", "train.eval_batches=1")
PACKED = ("data=synthetic", f"data.source={NAME}")
LAYOUTS = {  # name: (world size, overrides); activation checkpointing rides along
    "cp2": (2, ("parallel.cp=2",)),
    "cp4": (4, ("parallel.cp=4",)),
    "cp2_tp2_sp": (4, ("parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true",
                       "parallel.activation_checkpointing=selective")),
    "cp2_pp2": (4, ("parallel.cp=2", "parallel.pp=2", "parallel.activation_checkpointing=full")),
    "cp2_dp2_zero1": (4, ("parallel.cp=2", "parallel.dp=2", "parallel.zero1=true")),
}
MODES = ("allgather", "ring")


def run(rank: int, world_size: int, overrides: tuple[str, ...],
        reference_grads: dict[str, torch.Tensor] | None) -> list[tuple[float, ...]]:
    """The first step's gradients checked against `reference_grads` (each rank's own
    parameters, its tp slice; not under ZeRO-1, whose gradients are slices of flat
    buckets), then the records of a run."""
    import tests.packed_source  # noqa: F401 - registers the source in this process

    trainer = Trainer(tiny_config(*overrides), World(rank, world_size, rank))
    if reference_grads is not None:
        trainer.forward_backward(trainer.train_batches.step(0))
        for chunk in trainer.chunks.values():
            for name, p in chunk.named_parameters():
                # A tied head on the last pipeline stage: the embedding's gradient.
                expected = reference_grads.get(name, reference_grads.get(
                    "tok_embeddings.weight" if name == "output.weight" else name))
                if hasattr(p, "tp_shard"):
                    expected = expected.narrow(*p.tp_shard)
                torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-6,
                                           msg=lambda m, name=name: f"{name}: {m}")
        trainer.optimizer.zero_grad(set_to_none=True)
    return [(r["loss"], r.get("eval_loss", 0.0), r["grad_norm"]) for r in trainer.fit()]


def reference(overrides: tuple[str, ...]) -> tuple[dict, list]:
    import tests.packed_source  # noqa: F401

    single = Trainer(tiny_config(*overrides), World())
    single.forward_backward(single.train_batches.step(0))
    grads = {name: p.grad.clone() for name, p in single.model.named_parameters()}
    return grads, run(0, 1, overrides, None)


@pytest.mark.parametrize("model,packed", [("llama_tiny", False), ("llama_tiny", True),
                                          ("qwen3_tiny", False), ("qwen3_tiny", True)])
def test_context_parallel_equals_the_single_process_run(distributed, model, packed):
    base = (f"model={model}", *BASE, *(PACKED if packed else ()))
    grads, expected = reference(base)
    # Each layout runs one attention mode per case, the modes alternating so that each
    # layout meets both with each model and with each kind of row.
    parity = (model == "qwen3_tiny") + packed
    for index, (name, (world, layout)) in enumerate(LAYOUTS.items()):
        mode = MODES[(parity + index) % 2]
        overrides = (*base, *layout, f"parallel.cp_attention={mode}")
        zero1 = "parallel.zero1=true" in layout
        got = distributed(run, world, overrides, None if zero1 else grads)[0]
        for step, (a, b) in enumerate(zip(got, expected, strict=True), start=1):
            for x, y, what in zip(a, b, ("loss", "eval_loss", "grad_norm"), strict=True):
                assert abs(x - y) <= 1e-5 * max(1.0, abs(y)), (name, mode, step, what, x, y)


def test_a_cp_checkpoint_resumes_under_another_cp_and_under_none(distributed, tmp_path):
    # ZeRO-1 over the cp group: the optimizer state is sharded over ranks that hold the
    # same weights and see different tokens.
    short = ("train.seq_len=256", "train.global_batch_size=4", "train.max_steps=4",
             "train.eval_every=0", "checkpoint=dcp", "checkpoint.every=2", "checkpoint.keep=0")
    straight = distributed(train_in_run_dir, 2, str(tmp_path / "cp2"),
                           (*short, "parallel.cp=2", "parallel.zero1=true"))[0]
    halfway = tmp_path / "cp2" / "checkpoints" / step_dir_name(2)
    resumed = {
        "cp4": distributed(train_in_run_dir, 4, str(tmp_path / "cp4"),
                           (*short, "parallel.cp=4", "parallel.cp_attention=allgather",
                            f"checkpoint.resume={halfway}"))[0],
        "cp1": train_in_run_dir(0, 1, str(tmp_path / "cp1"),
                                (*short, f"checkpoint.resume={halfway}")),
    }
    for name, got in resumed.items():
        assert sorted(got["loss"]) == [3, 4], (name, got["loss"])
        assert [got["loss"][s] for s in (3, 4)] == pytest.approx(
            [straight["loss"][s] for s in (3, 4)], rel=1e-5), name


def test_hugging_face_export_of_a_cp_run_is_the_single_process_model(distributed, tmp_path):
    """One safetensors file, written once (by cp rank 0), with the weights of the same
    run in one process."""
    from safetensors.torch import load_file

    short = ("train.seq_len=256", "train.global_batch_size=4", "train.max_steps=2",
             "train.eval_every=0", "checkpoint=hf")
    distributed(train_in_run_dir, 2, str(tmp_path / "cp2"),
                (*short, "parallel.cp=2", "parallel.tp=1"))
    train_in_run_dir(0, 1, str(tmp_path / "cp1"), short)
    files = {name: sorted((tmp_path / name / "checkpoints" / step_dir_name(2)).glob(
        "*.safetensors")) for name in ("cp1", "cp2")}
    assert [p.name for p in files["cp2"]] == ["model.safetensors"]
    got, expected = load_file(files["cp2"][0]), load_file(files["cp1"][0])
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        # Two AdamW steps: round-off in a gradient near zero moves an update by up to lr.
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=2e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
