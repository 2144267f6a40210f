"""The GPU check's CPU-side parts, in the normal suite: the parity harness run with
backend=cpu on both sides, its comparisons and result file, and the benchmark's
arguments, figures and files (on llama_tiny)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import tiny_config
from tests.gpu import bench_mfu, parity
from tests.gpu.conftest import Results
from trntrain.distributed import World
from trntrain.trainer import Trainer

# -- the comparisons -------------------------------------------------------------------------


def test_relative_gap_is_the_worst_pair():
    assert parity.relative_gap([1.0, 2.2, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(0.1)
    assert parity.relative_gap([float("nan"), 1.0], [float("nan"), 1.0]) == 0.0
    assert parity.relative_gap([float("nan"), 1.0], [0.5, 1.0]) == math.inf
    assert parity.relative_gap([1.0], [1.0, 1.0]) == math.inf


def test_compare_passes_within_the_tolerance_and_fails_outside():
    ok = parity.compare("x", [1.00005], [1.0], 1e-4, "cuda")
    assert ok["passed"] and ok["max_rel_gap"] == pytest.approx(5e-5)
    with pytest.raises(parity.CheckFailed, match="x: cuda differs from cpu by 0.0002") as err:
        parity.compare("x", [1.0002], [1.0], 1e-4, "cuda")
    assert err.value.record["passed"] is False


def test_memory_record_band():
    planned = {"params": 1.0, "total": 10.0}
    assert parity.memory_record("m", "cuda", planned, 10.5, 11.0, )["ratio"] == 1.05
    assert parity.memory_record("m", "cpu", planned, None, None)["ratio"] is None
    for peak in (8.0, 12.0):
        with pytest.raises(parity.CheckFailed):
            parity.memory_record("m", "cuda", planned, peak, peak)


def test_results_file_keeps_passes_failures_and_errors(tmp_path):
    results = Results()
    results.run("good", lambda: parity.compare("good", [1.0], [1.0], 1e-4, "cpu"))
    with pytest.raises(parity.CheckFailed):
        results.run("bad", lambda: parity.compare("bad", [2.0], [1.0], 1e-4, "cpu"))
    with pytest.raises(ZeroDivisionError):
        results.run("broken", lambda: 1 / 0)
    written = json.loads(results.write(tmp_path / "out").read_text())
    assert [(c["check"], c["passed"]) for c in written["checks"]] == [
        ("good", True), ("bad", False), ("broken", False)]
    assert written["passed"] == 1 and written["failed"] == 2
    assert "ZeroDivisionError" in written["checks"][2]["error"]
    assert written["environment"]["torch"] == torch.__version__


# -- the harness on cpu against cpu ----------------------------------------------------------


def test_gpu_tests_skip_without_the_device():
    assert parity.device_available("cpu")
    assert parity.device_available("cuda") == torch.cuda.is_available()


def test_feature_check_runs_on_cpu():
    record = parity.check_feature("plain_step", "cpu")
    # The same backend on both sides: the same arithmetic, bitwise.
    assert record["passed"] and record["max_rel_gap"] == 0.0
    assert len(record["measured"]) == parity.STEPS


def test_every_feature_config_composes():
    for name, (overrides, rel) in parity.FEATURES.items():
        cfg = tiny_config("backend=cpu", *overrides)
        assert rel in (parity.FP32_REL, parity.BF16_REL), name
        assert (cfg.train.precision != "fp32") == (rel == parity.BF16_REL), name


def test_dcp_resume_and_hf_export_checks_run_on_cpu(tmp_path):
    assert parity.check_dcp_resume("cpu", tmp_path / "dcp")["passed"]
    record = parity.check_hf_export("cpu", tmp_path / "hf")
    assert record["passed"] and record["weights_max_abs_gap"] == 0.0


def test_memory_check_plans_the_layout_it_runs():
    planned = parity.planned_gib([], "cuda")
    parts = {k: v for k, v in planned.items() if k != "total"}
    assert planned["total"] == pytest.approx(sum(parts.values()))
    # bf16 weights with fp32 masters and moments: 2 + 4 + 8 bytes a weight at least.
    cfg = tiny_config(*parity.MEMORY_OVERRIDES)
    m = cfg.model
    weights = (2 * m.vocab_size * m.dim + m.n_layers * (
        2 * m.dim * m.dim + 2 * m.dim * m.dim * m.n_kv_heads // m.n_heads
        + 3 * m.dim * m.ffn_hidden_dim + 2 * m.dim) + m.dim)
    assert planned["total"] > 14 * weights / 2**30


# -- the benchmark ---------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "message"), [
    (["--cases", "3b"], "'3b' is not one of"),
    (["--loops", "fast"], "'fast' is not one of"),
    (["--device", "cpu", "--steps", "0"], "--steps must be at least 1"),
])
def test_bench_refuses_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_mfu.parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_bench_refuses_cuda_without_a_gpu(capsys):
    with pytest.raises(SystemExit):
        bench_mfu.parse_args([])
    assert "no CUDA device is visible" in capsys.readouterr().err


def test_bench_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    args = bench_mfu.parse_args(["--device", "cpu"])
    assert args.out == tmp_path and args.cases == ["1b", "8b"]
    assert args.loops == ["trntrain", "bare", "bare_compile"]
    # The 8b case shortens its sequence on a GPU under 100 GiB only.
    cfg = bench_mfu.case_config(bench_mfu.CASES["8b"], "cpu", [])
    assert cfg.train.seq_len == 8192 and cfg.parallel.activation_checkpointing == "full"


# The precisions of the 1b and 8b cases.
@pytest.mark.parametrize("precision", [
    ["train.precision=bf16"],
    ["train.precision=bf16", "train.master_weights=false", "train.stochastic_rounding=false"]])
def test_bare_loop_does_trntrains_work(precision):
    """The same first two steps (losses) from the same weights and batch: the benchmark
    times the same work on both sides. Well inside one bf16 step (3.9e-3): the two sum
    the loss in another order, which moves a bf16-rounded value by one step now and then
    (measured 1.3e-5)."""
    cfg = bench_mfu.case_config(bench_mfu.CASES["tiny"], "cpu",
                                [*precision, "optim.warmup_steps=0"])
    trainer = Trainer(cfg, World(), run_dir=None)
    batches = trainer.train_batches.step(0)
    bare = bench_mfu.BareLoop(bench_mfu.bare_model(cfg, torch.device("cpu")), cfg)
    pairs = bench_mfu.first_batches(cfg, torch.device("cpu"))
    assert all(torch.equal(a, b.inputs) for (a, _), b in zip(pairs, batches, strict=True))
    for _ in range(2):
        ours = trainer.train_step(batches)[0].item()
        theirs = bare.step(pairs).item()
        assert ours == pytest.approx(theirs, rel=1e-4)


def test_bench_writes_its_figures(tmp_path):
    report = bench_mfu.main(["--cases", "tiny", "--device", "cpu", "--loops", "trntrain,bare",
                             "--steps", "2", "--warmup", "0", "--peak-tflops", "2",
                             "--out", str(tmp_path)])
    written = json.loads((tmp_path / "bench.json").read_text())
    assert written["cases"][0]["ratio_trntrain_over_bare"] == report["cases"][0][
        "ratio_trntrain_over_bare"]
    case = written["cases"][0]
    loops = case["loops"]
    # By hand for llama_tiny (h 128, 4 layers, 8 heads of 16, 4 kv heads, ffn 384,
    # vocab 264, seq 128): 6 x matmul weights (q, k, v, o, SwiGLU, head) + 12 L q T.
    h, layers, kv, f, vocab, seq = 128, 4, 64, 384, 264, 128
    per_token = 6 * (layers * (2 * h * h + 2 * h * kv + 3 * h * f) + vocab * h) \
        + 12 * layers * h * seq
    tokens = 4 * seq
    for figures in loops.values():
        assert len(figures["step_s"]) == 2
        assert figures["median_step_s"] == pytest.approx(sum(figures["step_s"]) / 2)
        assert figures["tokens_per_s"] == pytest.approx(tokens / figures["median_step_s"])
        assert figures["mfu"] == pytest.approx(figures["tokens_per_s"] * per_token / 2e12)
    assert case["ratio_trntrain_over_bare"] == pytest.approx(
        loops["trntrain"]["median_step_s"] / loops["bare"]["median_step_s"])
    assert case["ratio_within_bound"] == (case["ratio_trntrain_over_bare"] <= 1.03)
    table = (tmp_path / "bench.md").read_text()
    assert "| tiny | 128 | 512 | trntrain |" in table and "ratio trntrain / bare" in table


def test_bench_budget_skips_the_remaining_loops(tmp_path):
    report = bench_mfu.main(["--cases", "tiny", "--device", "cpu", "--loops", "trntrain,bare",
                             "--steps", "1", "--warmup", "0", "--budget-s", "0",
                             "--out", str(tmp_path)])
    loops = report["cases"][0]["loops"]
    assert all("time budget" in figures["skipped"] for figures in loops.values())
    assert report["cases"][0]["ratio_trntrain_over_bare"] is None
