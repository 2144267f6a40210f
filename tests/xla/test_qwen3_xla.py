"""qwen3_tiny on the Trainium code path (XLA:CPU, one device) against eager CPU: the same
losses and no compilation after warm-up (the first three steps: gradients created, then
AdamW's state, then the steady state), QK-norm and the tied head included."""

from __future__ import annotations

import pytest

from tests.conftest import tiny_config
from trntrain.distributed import World
from trntrain.trainer import Trainer

STEPS = 6
WARM = 3


def run(*overrides: str, backend: str) -> list[dict]:
    cfg = tiny_config("model=qwen3_tiny", f"train.max_steps={STEPS}", f"backend={backend}",
                      *overrides)
    return Trainer(cfg, World()).fit()


@pytest.mark.parametrize("overrides", [
    (), ("parallel.activation_checkpointing=selective",), ("train.micro_batch_size=2",)],
    ids=["plain", "checkpointing_selective", "accumulation_4_micro_batches"])
def test_qwen3_on_xla_equals_eager_cpu_and_compiles_once(overrides):
    eager = run(*overrides, backend="cpu")
    lazy = run(*overrides, backend="xla")
    assert [r["loss"] for r in lazy] == pytest.approx([r["loss"] for r in eager], rel=1e-5)
    compiles = [r["xla_compiles"] for r in lazy]
    assert compiles[WARM - 1:] == [compiles[WARM - 1]] * (len(compiles) - WARM + 1), compiles
