"""Metric records and where they go: metrics.jsonl and the console (rank 0 only)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

logger = logging.getLogger("trntrain")

# Order and format of the console line; other keys go to metrics.jsonl only.
CONSOLE_FIELDS = [
    ("loss", "{:.4f}"), ("eval_loss", "{:.4f}"), ("lr", "{:.2e}"), ("grad_norm", "{:.3f}"),
    ("tokens_per_s", "{:,.0f}"), ("step_time_s", "{:.3f}"),
]


def format_console(record: dict[str, Any], max_steps: int) -> str:
    parts = [f"step {record['step']}/{max_steps}"]
    for key, fmt in CONSOLE_FIELDS:
        if key in record:
            parts.append(f"{key} {fmt.format(record[key])}")
    return " | ".join(parts)


class MetricsLogger:
    """Writes each record as one JSON line (when given a path) and one console line."""

    def __init__(self, jsonl_path: Path | None, console: bool, max_steps: int) -> None:
        self.console = console
        self.max_steps = max_steps
        self._file = None
        if jsonl_path is not None:
            jsonl_path.parent.mkdir(parents=True, exist_ok=True)
            self._file = jsonl_path.open("a", encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                     for k, v in record.items()}
            self._file.write(json.dumps(clean) + "\n")
            self._file.flush()
        if self.console:
            logger.info(format_console(record, self.max_steps))

    @staticmethod
    def truncate_after(jsonl_path: Path, step: int) -> None:
        """Drop the records after `step`: a resumed run rewrites them."""
        if not jsonl_path.is_file():
            return
        kept = [line for line in jsonl_path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        jsonl_path.write_text("".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
