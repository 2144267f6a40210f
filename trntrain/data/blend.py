"""Several sources mixed by weight (`data.blend`), deterministically.

The global samples are cut into blocks of BLOCK. Within every block source d owns
round(w_d * BLOCK) positions (largest remainders, so they sum to BLOCK), spread
evenly: its j-th position sits where (j + 1/2) / count_d falls among all sources'.
Global sample g is then sample `block * count_d + j` of source d, which that
source maps to a window in its own seeded epoch order. Any stretch of n samples
holds n * w_d +- 2 samples of source d, and the sample of any position is found
without replaying the ones before it, which is what resuming needs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from omegaconf import DictConfig

from trntrain.data.base import DataSource
from trntrain.errors import UserError

BLOCK = 1 << 16


def block_layout(weights: list[float], block: int = BLOCK) -> tuple[np.ndarray, np.ndarray,
                                                                       np.ndarray]:
    """(samples of each source per block, source of each position, rank of each
    position among its source's in the block)."""
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    exact = w * block
    counts = np.floor(exact).astype(np.int64)
    short = block - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    position = np.concatenate([(np.arange(c) + 0.5) / c for c in counts if c])
    source = np.concatenate([np.full(c, d) for d, c in enumerate(counts) if c])
    rank = np.concatenate([np.arange(c) for c in counts if c])
    order = np.lexsort((source, position))
    return counts, source[order], rank[order]


class BlendSource(DataSource):
    """Not a stream of its own: positions are dealt to the component sources."""

    def __init__(self, data_cfg: DictConfig, components: list[DataSource],
                 weights: list[float]) -> None:
        self.cfg = data_cfg
        self.components = components
        self.weights = weights
        self.seq_len = components[0].seq_len
        self.counts, self.block_source, self.block_rank = block_layout(weights)

    @classmethod
    def tokenizer_vocab_size(cls, data_cfg: DictConfig, model_cfg: DictConfig) -> int | None:
        raise NotImplementedError("validate.py checks each entry of data.blend")

    @property
    def ids_unchecked(self) -> bool:
        return any(c.ids_unchecked for c in self.components)

    def load_streams(self, model_cfg: DictConfig) -> dict[str, np.ndarray]:
        raise NotImplementedError("a blend has no stream of its own")

    def describe(self) -> str:
        return "data.blend"

    def num_tokens(self, split: str) -> int:
        return sum(c.num_tokens(split) for c in self.components)

    def num_samples(self, split: str) -> int:
        return sum(c.num_samples(split) for c in self.components)

    def samples(self, split: str, indices: torch.Tensor, shuffle: bool = True) -> torch.Tensor:
        g = indices.numpy()
        block, position = np.divmod(g, BLOCK)
        source = self.block_source[position]
        within = block * self.counts[source] + self.block_rank[position]
        # Assembled in numpy: a fresh torch tensor of this size pays a page fault per 4 kB.
        out = np.empty((len(g), self.seq_len + 1), dtype=np.int64)
        for d in np.unique(source).tolist():
            rows = np.flatnonzero(source == d)
            out[rows] = self.components[d].samples(split, torch.from_numpy(within[rows]),
                                                   shuffle).numpy()
        return torch.from_numpy(out)


def check_weight(weight: object, field: str) -> float:
    if (isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0
            or not math.isfinite(weight)):
        raise UserError(f"{field}={weight!r} is invalid; valid: a positive finite number (the "
                        f"weights of data.blend are normalised to sum to 1).")
    return float(weight)


def data_entries(data_cfg: DictConfig) -> list[tuple[float, DictConfig]]:
    """(weight, data config) of each source: the data config alone, or data.blend's."""
    return blend_entries(data_cfg) if data_cfg.blend else [(1.0, data_cfg)]


def blend_entries(data_cfg: DictConfig) -> list[tuple[float, DictConfig]]:
    """(weight, data config) of each entry of data.blend: the enclosing data config with
    the entry's keys replaced, in the schema of the entry's source."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from trntrain.config.schema import DATA_SCHEMAS, DataConfig

    out = []
    for i, entry in enumerate(data_cfg.blend):
        field = f"data.blend[{i}]"
        if not isinstance(entry, DictConfig) or "weight" not in entry:
            raise UserError(f"{field}={entry!r} is invalid; valid: a mapping with a weight and "
                            f"the data keys that differ, e.g. {{weight: 0.5, path: data/a}}.")
        weight = check_weight(entry.weight, f"{field}.weight")
        source = entry.get("source", data_cfg.source)
        schema = DATA_SCHEMAS.get(source, DataConfig)
        names = set(schema.__dataclass_fields__)
        # An unset (null) key of the enclosing source leaves the entry's own default.
        inherited = {k: v for k, v in data_cfg.items()
                     if k in names and k != "blend" and v is not None}
        own = {k: v for k, v in entry.items() if k != "weight"}
        valid = f"valid keys for source {source}: weight and {sorted(names - {'blend'})}"
        unknown = sorted(set(own) - names) if schema is not DataConfig else []
        if unknown:
            raise UserError(f"{field}.{unknown[0]} is not a key of data source {source}; "
                            f"{valid}.")
        try:
            merged = OmegaConf.merge(OmegaConf.structured(schema), inherited, own)
        except OmegaConfBaseException as err:
            raise UserError(f"{field}: {str(err).splitlines()[0]}; {valid}.") from None
        if merged.blend:
            raise UserError(f"{field}.blend is set; valid: blends do not nest.")
        out.append((weight, merged))
    counts = block_layout([w for w, _ in out])[0]
    for i, count in enumerate(counts):
        if count == 0:
            raise UserError(
                f"data.blend[{i}].weight={out[i][0]!r} is invalid: it is so small against the "
                f"others that the source gets no sample in a block of {BLOCK}; valid: at "
                f"least 1/{BLOCK} of the weights' sum ({sum(w for w, _ in out) / BLOCK:.3g}).")
    return out
