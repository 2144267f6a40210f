"""Property: any invalid override given to `trntrain train` or `trntrain plan` ends in one
clear message and exit status 2, never a traceback, a hang or a started run."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trntrain.cli import main

# Every value here is invalid whatever else is set (VALID_SOMETIMES cannot rescue it):
# a valid combination would start a real run.
KEYS = {
    "model.dim": st.integers(-64, 0), "model.n_heads": st.integers(-2, 0),
    "model.n_kv_heads": st.integers(-2, 0), "model.vocab_size": st.integers(-5, 256),
    "model.n_layers": st.integers(-2, 0), "train.max_steps": st.integers(-5, 0),
    "train.seq_len": st.sampled_from([0, -1, 5000, 100000]),
    "train.global_batch_size": st.integers(-3, 0), "train.micro_batch_size": st.integers(-3, 0),
    "train.precision": st.sampled_from(["fp16", "bf8", "", "FP32"]),
    "optim.lr": st.sampled_from([0, -1, "fast", "1e-3e"]),
    "optim.betas": st.sampled_from(["[0.9]", "[1.5,0.9]", "[a,b]"]),
    "optim.decay": st.sampled_from(["exp", "step", "1"]),
    "parallel.tp": st.integers(3, 9), "parallel.pp": st.integers(-1, 0),
    "parallel.schedule": st.sampled_from(["zb", "1F1B", ""]),
    "parallel.pp_transport": st.sampled_from(["rdma", "send"]),
    "parallel.activation_checkpointing": st.sampled_from(["all", "yes"]),
    "data.val_fraction": st.sampled_from([0, 1, -0.5, 2]),
    "backend.name": st.sampled_from(["tpu", "gpu", "metal"]),
    "logging.every": st.integers(-3, 0), "logging.sinks": st.sampled_from(["[graphite]", "x"]),
    "checkpoint.every": st.sampled_from([-1, "often"]),
    "checkpoint.resume": st.sampled_from(["/nonexistent/ckpt", "sometimes"]),
    "model": st.sampled_from(["llama_huge", "gpt2", "../model"]),
    "data": st.sampled_from(["parquet", "none"]), "cluster": st.sampled_from(["trn9"]),
    "train.unknown_key": st.integers(0, 3), "nonsense": st.just("1"),
}
VALID_SOMETIMES = {
    "model.dim": st.sampled_from([128, 256]), "train.max_steps": st.sampled_from([1, 2]),
    "optim.lr": st.sampled_from([1e-3, 3e-4]), "parallel.tp": st.just(1),
}


# Invalid for `trntrain plan` only (train ignores the plan section).
PLAN_KEYS = {
    **KEYS, "plan.format": st.sampled_from(["xml", "", "JSON"]),
    # A sequence beyond model.max_seq_len is planned with the context extended (a note).
    "train.seq_len": st.sampled_from([0, -1]),
    "plan.compute_efficiency": st.sampled_from([0, 1.5, -1, "fast"]),
    "plan.top": st.integers(-3, 0), "plan.search": st.sampled_from(["maybe", "2"]),
}


@st.composite
def invalid_overrides(draw, keys: dict = KEYS) -> list[str]:
    bad = draw(st.lists(st.sampled_from(sorted(keys)), min_size=1, max_size=3, unique=True))
    fine = draw(st.lists(st.sampled_from(sorted(VALID_SOMETIMES)), max_size=2, unique=True))
    overrides = [f"{k}={draw(keys[k])}" for k in bad]
    overrides += [f"{k}={draw(VALID_SOMETIMES[k])}" for k in fine if k not in bad]
    return draw(st.permutations(overrides))


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=invalid_overrides())
def test_invalid_train_overrides_exit_cleanly(overrides, capfd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["train", *overrides, "logging.progress_bar=false"])
    out, err = capfd.readouterr()
    assert info.value.code == 2, (overrides, err)
    assert "Traceback" not in out + err, (overrides, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("trntrain: error: "), (overrides, err)
    assert not (tmp_path / "runs").exists()


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=st.one_of(
    invalid_overrides(PLAN_KEYS).map(lambda o: ["plan", *o]),
    # A search sets the layout keys itself: every other bad key must still be reported.
    invalid_overrides({k: v for k, v in PLAN_KEYS.items() if not k.startswith("parallel.")})
    .map(lambda o: ["plan", "plan.search=true", "cluster=trn1_32xlarge", *o])))
def test_invalid_plan_overrides_exit_cleanly(overrides, capfd):
    with pytest.raises(SystemExit) as info:
        main(overrides)
    out, err = capfd.readouterr()
    assert info.value.code == 2, (overrides, err)
    assert "Traceback" not in out + err, (overrides, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("trntrain: error: "), (overrides, err)
