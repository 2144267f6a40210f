"""The frozen base of a LoRA run: its fingerprint, recorded in checkpoints and checked
on resume (adapters trained on one base mean nothing on another).

The fingerprint is a SHA-256 over the base's safetensors files (names and bytes), read
once by one rank when the run starts (a second read of the base: about 16 s for 8 B
parameters in bf16 at 1 GB/s); a random base (peft.allow_random_base) is fingerprinted
by the seed it is drawn from.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from trntrain.errors import UserError

RECORD = "peft.yaml"  # beside a DCP checkpoint: the adapters' settings and their base
KEY = "peft.base_sha256"


def base_fingerprint(init_from: str | None, seed: int) -> str:
    """Hex SHA-256 of the base weights' files, or of the seed of a random base."""
    digest = hashlib.sha256()
    if init_from is None:
        digest.update(f"random base from train.seed={seed}".encode())
        return digest.hexdigest()
    for path in sorted(Path(init_from).glob("*.safetensors")):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


class BaseWeights:
    """`peft.base_sha256`: the fingerprint of the base a LoRA run trains on, as 32 bytes;
    loading a checkpoint of another base is refused in one line."""

    def __init__(self, peft: DictConfig, init_from: str | None, fingerprint: str) -> None:
        self.peft = peft
        self.init_from = init_from
        self.fingerprint = fingerprint

    def state_dict(self) -> dict[str, Any]:
        return {KEY: torch.tensor(list(bytes.fromhex(self.fingerprint)), dtype=torch.uint8)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = bytes(state[KEY].tolist()).hex()
        if saved != self.fingerprint:
            raise UserError(
                f"checkpoint.init_from={self.init_from!r} is not the base these LoRA adapters "
                f"were trained on (its fingerprint {self.fingerprint[:12]} differs from the "
                f"recorded {saved[:12]}); valid: the checkpoint.init_from the run started from "
                f"(its {RECORD}).")

    def write_record(self, directory: Path) -> None:
        """peft.yaml beside the checkpoint: what `trntrain convert --merge` needs."""
        record = OmegaConf.create({**OmegaConf.to_container(self.peft, resolve=True),
                                   "init_from": str(Path(self.init_from).resolve())
                                   if self.init_from else None,
                                   "base_sha256": self.fingerprint})
        OmegaConf.save(record, directory / RECORD)


def read_record(directory: Path) -> dict[str, Any] | None:
    path = directory / RECORD
    if not path.is_file():
        return None
    return json.loads(json.dumps(OmegaConf.to_container(OmegaConf.load(path))))
