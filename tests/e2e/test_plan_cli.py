"""`trntrain plan` from the command line: text, JSON, search, errors, and the warning
`trntrain train` gives for a layout that does not fit."""

from __future__ import annotations

import json

import pytest

from trntrain.cli import main

pytestmark = pytest.mark.e2e

LLAMA3_8B_32 = ["+experiment=llama3_8b_trn1_32nodes"]


def plan_cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(["plan", *args])
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_plan_text_for_llama3_8b_on_32_trn1_nodes(capsys):
    code, out, err = plan_cli(capsys, *LLAMA3_8B_32)
    assert code == 0, err
    assert "llama3_8b on 32 x trn1_32xlarge (1024 cores)" in out
    for part in ("parameters", "gradients", "optimizer states", "activations", "total",
                 "fits in 14 GiB (16 less 2 reserved)", "attention s x s",
                 "gradient buckets", "recompute buffer", "tp collectives",
                 "dp gradient sync", "MFU"):
        assert part in out


def test_plan_json_for_llama3_8b_on_32_trn1_nodes(capsys):
    code, out, err = plan_cli(capsys, *LLAMA3_8B_32, "plan.format=json")
    assert code == 0, err
    result = json.loads(out)
    assert {"memory_per_core_gib", "fits", "step_time_s", "tokens_per_s", "mfu", "tp", "pp",
            "dp", "sequence_parallel", "zero1", "activation_checkpointing", "schedule",
            "virtual_pp", "microbatches", "micro_batch_size", "memory_gib", "time_s"} <= set(result)
    assert (result["tp"], result["pp"], result["dp"]) == (8, 1, 128)
    assert result["fits"] is True
    assert (result["memory_limit_gib"], result["memory_reserved_gib"],
            result["memory_budget_gib"]) == (16, 2.0, 14.0)
    assert result["memory_per_core_gib"] <= result["memory_budget_gib"]
    assert result["memory_per_core_gib"] == pytest.approx(sum(result["memory_gib"].values()))
    assert result["step_time_s"] == pytest.approx(sum(result["time_s"].values()))


@pytest.mark.parametrize(("cluster", "cores", "peak"), [
    ("trn1_32xlarge", 32, 95e12), ("trn2_48xlarge", 64, 166.75e12), ("p5_48xlarge", 8, 989e12)])
def test_mfu_is_model_flops_over_the_cluster_peak(capsys, cluster, cores, peak):
    code, out, err = plan_cli(capsys, "model=llama3_8b", f"cluster={cluster}", "cluster.nodes=4",
                              "train.seq_len=4096", "train.global_batch_size=256",
                              "train.precision=bf16", "parallel.tp=8", "parallel.zero1=true",
                              "plan.format=json")
    assert code == 0, err
    result = json.loads(out)
    # Hand count: 6 N + 12 L h s FLOPs per token, N the matmul parameters of Llama-3-8B.
    h, f, kv, layers, vocab = 4096, 14336, 1024, 32, 128256
    n = layers * (2 * h * h + 2 * h * kv + 3 * h * f) + vocab * h
    flops = result["tokens_per_s"] * (6 * n + 12 * layers * h * 4096)
    assert result["mfu"] == pytest.approx(flops / (4 * cores * peak), rel=1e-6)


def test_plan_search_json_is_a_ranked_list_of_fitting_layouts(capsys):
    code, out, err = plan_cli(capsys, "model=llama3_8b", "cluster=trn1_32xlarge",
                              "cluster.nodes=2", "train.seq_len=4096",
                              "train.global_batch_size=32", "train.precision=bf16",
                              "plan.search=true", "plan.format=json")
    assert code == 0, err
    plans = json.loads(out)
    assert isinstance(plans, list) and plans
    assert all(p["fits"] is True for p in plans)
    speeds = [p["tokens_per_s"] for p in plans]
    assert speeds == sorted(speeds, reverse=True)
    assert all(p["tp"] * p["cp"] * p["pp"] * p["dp"] == 64 for p in plans)
    assert any(p["cp"] > 1 for p in plans)  # 4096 tokens: cp=2 keeps chunks of 1024


def test_plan_search_text_shows_the_top_layouts(capsys):
    code, out, err = plan_cli(capsys, "model=llama3_8b", "cluster=trn1_32xlarge",
                              "train.seq_len=2048", "train.global_batch_size=32",
                              "train.precision=bf16", "plan.search=true", "plan.top=3")
    assert code == 0, err
    rows = [line for line in out.splitlines() if line[:3].strip().isdigit()]
    assert len(rows) == 3 and "overrides of #1: parallel.tp=" in out


@pytest.mark.parametrize(("args", "message"), [
    (["plan.format=xml"], "plan.format='xml' is invalid"),
    (["plan.compute_efficiency=2"], "plan.compute_efficiency=2"),
    (["plan.search=true"], "cluster='local' is invalid"),
    (["plan.nonsense=1"], "plan.nonsense"),
    (["model=llama3_8b", "cluster=trn1_32xlarge", "parallel.tp=3"], "parallel.tp=3"),
])
def test_bad_plan_input_is_one_error_line(capsys, args, message):
    code, out, err = plan_cli(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("trntrain: error: ")
    assert message in lines[0], lines[0]
    assert "Traceback" not in out + err


def test_train_warns_before_launch_when_the_layout_does_not_fit(capsys, monkeypatch, tmp_path):
    """The warning comes before any process group, which this test replaces by an exit."""
    monkeypatch.setenv("WORLD_SIZE", "32")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    import trntrain.cli as cli

    def stop(*args, **kwargs):
        raise SystemExit(3)

    monkeypatch.setattr("trntrain.distributed.init_process_group", stop)
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "model=llama3_8b", "cluster=trn1_32xlarge", "train.seq_len=8192",
                  "train.global_batch_size=32", "train.precision=bf16", "backend=cpu",
                  "data=synthetic", f"run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert info.value.code == 3, err
    assert "trntrain: warning: the planner estimates" in err and "plan.search=true" in err
    assert "leaves 14 GiB of its 16 GiB (cluster.reserved_memory_gib=2" in err


def test_search_at_128k_tokens_proposes_context_parallelism(capsys):
    """The acceptance command: at 128k tokens on one Trn1 node only layouts with cp fit
    the 16 GiB cores, with the all-gather attention (the neuron one) and tp x cp within
    the node; the model's 8k context is extended for the plan, with a note."""
    args = ["model=llama3_8b", "cluster=trn1_32xlarge", "train.seq_len=131072",
            "plan.search=true", "train.precision=bf16", "train.global_batch_size=8"]
    code, out, err = plan_cli(capsys, *args, "plan.format=json")
    assert code == 0, err
    assert "planned with model.max_seq_len=131072" in err and "rope_scaling" in err
    plans = json.loads(out)
    assert plans and all(p["cp"] > 1 for p in plans)
    for p in plans:
        assert p["fits"] and p["memory_per_core_gib"] <= p["memory_budget_gib"] == 14.0
        assert p["cp_attention"] == "allgather" and p["tp"] * p["cp"] <= 32
        assert p["time_s"]["cp_attention"] > 0
    # Where nothing fits (fp32 on one node), the table says what would make room.
    from trntrain.config import compose
    from trntrain.plan.report import table

    empty = table([], compose(args[:3]), 10)
    assert "0 layouts fit: none within 14 GiB per core" in empty
    assert "cluster.nodes=1 now" in empty
