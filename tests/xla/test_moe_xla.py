"""MoE models on the Trainium code path (XLA:CPU, one device) with a capacity factor
(the static-shape dispatch XLA requires) against eager CPU: the same losses and
routing metrics, tokens dropped, and no compilation after warm-up."""

from __future__ import annotations

import pytest

from tests.conftest import tiny_config
from trntrain.distributed import World
from trntrain.trainer import Trainer

STEPS = 6
WARM = 3


def run(model: str, backend: str) -> list[dict]:
    cfg = tiny_config(f"model={model}", "model.n_layers=2", "model.capacity_factor=1.0",
                      f"train.max_steps={STEPS}", "train.micro_batch_size=4",
                      f"backend={backend}")
    return Trainer(cfg, World()).fit()


@pytest.mark.parametrize("model", ["mixtral_tiny"])
def test_capacity_moe_on_xla_equals_eager_cpu_and_compiles_once(model):
    eager = run(model, "cpu")
    lazy = run(model, "xla")
    for key in ("loss", "moe_aux_loss", "moe_dropped_fraction", "moe_load_imbalance"):
        assert [r[key] for r in lazy] == pytest.approx([r[key] for r in eager], rel=1e-5), key
    assert all(r["moe_dropped_fraction"] > 0 for r in lazy)
    compiles = [r["xla_compiles"] for r in lazy]
    assert compiles[WARM - 1:] == [compiles[WARM - 1]] * (len(compiles) - WARM + 1), compiles
