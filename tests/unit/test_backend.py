"""Backend selection and the Neuron environment (torch-neuronx itself is not installable here)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.conftest import tiny_config
from trntrain.backend import build_backend, detect_backend, resolve_backend_name
from trntrain.backend.neuron import (
    EXTRACT_GRAPHS_ENV,
    NeuronBackend,
    is_precompile,
    neuron_cc_flags,
    neuron_environment,
)
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


def test_neuron_without_torch_neuronx_is_a_clear_error(monkeypatch):
    # The backend exports its environment; let monkeypatch restore it afterwards.
    for key in ("PJRT_DEVICE", "NEURON_CC_FLAGS", "NEURON_RT_STOCHASTIC_ROUNDING_EN"):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    with pytest.raises(UserError, match="backend.name='neuron' is invalid: torch-neuronx"):
        NeuronBackend(0, tiny_config("backend=neuron").backend)


@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is not None,
                    reason="torch_xla is installed here")
def test_xla_without_torch_xla_is_a_clear_error():
    with pytest.raises(UserError, match="backend.name='xla' is invalid: torch_xla"):
        resolve_backend_name("xla")
