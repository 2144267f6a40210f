"""launch/: the torchrun wrapper on two "nodes" of this machine, SLURM's dry run,
shellcheck, the cluster topology checks and the experiment presets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port
from trntrain.backend.neuron import neuron_cc_flags
from trntrain.config import ConfigError, compose, config_dir, validate

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SHORT = ["train.max_steps=6", "train.seq_len=32", "train.global_batch_size=8",
         "train.micro_batch_size=2", "train.eval_every=3", "logging.every=1",
         "logging.progress_bar=false", "data.max_bytes=300000"]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").open()]


def test_two_nodes_tp_inside_pp_across(tmp_path):
    """Two torchrun agents, c10d rendezvous on 127.0.0.1, 2 processes each: tp=2 on
    each node's ranks, pp=2 across the nodes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([str(BIN / "trntrain"), "train", *SHORT, "run.dir=single"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stderr
    node_env = {**env, "NNODES": "2", "NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port()),
                "RDZV_ID": "two-nodes", "TRNTRAIN_BIN": str(BIN)}
    args = [str(ROOT / "launch" / "torchrun.sh"), *SHORT, "parallel.tp=2", "parallel.pp=2",
            "run.dir=two_nodes"]
    nodes = [subprocess.Popen(args, cwd=tmp_path, env={**node_env, "NODE_RANK": str(n)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, stderr
    assert losses(tmp_path / "two_nodes") == pytest.approx(losses(tmp_path / "single"),
                                                           rel=1e-5)
    log = (tmp_path / "two_nodes" / "train.log").read_text()
    assert "tp=2 pp=2 dp=1" in log
    assert sorted(p.name for p in (tmp_path / "two_nodes" / "logs").iterdir()) == [
        f"rank_{r}.log" for r in range(4)]


def test_slurm_dry_run_prints_every_node(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_NODELIST": "trn-[1-2]", "PRECOMPILE": "1", "RUN_DIR": "/fsx/runs/77"}
    fake_scontrol = tmp_path / "scontrol"
    fake_scontrol.write_text("#!/bin/sh\nprintf 'trn-1\\ntrn-2\\n'\n")
    fake_scontrol.chmod(0o755)
    env["PATH"] = f"{tmp_path}:{env['PATH']}"
    proc = subprocess.run([str(ROOT / "launch" / "slurm_trn1.sbatch"),
                           "+experiment=llama3_8b_trn1_32nodes"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.count("# node ") == 2 and "# node 1 of 2: trn-2" in out
    assert out.count("neuron_parallel_compile ") == 2
    assert "--rdzv-endpoint=trn-1:29500" in out and "--rdzv-id=77" in out
    assert "--nnodes=2 --nproc-per-node=32" in out
    assert "cluster.nodes=2 run.dir=/fsx/runs/77 +experiment=llama3_8b_trn1_32nodes" in out
    assert "FI_PROVIDER=efa" in out and "NEURON_COMPILE_CACHE_URL=/fsx/neuron_cache" in out
    # The Neuron runtime's settings and the open-file limit, on every node.
    assert out.count("NEURON_RT_NUM_CORES=32 NEURON_RT_RESET_CORES=1") == 2
    assert out.count("MALLOC_ARENA_MAX=64") == 2
    assert out.count(f"ulimit -n {open_file_limit()}\n") == 2
    # The compiler's flags agree with what the config implies for the same overrides,
    # so the run does not warn that the environment overrides it.
    flags = "--model-type=transformer -O2 --cache_dir=/fsx/neuron_cache"
    assert out.count(f"export NEURON_CC_FLAGS='{flags}'") == 2
    cfg = compose(["backend=neuron", "backend.compile_cache_dir=/fsx/neuron_cache",
                   "+experiment=llama3_8b_trn1_32nodes"])
    assert neuron_cc_flags(cfg.backend) == flags
    assert "train backend.compile_cache_dir=/fsx/neuron_cache backend=neuron" in out


def open_file_limit(wanted: int = 65535) -> int:
    """What the launchers raise the soft limit to: 65535, or the hard limit if lower."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)


def test_slurm_per_host_compile_cache(tmp_path):
    """NEURON_CACHE_PER_HOST=1: each node compiles into <NEURON_CACHE>/<its hostname>,
    away from the file locking AWS warns about on FSx."""
    env = {**os.environ, "DRY_RUN": "1", "SLURM_JOB_ID": "78", "SLURM_JOB_NUM_NODES": "2",
           "NEURON_CACHE_PER_HOST": "1", "NEURON_CACHE": "/fsx/cache"}
    fake_scontrol = tmp_path / "scontrol"
    fake_scontrol.write_text("#!/bin/sh\nprintf 'trn-1\\ntrn-2\\n'\n")
    fake_scontrol.chmod(0o755)
    env["PATH"] = f"{tmp_path}:{env['PATH']}"
    proc = subprocess.run([str(ROOT / "launch" / "slurm_trn1.sbatch"), "train.max_steps=5"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    nodes = proc.stdout.split("# node ")[1:]
    for node, host in zip(nodes, ("trn-1", "trn-2"), strict=True):
        assert f"export NEURON_COMPILE_CACHE_URL=/fsx/cache/{host}\n" in node
        assert f"--cache_dir=/fsx/cache/{host}'" in node
        assert f"backend.compile_cache_dir=/fsx/cache/{host} " in node


def torchrun_dry_run(tmp_path, **variables: str) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NPROC_PER_NODE", "NEURON_RT_NUM_CORES")}
    env.update({"DRY_RUN": "1", "NEURON_DEVICE_DIR": str(tmp_path / "dev"), **variables})
    proc = subprocess.run([str(ROOT / "launch" / "torchrun.sh")], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_torchrun_starts_one_process_per_neuron_core(tmp_path):
    (tmp_path / "dev").mkdir()
    cpu = min(os.cpu_count() or 1, 4)
    out = torchrun_dry_run(tmp_path)
    assert f"--nproc-per-node={cpu} " in out  # no Neuron device: the CPU default
    assert f"ulimit -n {open_file_limit()}\n" in out
    assert "--nproc-per-node=8 " in torchrun_dry_run(tmp_path, NEURON_RT_NUM_CORES="8")
    # A trn1.32xlarge's 16 Trainium devices, 2 NeuronCores each.
    for i in range(16):
        (tmp_path / "dev" / f"neuron{i}").touch()
    assert "--nproc-per-node=32 " in torchrun_dry_run(tmp_path)
    # neuron-ls --json-output (its documented form): the cores it reports win, here a
    # trn2 at LNC=2, 4 logical cores on each of 16 devices.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    devices = ",".join(f'{{"neuron_device": {i}, "nc_count": 4, "logical_neuroncore_config": 2}}'
                       for i in range(16))
    (bin_dir / "neuron-ls").write_text(f"#!/bin/sh\necho '[{devices}]'\n")
    (bin_dir / "neuron-ls").chmod(0o755)
    out = torchrun_dry_run(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}")
    assert "--nproc-per-node=64 " in out
    assert "--nproc-per-node=3 " in torchrun_dry_run(tmp_path, NPROC_PER_NODE="3")


def test_shell_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck") or str(BIN / "shellcheck")
    if not Path(shellcheck).exists():
        pytest.skip("shellcheck not installed")
    scripts = [str(ROOT / "launch" / n) for n in ("torchrun.sh", "slurm_trn1.sbatch")]
    scripts += [str(ROOT / "tests" / "gpu" / n) for n in ("run.sh", "wheels.sh")]
    proc = subprocess.run([shellcheck, *scripts], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_kubernetes_manifest_is_a_pytorchjob():
    job = yaml.safe_load((ROOT / "launch" / "k8s" / "pytorchjob.yaml").read_text())
    assert job["kind"] == "PyTorchJob"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] + replicas["Worker"]["replicas"] == 32
    container = replicas["Worker"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert "--nproc-per-node=32" in args and "+experiment=llama3_8b_trn1_32nodes" in args
    # What AWS's EKS samples set (aws-neuron-eks-samples, neuronx-distributed's EKS
    # branches): the pod interface for the collectives, core reset, bounded malloc arenas.
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["CCOM_SOCKET_IFNAME"] == "eth0" and env["NEURON_RT_RESET_CORES"] == "1"
    assert env["MALLOC_ARENA_MAX"] == "64" and env["FI_PROVIDER"] == "efa"
    # The command raises the open-file limit, then runs torchrun with the args.
    command = container["command"]
    assert command[:2] == ["/bin/bash", "-c"] and command[2].startswith("ulimit -n 65535 && ")
    # Run as written, but with a limit any machine allows and echo for torchrun: the
    # args reach torchrun unchanged.
    script = command[2].replace("65535", "256").replace("exec torchrun", "exec echo")
    ran = subprocess.run([*command[:2], script, *command[3:], *args], capture_output=True,
                         text=True)
    assert ran.returncode == 0 and ran.stdout.split() == args, ran.stderr


def test_launch_generates_the_kubernetes_manifest_of_the_cluster(capsys):
    """The manifest in launch/k8s/ is what `trntrain launch --k8s` makes of the 8B
    preset; on trn1n it requests 16 EFA interfaces, and the replicas follow the nodes."""
    checked_in = yaml.safe_load((ROOT / "launch" / "k8s" / "pytorchjob.yaml").read_text())
    code, out, err = launch_cli(capsys, "--k8s", "+experiment=llama3_8b_trn1_32nodes",
                                "run.dir=/fsx/runs/trntrain-llama3-8b")
    assert code == 0, err
    assert yaml.safe_load(out) == checked_in
    code, out, err = launch_cli(capsys, "--k8s", "+experiment=llama3_70b_trn1_64nodes",
                                "cluster=trn1n_32xlarge")
    assert code == 0, err
    job = yaml.safe_load(out)
    assert job["metadata"]["name"] == "trntrain-llama3-70b"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 63)
    pod = replicas["Worker"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["vpc.amazonaws.com/efa"] == 16
    assert pod["nodeSelector"]["node.kubernetes.io/instance-type"] == "trn1n.32xlarge"
    assert pod["containers"][0]["args"][:2] == ["--nnodes=64", "--nproc-per-node=32"]
    assert "run.dir=/fsx/runs/trntrain-llama3-70b" in pod["containers"][0]["args"]
    code, out, err = launch_cli(capsys, "--k8s", "model=llama3_8b", "cluster=p5_48xlarge")
    assert code == 2 and "cluster='p5_48xlarge' is invalid" in err


def test_efa_devices_of_each_cluster():
    """AWS's figures: trn1.32xlarge 8 EFA interfaces, trn1n.32xlarge 16 (as in
    aws-neuron-eks-samples' trn1_dist_ddp.py)."""
    assert compose(["cluster=trn1_32xlarge"]).cluster.efa_devices == 8
    assert compose(["cluster=trn1n_32xlarge"]).cluster.efa_devices == 16
    assert compose([]).cluster.efa_devices is None
    with pytest.raises(ConfigError, match="cluster.efa_devices=0"):
        validate(compose(["cluster=trn1_32xlarge", "cluster.efa_devices=0",
                          "train.global_batch_size=32"]), 32)


@pytest.mark.parametrize("name", sorted(p.stem for p in (config_dir() / "experiment").iterdir()))
def test_experiment_presets_are_valid_layouts(name):
    cfg = compose([f"+experiment={name}"])
    cores = cfg.cluster.procs_per_node or 1
    validate(cfg, cfg.cluster.nodes * cores)
    p = cfg.parallel
    world = cfg.cluster.nodes * cores
    assert world % (p.tp * p.pp) == 0 and p.tp <= cores


@pytest.mark.parametrize(("overrides", "world_size", "key", "valid"), [
    (["cluster=trn1_32xlarge", "cluster.nodes=2", "train.global_batch_size=64"], 32,
     "cluster.nodes",
     "32 processes were started but cluster.nodes x cluster.procs_per_node = 2 x 32 = 64"),
    (["cluster=trn1_32xlarge", "parallel.tp=64", "model=llama3_70b"], 64, "parallel.tp",
     "a divisor of cluster.procs_per_node=32"),
])
def test_topology_errors(overrides, world_size, key, valid):
    with pytest.raises(ConfigError) as info:
        validate(compose(overrides), world_size)
    assert info.value.key == key and valid in str(info.value)


def test_trntrain_launch_prints_each_nodes_command():
    proc = subprocess.run([str(BIN / "trntrain"), "launch", "+experiment=llama3_8b_trn1_64nodes",
                           "--master-addr=10.1.2.3"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines.count("# node 63 of 64 (trn1_32xlarge)") == 1 and len(lines) == 128
    assert ("torchrun --nnodes=64 --nproc-per-node=32 --rdzv-backend=c10d "
            "--rdzv-endpoint=10.1.2.3:29500") in lines[1]
    bad = subprocess.run([str(BIN / "trntrain"), "launch", "cluster=trn1_32xlarge",
                          "parallel.tp=3"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "parallel.tp=3 is invalid" in bad.stderr


def launch_cli(capsys, *args: str) -> tuple[int, str, str]:
    from trntrain.cli import main

    with pytest.raises(SystemExit) as info:
        main(["launch", *args])
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_launch_on_local_starts_the_processes_the_layout_asks_for(capsys):
    """cluster=local sets no processes per node: launch, like plan, starts tp x pp x dp."""
    code, out, err = launch_cli(capsys, "parallel.tp=2", "parallel.pp=2")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "# node 0 of 1 (local)" and len(lines) == 2
    assert lines[1].startswith("torchrun --nnodes=1 --nproc-per-node=4 --standalone -m "
                               "trntrain train parallel.tp=2 parallel.pp=2")
    code, out, err = launch_cli(capsys, "parallel.tp=3", "cluster.nodes=2")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("trntrain: error: ")
    assert "cluster.nodes=2 is invalid" in lines[0] and "a divisor of 3" in lines[0]
