"""backend=cuda against eager CPU on the same seed: every single-process feature, DCP
resume, HF export, nonfinite=skip, evaluation, and the device's peak memory against the
planner. Skipped where no GPU is visible; `tests/gpu/run.sh` runs it on a GPU machine."""

from __future__ import annotations

import pytest

from tests.gpu import parity

BACKEND = parity.device_backend()

pytestmark = pytest.mark.skipif(not parity.device_available(BACKEND),
                                reason=f"backend {BACKEND}: no CUDA device visible")


@pytest.mark.parametrize("name", parity.FEATURES)
def test_feature_equals_eager_cpu(name, results):
    results.run(name, lambda: parity.check_feature(name, BACKEND))


def test_evaluation_equals_eager_cpu(results):
    results.run("evaluation", lambda: parity.check_evaluation(BACKEND))


def test_nonfinite_skip_skips_the_same_step(results):
    results.run("nonfinite_skip", lambda: parity.check_nonfinite_skip(BACKEND))


def test_dcp_resume_is_bitwise(results, tmp_path):
    results.run("dcp_resume_bitwise", lambda: parity.check_dcp_resume(BACKEND, tmp_path))


def test_hf_export_reads_back(results, tmp_path):
    results.run("hf_export_read_back", lambda: parity.check_hf_export(BACKEND, tmp_path))


@pytest.mark.parametrize("layout", parity.memory_layouts())
def test_device_peak_memory_against_the_planner(layout, results):
    results.run(f"memory_{layout}", lambda: parity.check_memory(layout, BACKEND))
