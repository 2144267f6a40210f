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


def run(backend: str, *overrides: str) -> list[dict]:
    cfg = tiny_config("model=mixtral_tiny", "model.n_layers=2", "model.capacity_factor=1.0",
                      f"train.max_steps={STEPS}", "train.micro_batch_size=4",
                      f"backend={backend}", *overrides)
    return Trainer(cfg, World()).fit()


@pytest.mark.parametrize("overrides", [
    (),
    # The pooled load-balancing loss: the pool's fraction is read in the backward graph.
    ("model.router_aux_loss_pooling=global", "model.router_aux_loss_coef=0.1"),
], ids=["per_layer_aux_loss", "pooled_aux_loss"])
def test_capacity_moe_on_xla_equals_eager_cpu_and_compiles_once(overrides):
    eager = run("cpu", *overrides)
    lazy = run("xla", *overrides)
    for key in ("loss", "moe_aux_loss", "moe_dropped_fraction", "moe_load_imbalance"):
        assert [r[key] for r in lazy] == pytest.approx([r[key] for r in eager], rel=1e-5), key
    assert all(r["moe_dropped_fraction"] > 0 for r in lazy)
    compiles = [r["xla_compiles"] for r in lazy]
    assert compiles[WARM - 1:] == [compiles[WARM - 1]] * (len(compiles) - WARM + 1), compiles


EP_ON_XLA = """
import os
os.environ.update(PJRT_DEVICE="CPU", MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}", RANK="0",
                  WORLD_SIZE="1")
import torch, torch.distributed as dist, torch_xla, torch_xla.distributed.xla_backend
import torch_xla.core.xla_model as xm
from trntrain.models import moe
from trntrain.parallel.comm import xla_replica_groups

dist.init_process_group("xla", init_method="xla://")
mesh = [[0]]
group = dist.new_group([0], pg_options={{"xla_pg_options": {{"mesh": mesh}}}})
assert xla_replica_groups(group) == mesh
assert xla_replica_groups(dist.new_group([0], backend="gloo")) is None
calls, real = [], xm.all_to_all
def recorded(*args, **kwargs):
    calls.append((args[1:], kwargs))
    return real(*args, **kwargs)
xm.all_to_all = recorded
def whole_world(*args, **kwargs):
    raise AssertionError("all_to_all_single reached ProcessGroupXla.alltoall_base")
dist.all_to_all_single = whole_world
x = torch.randn(6, 4)
upstream = torch.randn(6, 4)
device_x = x.to(torch_xla.device()).requires_grad_()
out = moe._AllToAll.apply(device_x, None, None, group)
(out * upstream.to(device_x.device)).sum().backward()
assert torch.equal(out.cpu(), x)
assert torch.equal(device_x.grad.cpu(), upstream)
assert calls == [((0, 0, 1), {{"groups": mesh, "pin_layout": False}})] * 2, calls
try:
    moe.all_to_all(device_x, [6], [6], group)
except ValueError as e:
    assert "even splits" in str(e)
else:
    raise AssertionError("uneven splits on an XLA group were accepted")
print("ok")
"""


def test_expert_parallel_all_to_all_runs_over_the_ep_groups_replica_groups(tmp_path):
    """ProcessGroupXla.alltoall_base exchanges over the whole world whatever the group;
    the dispatch calls torch-xla's all-to-all with the ep group's replica groups
    instead, forward and backward, on a real ProcessGroupXla (one process here: the
    ep2 layouts are proven on gloo, and the recorded-collectives test checks that the
    ep groups are created with their axis' mesh)."""
    import subprocess
    import sys

    from tests.conftest import free_port

    script = tmp_path / "ep_on_xla.py"
    script.write_text(EP_ON_XLA.format(port=free_port()))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
