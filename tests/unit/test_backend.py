"""Backend selection and the Neuron environment (torch-neuronx itself is not installable here)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from tests.conftest import tiny_config
from trntrain.backend import BACKENDS, build_backend, detect_backend, resolve_backend_name
from trntrain.backend.neuron import (
    NeuronBackend,
    apply_environment,
    neuron_cc_flags,
    neuron_environment,
)
from trntrain.backend.xla import EXTRACT_GRAPHS_ENV, is_precompile
from trntrain.config import compose
from trntrain.errors import UserError


def test_auto_picks_cpu_on_this_machine():
    assert importlib.util.find_spec("torch_neuronx") is None
    assert detect_backend() in ("cpu", "cuda")
    assert build_backend(tiny_config().backend).name == detect_backend()
    # The rule, stated independently: neuron is out (asserted above), then cuda, then cpu.
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert detect_backend() == expected
    assert build_backend(tiny_config().backend).name == expected


def test_neuron_compiler_flags_from_config():
    cfg = tiny_config("backend=neuron", "backend.neuron_opt_level=2",
                      "backend.compile_cache_dir=/fsx/neuron_cache",
                      "backend.neuron_cc_flags='--enable-mixed-precision-accumulation'").backend
    assert neuron_cc_flags(cfg) == ("--model-type=transformer -O2 --cache_dir=/fsx/neuron_cache "
                                    "--enable-mixed-precision-accumulation")
    env = neuron_environment(cfg, stochastic_rounding=True)
    assert env["NEURON_RT_STOCHASTIC_ROUNDING_EN"] == "1"
    assert env["NEURON_COMPILE_CACHE_URL"] == "/fsx/neuron_cache"
    assert neuron_environment(cfg, stochastic_rounding=False)[
        "NEURON_RT_STOCHASTIC_ROUNDING_EN"] == "0"


def test_precompile_from_config_or_neuron_parallel_compile(monkeypatch):
    cfg = tiny_config("backend=neuron").backend
    monkeypatch.delenv(EXTRACT_GRAPHS_ENV, raising=False)
    assert not is_precompile(cfg)
    monkeypatch.setenv(EXTRACT_GRAPHS_ENV, "1")
    assert is_precompile(cfg)
    monkeypatch.delenv(EXTRACT_GRAPHS_ENV)
    cfg.precompile = True
    assert is_precompile(cfg)


NEURON_VARIABLES = ("PJRT_DEVICE", "NEURON_CC_FLAGS", "NEURON_RT_STOCHASTIC_ROUNDING_EN",
                    "NEURON_FUSE_SOFTMAX", "NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS",
                    "XLA_DISABLE_FUNCTIONALIZATION", "NEURON_COMPILE_CACHE_URL")


def clean_neuron_environment(monkeypatch) -> None:
    """The backend exports its environment: unset it, and let monkeypatch restore it."""
    for key in NEURON_VARIABLES:
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)


def test_neuron_without_torch_neuronx_is_a_clear_error(monkeypatch):
    clean_neuron_environment(monkeypatch)
    with pytest.raises(UserError, match="backend.name='neuron' is invalid: torch-neuronx"):
        NeuronBackend(0, tiny_config("backend=neuron").backend)


def test_neuron_environment_has_aws_values():
    """What AWS's trainers export (neuronx-distributed-training's training_orchestrator.py
    and train_setup.sh, neuronx-distributed's tp_zero1_llama3_8B_hf_pretrain.sh and
    run_llama3_70B_tp_pp.sh): the compiler's default -O2, the fused softmax, 3 in-flight
    graphs for tp runs and 7 for tp x pp runs, functionalization kept on for ZeRO-1."""
    cfg = tiny_config("backend=neuron").backend
    assert neuron_environment(cfg, stochastic_rounding=False) == {
        "NEURON_CC_FLAGS": "--model-type=transformer -O2",
        "NEURON_RT_STOCHASTIC_ROUNDING_EN": "0",
        "NEURON_FUSE_SOFTMAX": "1",
        "NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS": "3",
    }
    sharded = neuron_environment(cfg, stochastic_rounding=False, sharded_optimizer=True)
    assert sharded["XLA_DISABLE_FUNCTIONALIZATION"] == "0"
    for preset, inflight in (("llama3_8b_trn1_32nodes", "3"), ("llama3_70b_trn1_32nodes", "7")):
        preset_cfg = compose([f"+experiment={preset}"]).backend
        env = neuron_environment(preset_cfg, stochastic_rounding=False, sharded_optimizer=True)
        assert env["NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS"] == inflight
        assert env["NEURON_CC_FLAGS"] == "--model-type=transformer -O2"


class RecordedNeuronBackend(NeuronBackend):
    """NeuronBackend without starting it (torch-neuronx cannot be imported here)."""

    def __init__(self, local_rank, cfg, stochastic_rounding, sharded_optimizer):
        self.stochastic_rounding = stochastic_rounding
        self.sharded_optimizer = sharded_optimizer


@pytest.mark.parametrize(("precision", "master_weights", "zero1", "rounding", "sharded"), [
    ("bf16", False, False, True, False),   # pure bf16: AWS's bf16SR
    ("bf16", True, False, False, True),    # fp32 master weights: AWS's mixed_precision
    ("bf16", False, True, True, True),     # pure bf16 weights, ZeRO-1 optimizer state
    ("fp32", True, False, False, False),
    ("fp32", True, True, False, True),
    ("bf16_autocast", True, False, False, False),  # fp32 weights, bf16 matmuls
])
def test_stochastic_rounding_only_for_pure_bf16(monkeypatch, precision, master_weights, zero1,
                                                rounding, sharded):
    monkeypatch.setitem(BACKENDS, "neuron", RecordedNeuronBackend)
    cfg = tiny_config("backend=neuron").backend
    backend = build_backend(cfg, 0, precision, master_weights, zero1)
    assert (backend.stochastic_rounding, backend.sharded_optimizer) == (rounding, sharded)
    # An explicit backend.stochastic_rounding wins over the rule.
    cfg.stochastic_rounding = not rounding
    assert build_backend(cfg, 0, precision, master_weights, zero1).stochastic_rounding is (
        not rounding)


def test_environment_overrides_are_kept_and_named(monkeypatch, caplog):
    clean_neuron_environment(monkeypatch)
    monkeypatch.setenv("NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS", "5")
    monkeypatch.setenv("XLA_DISABLE_FUNCTIONALIZATION", "1")
    monkeypatch.setenv("NEURON_FUSE_SOFTMAX", "1")  # the config's own value: nothing to say
    with caplog.at_level("WARNING"), pytest.raises(UserError, match="torch-neuronx"):
        NeuronBackend(0, tiny_config("backend=neuron").backend, sharded_optimizer=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert sorted(warnings) == [
        "NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS='5' from the environment overrides '3', "
        "the value the config implies; unset NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS to "
        "use the config's",
        "XLA_DISABLE_FUNCTIONALIZATION='1' from the environment overrides '0', the value the "
        "config implies; unset XLA_DISABLE_FUNCTIONALIZATION to use the config's",
    ]
    # The environment wins; what was unset now holds the config's value.
    assert os.environ["NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS"] == "5"
    assert os.environ["XLA_DISABLE_FUNCTIONALIZATION"] == "1"
    assert os.environ["NEURON_CC_FLAGS"] == "--model-type=transformer -O2"
    # Other local ranks of the node stay quiet: the node's rank 0 has said it.
    caplog.clear()
    with caplog.at_level("WARNING"), pytest.raises(UserError):
        NeuronBackend(1, tiny_config("backend=neuron").backend, sharded_optimizer=True)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_apply_environment_sets_only_what_is_unset():
    environ = {"A": "1", "B": "x"}
    warnings = apply_environment({"A": "1", "B": "y", "C": "z"}, environ)
    assert environ == {"A": "1", "B": "x", "C": "z"}
    assert len(warnings) == 1 and warnings[0].startswith("B='x' from the environment overrides "
                                                        "'y'")


@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is not None,
                    reason="torch_xla is installed here")
def test_xla_without_torch_xla_is_a_clear_error():
    with pytest.raises(UserError, match="backend.name='xla' is invalid: torch_xla"):
        resolve_backend_name("xla")


# Names as torch.cuda.get_device_name reports them, with the dense BF16 peak of each
# part's datasheet (PCIe and NVL parts run at lower clocks and power than SXM).
@pytest.mark.parametrize(("name", "tflops"), [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835),
    ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835), ("NVIDIA GH200 480GB", 989),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA GeForce RTX 4090", None)])
def test_gpu_peak_by_device_name(name, tflops):
    from trntrain.backend.cuda import peak_bf16_flops

    assert peak_bf16_flops(name) == (None if tflops is None else tflops * 1e12)


def test_cuda_device_of_a_local_rank():
    from trntrain.backend.cuda import device_index
    from trntrain.errors import UserError

    assert [device_index(r, 8) for r in range(8)] == list(range(8))
    # One visible device per process (CUDA_VISIBLE_DEVICES set per task): always cuda:0.
    assert device_index(3, 1) == 0
    with pytest.raises(UserError, match="LOCAL_RANK=4: this process sees 2 GPUs"):
        device_index(4, 2)
