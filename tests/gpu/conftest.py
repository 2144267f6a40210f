"""The GPU checks' results: each check's record, written as JSON at the end of the session
to $TRNTRAIN_GPU_RESULTS/parity.json where that variable names a folder (tests/gpu/run.sh)."""

from __future__ import annotations

import json
import os
import platform
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.gpu.parity import CheckFailed


def environment() -> dict[str, Any]:
    """What ran the checks: torch, the GPU, the time."""
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30,
                    cuda=torch.version.cuda)
    return info


class Results:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def run(self, name: str, check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run a check, keeping its record whether it passes, fails or raises."""
        start = time.perf_counter()
        try:
            record = check()
        except CheckFailed as failed:
            self.records.append({**failed.record, "check": name, "passed": False,
                                 "seconds": time.perf_counter() - start})
            raise
        except Exception as err:
            self.records.append({"check": name, "passed": False, "error": repr(err),
                                 "traceback": traceback.format_exc(limit=8),
                                 "seconds": time.perf_counter() - start})
            raise
        self.records.append({**record, "check": name, "seconds": time.perf_counter() - start})
        return record

    def write(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "parity.json"
        summary = {"environment": environment(), "checks": self.records,
                   "passed": sum(r["passed"] for r in self.records),
                   "failed": sum(not r["passed"] for r in self.records)}
        path.write_text(json.dumps(summary, indent=1, default=str))
        return path


@pytest.fixture(scope="session")
def results() -> Results:
    collected = Results()
    yield collected
    folder = os.environ.get("TRNTRAIN_GPU_RESULTS")
    if folder and collected.records:
        collected.write(Path(folder))
