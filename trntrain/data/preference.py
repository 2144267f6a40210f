"""Preference pairs (`data=preference`): a prompt with a chosen and a rejected response,
for the preference objectives (trntrain/objective/).

A line is `{"prompt": ..., "chosen": ..., "rejected": ...}`: the prompt a string (one
user turn) or a list of messages; each response a string (one assistant turn) or a list
of messages that follow the prompt. Prompt + response is rendered with the chat template
of data.tokenizer (as `data=chat`), and only the response's tokens are trained: their
log-probability is what the objectives compare.

One pair is one row of train.seq_len tokens: the chosen conversation (document 0), the
rejected one (document 1), then padding (document 2). Each document attends only to
itself, its positions restarting at 0, so both responses go through the model in the
same micro-batch (pipeline stages and dp ranks keep a pair together), and a row's
`pairs` entry is the pair's index in its split (what precomputed reference
log-probabilities are looked up by).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from trntrain.data.base import IGNORE_INDEX, SPLITS, Batch, DataSource, is_validation
from trntrain.data.chat import DEMO_WORDS as CHAT_WORDS
from trntrain.data.chat import ROLES, Lcg, rendering_key
from trntrain.data.text import JSONL_SUFFIXES, BadLines, resolve_files
from trntrain.data.tokenizer import ChatError, ChatTemplate, build_tokenizer
from trntrain.errors import UserError

logger = logging.getLogger(__name__)

TOO_LONG = ("fail", "drop")
CHOSEN, REJECTED, PADDING = 0, 1, 2
# data.path=demo: pairs of a learnable preference (written by demo_jsonl()).
DEMO = "demo"
DEMO_PATH = Path(__file__).parent / "examples" / "preference_demo.jsonl"


def preference_path(path: str | None) -> str | None:
    return str(DEMO_PATH) if path == DEMO else path


def _messages(value: object, role: str, key: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        got = "missing" if value is None else "neither a string nor a non-empty list"
        raise ChatError(f"{key!r} is {got}; valid: a string or a list of {{role, content}} "
                        f"messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(
                m.get("content"), str):
            raise ChatError(f"{key!r} message {i} is not a {{role, content}} object with a "
                            f"role in {ROLES} and a string content")
    return value


def parse_pair(raw: bytes) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) messages of one JSON line; ChatError for anything else."""
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise ChatError(f"not valid JSON ({err})") from None
    if not isinstance(record, dict):
        raise ChatError("not a JSON object; valid: {\"prompt\": ..., \"chosen\": ..., "
                        "\"rejected\": ...}")
    prompt = _messages(record.get("prompt"), "user", "prompt")
    chosen = _messages(record.get("chosen"), "assistant", "chosen")
    rejected = _messages(record.get("rejected"), "assistant", "rejected")
    for key, response in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["role"] == "assistant" and m["content"] for m in response):
            raise ChatError(f"the {key} response is empty (no assistant turn with content): "
                            f"a pair compares two non-empty responses")
    return prompt, chosen, rejected


def render_response(template: ChatTemplate, prompt: list[dict], response: list[dict]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(token ids of prompt + response, mask of the response's trained tokens): the
    template's assistant tokens after the prompt's own rendering."""
    ids, mask = template.render(prompt + response)
    if any(m["role"] == "assistant" for m in prompt):
        head, _ = template.render(prompt)
        if len(head) > len(ids) or not np.array_equal(ids[:len(head)], head):
            raise ChatError("the chat template does not render the prompt as the start of "
                            "prompt + response, so the response's tokens are not defined")
        start = len(head)
    else:
        start = 0
    mask = mask.copy()
    mask[:start] = False
    if not mask[1:].any():
        raise ChatError("a response renders to no trained token")
    return ids, mask


def check_fits(where: str, chosen: np.ndarray, rejected: np.ndarray, seq_len: int) -> None:
    length = len(chosen) - 1 + len(rejected) - 1
    if length > seq_len:
        raise UserError(
            f"{where}: the pair renders to {len(chosen)} (prompt + chosen) and {len(rejected)} "
            f"(prompt + rejected) tokens, {length} inputs together, more than the row of "
            f"train.seq_len={seq_len} that holds both; valid: a larger train.seq_len, a "
            f"shorter prompt, or data.too_long=drop.")


# The last rendering, by what it depends on: the checks before the run and the load in
# the same process share it.
_last_rendered: dict[tuple, tuple[list, BadLines, int]] = {}


@dataclass
class Pairs:
    """The pairs of a split: chosen and rejected (ids, response mask) each."""

    chosen: list[tuple[np.ndarray, np.ndarray]]
    rejected: list[tuple[np.ndarray, np.ndarray]]

    def __len__(self) -> int:
        return len(self.chosen)

    def rows(self, pairs: list[int], seq_len: int, pad_id: int) -> Batch:
        n = len(pairs)
        inputs = np.full((n, seq_len), pad_id, dtype=np.int64)
        labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
        positions = np.empty((n, seq_len), dtype=np.int64)
        documents = np.full((n, seq_len), PADDING, dtype=np.int64)
        count = np.arange(seq_len)
        for r, p in enumerate(pairs):
            at = 0
            for document, (ids, mask) in ((CHOSEN, self.chosen[p]), (REJECTED, self.rejected[p])):
                k = len(ids) - 1
                inputs[r, at:at + k] = ids[:-1]
                labels[r, at:at + k] = np.where(mask[1:], ids[1:].astype(np.int64), IGNORE_INDEX)
                positions[r, at:at + k] = count[:k]
                documents[r, at:at + k] = document
                at += k
            positions[r, at:] = count[:seq_len - at]
        return Batch(*(torch.from_numpy(a) for a in (inputs, labels, positions, documents)),
                     pairs=torch.tensor(pairs, dtype=torch.int64))

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for ids, mask in (*self.chosen, *self.rejected):
            digest.update(np.asarray(ids, dtype=np.int64).tobytes())
            digest.update(np.packbits(mask).tobytes())
        return digest.hexdigest()


class PreferenceSource(DataSource):
    """Preference pairs, one per row (chosen and rejected as two documents)."""

    packed = True

    @classmethod
    def tokenizer_vocab_size(cls, data_cfg: DictConfig, model_cfg: DictConfig) -> int:
        return build_tokenizer(data_cfg.tokenizer, data_cfg.eot_token).vocab_size

    @classmethod
    def check_files(cls, data_cfg: DictConfig) -> None:
        """Every line read and rendered before any process group exists."""
        cls.render(data_cfg)

    @classmethod
    def check_lengths(cls, data_cfg: DictConfig, seq_len: int) -> None:
        """With data.too_long=fail, the first pair that does not fit a row is a UserError
        naming its line, before any process group exists."""
        if data_cfg.too_long == "fail":
            for where, _, chosen, rejected in cls.render(data_cfg)[0]:
                check_fits(where, chosen[0], rejected[0], seq_len)

    @classmethod
    def render(cls, data_cfg: DictConfig) -> tuple[list, BadLines, int]:
        """[(where, split key, chosen (ids, mask), rejected (ids, mask))], the bad lines,
        the padding id; the last rendering of the same files and settings is reused (the
        checks before the run and the load)."""
        files = resolve_files(preference_path(data_cfg.path), JSONL_SUFFIXES)
        key = rendering_key(data_cfg, files)
        if key not in _last_rendered:
            _last_rendered.clear()
            _last_rendered[key] = cls._render(data_cfg, files)
        return _last_rendered[key]

    @classmethod
    def _render(cls, data_cfg: DictConfig, files: list[Path]) -> tuple[list, BadLines, int]:
        tokenizer = build_tokenizer(data_cfg.tokenizer, data_cfg.eot_token)
        template = tokenizer.chat_template()
        bad = BadLines(data_cfg.on_bad_line)
        pairs = []
        for path in files:
            with path.open("rb") as f:
                for line_no, raw in enumerate(f, start=1):
                    if not raw.strip():
                        continue
                    where = f"{path}:{line_no}"
                    try:
                        prompt, chosen, rejected = parse_pair(raw)
                        pairs.append((where, f"{path.name}:{line_no}",
                                      render_response(template, prompt, chosen),
                                      render_response(template, prompt, rejected)))
                    except ChatError as err:
                        bad.bad(where, str(err))
        return pairs, bad, tokenizer.eot_id

    def describe(self) -> str:
        shown = f"demo: {DEMO_PATH}" if self.cfg.path == DEMO else self.cfg.path
        return f"data.source=preference ({shown})"

    def load_streams(self, model_cfg: DictConfig) -> dict[str, np.ndarray]:
        rendered, bad, self.pad_id = self.render(self.cfg)
        splits = {s: Pairs([], []) for s in SPLITS}
        dropped = 0
        for where, key, chosen, rejected in rendered:
            if len(chosen[0]) - 1 + len(rejected[0]) - 1 > self.seq_len:
                if self.cfg.too_long == "fail":
                    check_fits(where, chosen[0], rejected[0], self.seq_len)
                dropped += 1
                continue
            split = splits["val" if is_validation(key, self.cfg.val_fraction) else "train"]
            split.chosen.append(chosen)
            split.rejected.append(rejected)
        bad.report(self.describe())
        for split, pairs in splits.items():
            if not len(pairs):
                raise UserError(
                    f"{self.describe()}: the {split} split holds no pair (data.val_fraction="
                    f"{self.cfg.val_fraction} of the lines go to val); give the source more "
                    f"pairs or change data.val_fraction.")
        logger.info("%s: %d train and %d val pairs, one per row of %d tokens; %d longer than "
                    "a row dropped", self.describe(), len(splits["train"]), len(splits["val"]),
                    self.seq_len, dropped)
        self._pairs = splits
        return {s: np.concatenate([ids for ids, _ in (*p.chosen, *p.rejected)])
                for s, p in splits.items()}

    def num_samples(self, split: str) -> int:
        return len(self._pairs[split])

    def fingerprint(self) -> str:
        """SHA-256 of every pair's tokens and masks, both splits, and the row length."""
        digest = hashlib.sha256(f"seq_len={self.seq_len}".encode())
        for split in SPLITS:
            digest.update(self._pairs[split].fingerprint().encode())
        return digest.hexdigest()

    def samples(self, split: str, indices: torch.Tensor, shuffle: bool = True) -> torch.Tensor:
        raise NotImplementedError("preference rows are pairs: read them with batch()")

    def batch(self, split: str, indices: torch.Tensor, shuffle: bool = True) -> Batch:
        pairs = self._orders[split].windows(indices, shuffle).tolist()
        return self._pairs[split].rows(pairs, self.seq_len, self.pad_id)


# -- the demo data -----------------------------------------------------------------------------

DEMO_WORDS = CHAT_WORDS[:16]
DEMO_PAIRS = 600


def demo_records(count: int = DEMO_PAIRS, seed: int = 11) -> list[dict]:
    """Pairs with a learnable preference: the prompt asks to shout some words; the chosen
    response upper-cases them, the rejected one repeats them unchanged or reversed. Each
    pair fits a row of the default train.seq_len=128."""
    below = Lcg(seed).below
    records = []
    for _ in range(count):
        words = " ".join(DEMO_WORDS[below(len(DEMO_WORDS))] for _ in range(1 + below(2)))
        rejected = words if below(2) else words[::-1]
        records.append({"prompt": f"Shout: {words}", "chosen": words.upper(),
                        "rejected": rejected})
    return records


def demo_jsonl() -> str:
    """The text of the shipped demo file (trntrain/data/examples/preference_demo.jsonl)."""
    return "".join(json.dumps(r) + "\n" for r in demo_records())


if __name__ == "__main__":  # python -m trntrain.data.preference: rewrite the demo file
    DEMO_PATH.write_text(demo_jsonl(), encoding="utf-8")
    print(f"wrote {DEMO_PATH}")
