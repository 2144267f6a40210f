"""Chat data (`data=chat`): conversations in JSON lines, rendered with the tokenizer's
chat template and packed whole into windows of train.seq_len tokens.

A line is `{"messages": [{"role": ..., "content": ...}, ...]}` (roles system, user,
assistant, as in the OpenAI and Hugging Face formats) or `{"prompt": ..., "completion":
...}` (a user turn and an assistant turn). A conversation of L rendered tokens t is one
document of a row: inputs t[:-1], labels t[1:] (IGNORE_INDEX where the label is not
trained: data.train_on=assistant trains only the assistant's tokens), positions 0..L-2,
so it fits a window of T = train.seq_len iff L - 1 <= T.

Packing (data.packing=true) is first-fit decreasing: conversations by length, longest
first (file order between equal lengths), each into the first window it fits, a new one
where none does; a window's conversations then sit in file order and the windows are
ordered by their first conversation. The rest of a window is padding: the end-of-text
token, no trained label, a document of its own. data.packing=false: a window per
conversation, padded. A conversation longer than a window is truncated to T + 1 tokens,
dropped, or an error (data.too_long); none is ever split across windows.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from trntrain.data.base import IGNORE_INDEX, SPLITS, Batch, DataSource, is_validation
from trntrain.data.text import JSONL_SUFFIXES, BadLines, resolve_files
from trntrain.data.tokenizer import ByteChatTemplate, ChatError, ChatTemplate, build_tokenizer
from trntrain.errors import UserError

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
TRAIN_ON = ("assistant", "all")
TOO_LONG = ("truncate", "drop", "fail")
# data.path=demo: the conversations shipped with trntrain (written by demo_jsonl()).
DEMO = "demo"
DEMO_PATH = Path(__file__).parent / "examples" / "chat_demo.jsonl"


def chat_path(path: str | None) -> str | None:
    """data.path with `demo` standing for the shipped demo file."""
    return str(DEMO_PATH) if path == DEMO else path


# -- reading -----------------------------------------------------------------------------------

def parse_conversation(raw: bytes) -> list[dict]:
    """The messages of one JSON line; ChatError (one line) for anything else."""
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise ChatError(f"not valid JSON ({err})") from None
    if not isinstance(record, dict):
        raise ChatError("not a JSON object; valid: {\"messages\": [...]} or "
                        "{\"prompt\": ..., \"completion\": ...}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ChatError("\"messages\" is not a non-empty list of {role, content} objects")
    elif "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                raise ChatError(f"{key!r} is {'missing' if key not in record else 'not a string'}"
                                f"; valid: \"prompt\" and \"completion\" strings")
        return [{"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["completion"]}]
    else:
        raise ChatError("no \"messages\" list and no \"prompt\"/\"completion\" strings")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatError(f"message {i} is not a {{role, content}} object")
        if m.get("role") not in ROLES:
            raise ChatError(f"message {i} has role {m.get('role')!r}; valid: one of {ROLES}")
        if not isinstance(m.get("content"), str):
            got = "missing" if "content" not in m else f"a {type(m['content']).__name__}"
            raise ChatError(f"message {i} ({m['role']}): its content is {got}; valid: a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatError("the conversation has no assistant turn, so nothing in it is trained")
    return messages


def read_conversations(files: list[Path], bad: BadLines) -> Iterator[tuple[str, str, list]]:
    """(where: path:line, key: file name:line for the split, messages) of each line."""
    for path in files:
        with path.open("rb") as f:
            for line_no, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    messages = parse_conversation(raw)
                except ChatError as err:
                    bad.bad(where, str(err))
                    continue
                yield where, f"{path.name}:{line_no}", messages


@dataclass
class Rendered:
    """The conversations of a data config, rendered: (where: path:line, key: file
    name:line for the split, token ids, the template's mask of the assistant's tokens)."""

    conversations: list[tuple[str, str, np.ndarray, np.ndarray]]
    bad: BadLines
    template: ChatTemplate
    pad_id: int


# The last rendering check_files made, by what it depends on: the load in the same
# process takes it instead of rendering every conversation again.
_last_rendered: dict[tuple, Rendered] = {}


def rendering_key(data_cfg: DictConfig, files: list[Path]) -> tuple:
    stats = tuple((str(f.resolve()), f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    return stats, data_cfg.tokenizer, data_cfg.eot_token, data_cfg.on_bad_line


def render_conversations(data_cfg: DictConfig, reuse: bool = False) -> Rendered:
    """Every conversation of the files data.path names, rendered with the chat template
    of data.tokenizer; a bad line (malformed, or one the template fails to render) is a
    UserError naming its file and line, or skipped and counted (data.on_bad_line).
    `reuse`: take (and drop) the rendering check_files made in this process."""
    files = resolve_files(chat_path(data_cfg.path), JSONL_SUFFIXES)
    key = rendering_key(data_cfg, files)
    if reuse and key in _last_rendered:
        return _last_rendered.pop(key)
    tokenizer = build_tokenizer(data_cfg.tokenizer, data_cfg.eot_token)
    template = tokenizer.chat_template()
    bad = BadLines(data_cfg.on_bad_line)
    conversations = []
    for where, split_key, messages in read_conversations(files, bad):
        try:
            ids, mask = template.render(messages)
        except ChatError as err:
            bad.bad(where, str(err))
            continue
        conversations.append((where, split_key, ids, mask))
    rendered = Rendered(conversations, bad, template, tokenizer.eot_id)
    if not reuse:
        _last_rendered.clear()
        _last_rendered[key] = rendered
    return rendered


# -- packing -----------------------------------------------------------------------------------

def first_fit_decreasing(lengths: list[int] | np.ndarray, capacity: int) -> list[list[int]]:
    """Bins (lists of item indices, ascending) holding items of `lengths` <= capacity:
    items longest first (stable: index order between equal lengths), each into the first
    bin with room, a new bin where none has; bins ordered by their first item. A segment
    tree of the bins' free room finds the first that fits in O(log n)."""
    n = len(lengths)
    if n == 0:
        return []
    size = 1
    while size < n:
        size *= 2
    # Leaf b: the room of bin b; bins not opened yet have all of it, so the leftmost fit
    # opens a new one exactly when no open bin fits.
    room = np.full(2 * size, capacity, dtype=np.int64)
    bins: list[list[int]] = []
    for item in np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable").tolist():
        need = int(lengths[item])
        node = 1
        while node < size:
            node = 2 * node if room[2 * node] >= need else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(item)
        room[node] -= need
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    for members in bins:
        members.sort()
    bins.sort(key=lambda members: members[0])
    return bins


@dataclass
class Packed:
    """The conversations of a split and the windows that hold them."""

    tokens: np.ndarray  # every conversation's tokens, in file order
    trained: np.ndarray  # bool per token: its label counts (as the label of the one before)
    starts: np.ndarray  # conversation c is tokens[starts[c]:starts[c + 1]]
    members: list[list[int]]  # the conversations of each window

    def rows(self, windows: list[int], seq_len: int, pad_id: int) -> Batch:
        """Windows as (inputs, labels, positions, documents), (len(windows), seq_len) each."""
        n = len(windows)
        inputs = np.full((n, seq_len), pad_id, dtype=np.int64)
        labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
        positions = np.empty((n, seq_len), dtype=np.int64)
        documents = np.empty((n, seq_len), dtype=np.int64)
        count = np.arange(seq_len)
        for r, w in enumerate(windows):
            at = 0
            for d, c in enumerate(self.members[w]):
                s, e = int(self.starts[c]), int(self.starts[c + 1])
                k = e - s - 1
                inputs[r, at:at + k] = self.tokens[s:e - 1]
                labels[r, at:at + k] = np.where(self.trained[s + 1:e],
                                                self.tokens[s + 1:e].astype(np.int64),
                                                IGNORE_INDEX)
                positions[r, at:at + k] = count[:k]
                documents[r, at:at + k] = d
                at += k
            # Padding: a document of its own, so no real token attends to it.
            positions[r, at:] = count[:seq_len - at]
            documents[r, at:] = len(self.members[w])
        return Batch(*(torch.from_numpy(a) for a in (inputs, labels, positions, documents)))


# -- the source --------------------------------------------------------------------------------

class ChatSource(DataSource):
    """Conversations rendered with the tokenizer's chat template, packed whole."""

    packed = True

    @classmethod
    def tokenizer_vocab_size(cls, data_cfg: DictConfig, model_cfg: DictConfig) -> int:
        return build_tokenizer(data_cfg.tokenizer, data_cfg.eot_token).vocab_size

    @classmethod
    def check_files(cls, data_cfg: DictConfig) -> None:
        """Every line read and rendered with the tokenizer's chat template (JSON, roles,
        string contents, an assistant turn, a template that renders it) before any process
        group exists, so bad input is one error line; the load reuses the rendering."""
        render_conversations(data_cfg)

    def describe(self) -> str:
        path = self.cfg.path
        shown = f"demo: {DEMO_PATH}" if path == DEMO else path
        return f"data.source=chat ({shown})"

    def load_streams(self, model_cfg: DictConfig) -> dict[str, np.ndarray]:
        rendered = render_conversations(self.cfg, reuse=True)
        template = rendered.template
        self.pad_id = rendered.pad_id
        pieces: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {s: [] for s in SPLITS}
        stats = {s: {"too_long": 0, "untrained": 0} for s in SPLITS}
        limit = self.seq_len + 1
        for where, key, ids, mask in rendered.conversations:
            split = "val" if is_validation(key, self.cfg.val_fraction) else "train"
            if self.cfg.train_on == "all":
                mask = np.ones(len(ids), dtype=bool)
            if len(ids) > limit:
                if self.cfg.too_long == "fail":
                    raise UserError(
                        f"{where}: the conversation renders to {len(ids)} tokens, more than "
                        f"train.seq_len + 1 = {limit}; valid: a larger train.seq_len, or "
                        f"data.too_long=truncate (keep its first {limit} tokens) or drop.")
                stats[split]["too_long"] += 1
                if self.cfg.too_long == "drop":
                    continue
                ids, mask = ids[:limit], mask[:limit]
            if not mask[1:].any():  # e.g. truncated before the assistant's first token
                stats[split]["untrained"] += 1
                continue
            pieces[split].append((ids, mask))
        rendered.bad.report(self.describe())
        self._packs = {s: self._pack(s, pieces[s], stats[s], template) for s in SPLITS}
        return {s: p.tokens for s, p in self._packs.items()}

    def _pack(self, split: str, pieces: list[tuple[np.ndarray, np.ndarray]], stats: dict,
              template: ChatTemplate) -> Packed:
        if not pieces:
            raise UserError(
                f"{self.describe()}: the {split} split holds no conversation (data."
                f"val_fraction={self.cfg.val_fraction} of the file's lines go to val); give "
                f"the source more conversations or change data.val_fraction.")
        lengths = [len(ids) - 1 for ids, _ in pieces]
        if self.cfg.packing:
            members = first_fit_decreasing(lengths, self.seq_len)
        else:
            members = [[c] for c in range(len(pieces))]
        packed = Packed(
            tokens=np.concatenate([ids for ids, _ in pieces]),
            trained=np.concatenate([mask for _, mask in pieces]),
            starts=np.cumsum([0] + [len(ids) for ids, _ in pieces]),
            members=members,
        )
        too_long = {"truncate": "truncated", "drop": "dropped", "fail": ""}[self.cfg.too_long]
        logger.info(
            "%s %s: %d conversations (%s) in %d windows of %d tokens (%s), %.1f%% filled; "
            "%d longer than a window %s; %d without a trained token dropped",
            self.describe(), split, len(pieces), template.description, len(members),
            self.seq_len, "packed" if self.cfg.packing else "one each",
            100 * sum(lengths) / (len(members) * self.seq_len), stats["too_long"], too_long,
            stats["untrained"])
        return packed

    def num_samples(self, split: str) -> int:
        return len(self._packs[split].members)

    def samples(self, split: str, indices: torch.Tensor, shuffle: bool = True) -> torch.Tensor:
        raise NotImplementedError("chat rows are packed conversations: read them with batch()")

    def batch(self, split: str, indices: torch.Tensor, shuffle: bool = True) -> Batch:
        windows = self._orders[split].windows(indices, shuffle).tolist()
        return self._packs[split].rows(windows, self.seq_len, self.pad_id)


# -- the demo data -----------------------------------------------------------------------------

DEMO_WORDS = (
    "apple", "river", "stone", "cloud", "green", "light", "music", "table", "paper", "dream",
    "tiger", "ocean", "bread", "chair", "smile", "night", "train", "plant", "house", "storm",
    "quiet", "happy", "brave", "small", "round", "sweet", "early", "north", "lemon", "piano",
)
DEMO_SYSTEM = "You answer in one short line."
DEMO_CONVERSATIONS = 800
DEMO_MAX_TOKENS = 129


class Lcg:
    """A 64-bit linear congruential generator: the same draws on every Python."""

    def __init__(self, seed: int) -> None:
        self.state = seed

    def below(self, n: int) -> int:
        self.state = (self.state * 6364136223846793005 + 1442695040888963407) % 2**64
        return (self.state >> 33) % n


def _demo_exchange(rng: Lcg) -> tuple[str, str]:
    kind = rng.below(4)
    words = " ".join(DEMO_WORDS[rng.below(len(DEMO_WORDS))] for _ in range(1 + rng.below(3)))
    if kind == 0:
        a, b = rng.below(50), rng.below(50)
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}"
    if kind == 1:
        return f"Reverse: {words}", words[::-1]
    if kind == 2:
        return f"Shout: {words}", words.upper()
    n = len(words.split())
    return f"Count the words: {words}", f"{n} word{'s' if n > 1 else ''}"


def demo_records(count: int = DEMO_CONVERSATIONS, seed: int = 7) -> list[dict]:
    """Short conversations of a learnable format: sums, reversed and upper-cased words,
    word counts; some with a system prompt, some of several exchanges (each at most 129
    bytes rendered, so it fits a window of 128), every tenth a prompt/completion pair."""
    rng = Lcg(seed)
    records = []
    for i in range(count):
        if i % 10 == 9:
            prompt, completion = _demo_exchange(rng)
            records.append({"prompt": prompt, "completion": completion})
            continue
        messages = [{"role": "system", "content": DEMO_SYSTEM}] if rng.below(3) == 0 else []
        for turn in range(1 + (rng.below(4) == 0) + (rng.below(8) == 0)):
            question, answer = _demo_exchange(rng)
            more = [{"role": "user", "content": question},
                    {"role": "assistant", "content": answer}]
            # Each conversation fits the default window (train.seq_len=128) in bytes.
            if turn and len(ByteChatTemplate().render(messages + more)[0]) > DEMO_MAX_TOKENS:
                break
            messages += more
        records.append({"messages": messages})
    return records


def demo_jsonl() -> str:
    """The text of the shipped demo file (trntrain/data/examples/chat_demo.jsonl)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in demo_records())


if __name__ == "__main__":  # python -m trntrain.data.chat: rewrite the demo file
    DEMO_PATH.parent.mkdir(parents=True, exist_ok=True)
    DEMO_PATH.write_text(demo_jsonl(), encoding="utf-8")
    print(f"wrote {DEMO_PATH}")
