"""`trntrain generate PATH`: text from a Hugging Face model directory or a run's latest
checkpoint.

PATH is a Hugging Face directory (`save_pretrained`, or what checkpoint=hf and
`trntrain convert` write), a run directory (its latest checkpoint: a Hugging Face
export if the run wrote one, else the model weights of its DCP checkpoint), or a DCP
checkpoint directory. The model is built through its family's bundle, sharded over
`--tp` ranks under torchrun as the trainer shards it (pp is always 1: every rank runs
the whole model), and decodes with a KV cache (`trntrain.models.layers.KVCache`):
the prompt in one forward, then one token per forward, every step of the same shapes.

Decoding is greedy unless `--temperature` or `--top-p` asks for sampling (seeded by
`--seed`, the same on every rank). It stops at the end-of-turn / end-of-text tokens
(generation_config.json's `eos_token_id`, else config.json's, else the tokenizer's) or
after `--max-new-tokens`. The continuation alone goes to stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from trntrain.distributed import World
from trntrain.errors import UserError
from trntrain.models.layers import KVCache
from trntrain.parallel.comm import Group, all_gather_dim

logger = logging.getLogger("trntrain")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# -- decoding ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """temperature None or 0: greedy (the most likely token), unless top_p < 1, which
    samples at temperature 1."""

    temperature: float | None = None
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return not self.temperature and self.top_p >= 1.0


def choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """The next token of (vocab,) logits: the argmax, or a draw from the smallest set of
    most likely tokens whose probabilities reach top_p (nucleus sampling)."""
    if sampling.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / (sampling.temperature or 1.0), dim=-1)
    ordered, order = probs.sort(descending=True)
    # Keep a token while the probability before it is below top_p: the first always.
    ordered[(ordered.cumsum(0) - ordered) >= sampling.top_p] = 0.0
    return int(order[torch.multinomial(ordered / ordered.sum(), 1, generator=generator)])


@torch.no_grad()
def generate_tokens(model: nn.Module, prompt: Sequence[int], max_new_tokens: int,
                    stop_ids: Iterable[int] = (), sampling: Sampling = Sampling(),
                    tp_group: Group = None, after_step: Callable[[], None] = lambda: None
                    ) -> list[int]:
    """New tokens after `prompt` (ids), at most `max_new_tokens`, up to the first of
    `stop_ids` (left out). `model` is a whole model (its `forward(tokens, positions,
    documents, cache)`), sharded over `tp_group` (its logits are vocabulary slices);
    every rank of the group returns the same tokens. `after_step` runs after each
    forward (a lazy backend cuts its graph there)."""
    if not prompt:
        raise UserError("generate: the prompt is empty; valid: at least one token.")
    stop = set(stop_ids)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(sampling.seed)
    cache = KVCache(len(prompt) + max_new_tokens)
    tokens = torch.tensor([list(prompt)], dtype=torch.int64, device=device)
    positions = torch.arange(len(prompt), device=device)[None]
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(tokens, positions, None, cache)[:, -1]
        logits = all_gather_dim(logits, -1, tp_group)[0]
        after_step()
        token = choose(logits, sampling, generator)
        if token in stop:
            break
        new.append(token)
        position = len(prompt) + len(new) - 1
        tokens = torch.tensor([[token]], dtype=torch.int64, device=device)
        positions = torch.tensor([[position]], dtype=torch.int64, device=device)
    return new


# -- tokenizers ----------------------------------------------------------------------------------


class PromptTokenizer:
    """Text or chat messages to token ids and back, and the ids that end a reply."""

    name: str
    stop_ids: set[int]

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError


class HfPromptTokenizer(PromptTokenizer):
    """A Hugging Face tokenizer directory (`AutoTokenizer`): its special tokens (BOS)
    added to a prompt, its chat template rendering messages."""

    def __init__(self, directory: Path) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise UserError(f"generate: the tokenizer in {directory} needs the 'transformers' "
                            f"package: pip install 'trntrain[hf]'.") from None
        try:
            self._tok = AutoTokenizer.from_pretrained(str(directory))
        except Exception as err:  # noqa: BLE001 - the library's errors vary by tokenizer
            raise UserError(f"generate: {directory} holds no tokenizer transformers can "
                            f"load ({err}); valid: a directory written by save_pretrained, "
                            f"or --tokenizer.") from None
        self.name = str(directory)
        eos = self._tok.eos_token_id
        self.stop_ids = set() if eos is None else {eos}

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text)["input_ids"])

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self._tok, "chat_template", None):
            raise UserError(f"generate: the tokenizer {self.name} has no chat template; valid: "
                            f"--prompt, or a tokenizer with one (--tokenizer).")
        ids = self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=False)
        return list(ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


class TrntrainPromptTokenizer(PromptTokenizer):
    """One of trntrain's tokenizers (`trntrain.data.tokenizer`: byte, a tokenizer.json,
    a tiktoken file): a prompt encoded as a document is, its end-of-text ends a reply."""

    def __init__(self, spec: str) -> None:
        from trntrain.data.tokenizer import build_tokenizer

        self._tok = build_tokenizer(spec)
        self.name = spec
        self.stop_ids = {self._tok.eot_id}

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self._tok.encode(text)]

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The messages and the start of an assistant turn, in the tokenizer's chat
        template: the byte tokenizer's built-in one, as data=chat trained with it."""
        from trntrain.data.tokenizer import ChatError

        try:
            template = self._tok.chat_template()
        except UserError:
            raise UserError(f"generate: --messages needs a tokenizer with a chat template; the "
                            f"{self.name!r} tokenizer has none. Valid: --prompt, or --tokenizer "
                            f"with a Hugging Face tokenizer directory that has a chat_template."
                            ) from None
        try:
            ids = [int(i) for i in template.prompt(messages)]
        except ChatError as err:
            raise UserError(f"generate: --messages: {err}.") from None
        self.stop_ids |= set(template.stop_ids)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def is_hf_tokenizer_dir(path: Path) -> bool:
    return path.is_dir() and (path / "tokenizer_config.json").is_file()


def build_prompt_tokenizer(spec: str) -> PromptTokenizer:
    """byte, a Hugging Face tokenizer directory (tokenizer_config.json: AutoTokenizer, its
    chat template), or what `data.tokenizer` takes (a tokenizer.json, a tiktoken file)."""
    path = Path(spec).expanduser()
    if spec != "byte" and is_hf_tokenizer_dir(path):
        return HfPromptTokenizer(path)
    try:
        return TrntrainPromptTokenizer(spec)
    except UserError as err:
        raise UserError(f"generate: --tokenizer={spec!r}: {err}") from None


# -- the model and its weights -------------------------------------------------------------------


@dataclass
class Source:
    """What PATH holds: the weights (`kind` 'hf' or 'dcp' in `directory`), the model
    config, the tokenizer it comes with and the ids that end a reply, if it says."""

    kind: str
    directory: Path
    model_cfg: DictConfig
    tokenizer: str
    stop_ids: set[int] | None = None  # None: the tokenizer's
    described: str = ""
    run_cfg: DictConfig | None = field(default=None, repr=False)


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError):
        raise UserError(f"generate: {path} is not readable JSON; valid: the file as "
                        f"transformers writes it.") from None
    if not isinstance(value, dict):
        raise UserError(f"generate: {path} is not a JSON object; valid: the file as "
                        f"transformers writes it.")
    return value


def _eos_ids(value: Any) -> set[int] | None:
    if value is None:
        return None
    return {int(v) for v in (value if isinstance(value, list) else [value])}


def hf_model_config(config: dict[str, Any], path: Path) -> DictConfig:
    from trntrain.models import MODEL_FAMILIES, family_for_hf

    model_type = config.get("model_type", "llama")
    family = family_for_hf(model_type)
    if family is None:
        known = sorted(t for f in MODEL_FAMILIES.values() for t in f.hf.model_types)
        raise UserError(f"generate: {path} has model_type={model_type!r}, which no model "
                        f"family reads; valid: one of {known}.")
    try:
        return family.hf.model_config(config)
    except (KeyError, TypeError, AttributeError, ValueError):
        raise UserError(f"generate: {path} is not a readable Hugging Face model config; "
                        f"valid: the config.json that transformers writes.") from None


def resolve_source(path: Path) -> Source:
    """The weights, model config and tokenizer of PATH: a run directory (its latest
    checkpoint, in its config.yaml's checkpoint.dir), a Hugging Face directory or a DCP
    checkpoint directory."""
    from trntrain.checkpoint.dcp import MODEL_CONFIG
    from trntrain.checkpoint.manager import LATEST, checkpoint_dir

    if not path.is_dir():
        raise UserError(f"generate: {path} is not a directory; valid: a Hugging Face model "
                        f"directory, a run directory or a DCP checkpoint.")
    run_cfg = OmegaConf.load(path / "config.yaml") if (path / "config.yaml").is_file() else None
    directory, described = path, str(path)
    if run_cfg is not None and not (path / "config.json").is_file():
        latest = checkpoint_dir(run_cfg, path) / LATEST
        if not latest.is_file():
            raise UserError(f"generate: the run in {path} has no checkpoint ({latest} is "
                            f"missing); valid: a run trained with checkpoint=dcp or "
                            f"checkpoint=hf, or a Hugging Face model directory.")
        directory = latest.parent / latest.read_text().strip()
        described = f"{directory} (the latest checkpoint of the run in {path})"
    run_model = run_cfg.model if run_cfg is not None and "model" in run_cfg else None
    run_tokenizer = (str(OmegaConf.select(run_cfg, "data.tokenizer", default="byte") or "byte")
                     if run_cfg is not None else "byte")
    if (directory / "config.json").is_file():
        config = _json(directory / "config.json")
        model_cfg = run_model if run_model is not None else hf_model_config(
            config, directory / "config.json")
        stop = None
        if (directory / "generation_config.json").is_file():
            stop = _eos_ids(_json(directory / "generation_config.json").get("eos_token_id"))
        if stop is None:
            stop = _eos_ids(config.get("eos_token_id"))
        tokenizer = str(directory) if is_hf_tokenizer_dir(directory) else run_tokenizer
        return Source("hf", directory, model_cfg, tokenizer, stop, described, run_cfg)
    if (directory / ".metadata").is_file():
        if (directory / MODEL_CONFIG).is_file():
            model_cfg = OmegaConf.load(directory / MODEL_CONFIG)
        elif run_model is not None:
            model_cfg = run_model
        else:
            raise UserError(f"generate: the DCP checkpoint {directory} has no {MODEL_CONFIG} "
                            f"and no run config.yaml beside it: its model is unknown; valid: "
                            f"a checkpoint written by trntrain.")
        return Source("dcp", directory, model_cfg, run_tokenizer, None, described, run_cfg)
    raise UserError(f"generate: {directory} is neither a Hugging Face model directory "
                    f"(config.json), a run directory with checkpoints nor a DCP checkpoint "
                    f"(.metadata).")


def check_tensor_parallel(model_cfg: DictConfig, tp: int) -> None:
    """What the tp plan needs of the model (as `parallel.tp` is validated for training)."""
    heads, kv = model_cfg.n_heads, model_cfg.n_kv_heads or model_cfg.n_heads
    problems = [what for what, ok in (
        (f"n_heads={heads}", heads % tp == 0),
        (f"n_kv_heads={kv} (or a multiple of it)", kv % tp == 0 or tp % kv == 0),
        (f"ffn_hidden_dim={model_cfg.ffn_hidden_dim}", model_cfg.ffn_hidden_dim % tp == 0),
        (f"vocab_size={model_cfg.vocab_size}", model_cfg.vocab_size % tp == 0),
    ) if not ok]
    if problems:
        raise UserError(f"generate: --tp={tp} does not divide the model's "
                        f"{', '.join(problems)}; valid: a tp that divides them.")


def load_model(source: Source, device: torch.device, dtype: torch.dtype = torch.float32,
               tp_group: Group = None) -> nn.Module:
    """The whole model of `source`, sharded over `tp_group`, its weights loaded (each rank
    reads its own slices), on `device`, in eval mode."""
    from trntrain.checkpoint.hf import load_hf_weights
    from trntrain.checkpoint.weights import load_dcp_weights
    from trntrain.models import build_model, materialize

    with torch.device("meta"):
        model = build_model(source.model_cfg, tp_group, sequence_parallel=False)
    # Initialised, then overwritten: initialisation also fills the family's buffers
    # (the rotary tables), which no checkpoint holds.
    materialize(model, device, seed=0)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    if source.kind == "hf":
        load_hf_weights(source.directory, [model], source.model_cfg)
    else:
        load_dcp_weights(source.directory, [model], source.model_cfg)
    return model.eval()


# -- the command ---------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trntrain generate", description=(
        "Generate text from a Hugging Face model directory, a run directory (its latest "
        "checkpoint) or a DCP checkpoint, or from LoRA adapters (a LoRA run, its "
        "checkpoint or a PEFT adapter directory) merged into their base. The continuation "
        "alone is printed on stdout, "
        "logs on stderr. Several ranks: torchrun --nproc-per-node N -m trntrain generate "
        "PATH --tp N."))
    p.add_argument("path", type=Path, help="HF model directory, run directory or DCP checkpoint")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the text to continue")
    prompt.add_argument("--messages", type=Path, help="a JSON file with a list of "
                        "{role, content} messages, rendered by the tokenizer's chat template "
                        "with the assistant's turn to come")
    p.add_argument("--max-new-tokens", type=int, default=128, help="at most this many new "
                   "tokens (default 128)")
    p.add_argument("--temperature", type=float, help="sample at this temperature (default: "
                   "greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the most likely tokens "
                   "whose probabilities reach P (nucleus sampling; default 1: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    p.add_argument("--base", type=Path, help="the base model directory of LoRA adapters "
                   "(default: the one the run or adapter_config.json names)")
    p.add_argument("--tokenizer", help="byte, a Hugging Face tokenizer directory, a "
                   "tokenizer.json or a tiktoken file (default: PATH's tokenizer, else the "
                   "run's data.tokenizer, else byte)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-turn or "
                   "end-of-text tokens: always --max-new-tokens")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (default 1; the "
                   "world size must be a multiple)")
    p.add_argument("--pp", type=int, default=1, help="must be 1: generate runs the whole model "
                   "on every rank")
    p.add_argument("--backend", default="auto", help="auto (default: as backend=auto "
                   "trains), cpu, cuda, xla or neuron")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="weights and activations (default fp32)")
    return p


def read_messages(path: Path) -> list[dict[str, str]]:
    valid = "valid: a JSON list of {\"role\": ..., \"content\": ...} objects"
    try:
        messages = json.loads(path.read_bytes())
    except OSError as err:
        raise UserError(f"generate: --messages={str(path)!r} cannot be read: "
                        f"{err.strerror or err}; {valid}.") from None
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"generate: --messages={str(path)!r} is not JSON; {valid}.") from None
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages)):
        raise UserError(f"generate: --messages={str(path)!r} is not a list of messages; "
                        f"{valid}.")
    return messages


def check_options(args: argparse.Namespace, world_size: int) -> None:
    if args.pp != 1:
        raise UserError(f"generate: --pp={args.pp} is not supported; valid: --pp=1 (generate "
                        f"runs the whole model on every rank: split it with --tp instead).")
    if args.tp < 1 or world_size % args.tp:
        raise UserError(f"generate: --tp={args.tp} does not divide the {world_size} "
                        f"process(es); valid: a divisor of the world size (torchrun "
                        f"--nproc-per-node).")
    if args.max_new_tokens < 1:
        raise UserError(f"generate: --max-new-tokens={args.max_new_tokens}; valid: 1 or more.")
    if args.temperature is not None and args.temperature < 0:
        raise UserError(f"generate: --temperature={args.temperature}; valid: 0 (greedy) or "
                        f"more.")
    if not 0 < args.top_p <= 1:
        raise UserError(f"generate: --top-p={args.top_p}; valid: 0 < P <= 1.")


def generate_main(argv: list[str]) -> None:
    """`trntrain generate`: parse, load, decode, print (rank 0) the continuation."""
    from trntrain.cli import reported
    from trntrain.distributed import world_from_env

    args = parser().parse_args(argv)
    world = world_from_env()
    with tempfile.TemporaryDirectory(prefix="trntrain-merged-") as scratch:
        with reported(speak=world.is_main):
            check_options(args, world.world_size)
            source = adapted_source(args.path, args.base, Path(scratch))
        generate(args, source, world)


def adapted_source(path: Path, base: Path | None, scratch: Path) -> Source:
    """The source of PATH; LoRA adapters are merged into their base first, written to
    `scratch` (each rank merges its own copy: no collective before the model loads)."""
    from trntrain.checkpoint.convert import holds_adapters, merge_adapters

    if not holds_adapters(path):
        if base is not None:
            raise UserError(f"generate: --base is for LoRA adapters, and {path} holds none; "
                            f"valid: leave --base out, or give a LoRA run, its checkpoint or a "
                            f"PEFT adapter directory.")
        return resolve_source(path)
    base = merge_adapters(path, scratch / "merged", base)
    source = resolve_source(scratch / "merged")
    # The base's tokenizer, else the run's data.tokenizer, else byte.
    run_cfg = OmegaConf.load(path / "config.yaml") if (path / "config.yaml").is_file() else None
    if is_hf_tokenizer_dir(base):
        source.tokenizer = str(base)
    elif run_cfg is not None:
        source.tokenizer = str(OmegaConf.select(run_cfg, "data.tokenizer", default=None)
                               or "byte")
    source.described = f"{path} (LoRA adapters merged into {base})"
    return source


def generate(args: argparse.Namespace, source: Source, world: World) -> None:
    """Load the model of `source` on this rank's device and print the continuation."""
    from trntrain.backend import build_backend
    from trntrain.checkpoint.manager import verify_checksums_agreed
    from trntrain.cli import reported
    from trntrain.config import compose
    from trntrain.distributed import destroy_process_group, init_process_group
    from trntrain.parallel import ParallelDims, build_mesh
    from trntrain.run_dir import setup_logging

    with reported(speak=world.is_main):
        check_tensor_parallel(source.model_cfg, args.tp)
        tokenizer = build_prompt_tokenizer(args.tokenizer or source.tokenizer)
        ids = (tokenizer.chat(read_messages(args.messages)) if args.messages is not None
               else tokenizer.encode(args.prompt))
        if not ids:
            raise UserError("generate: the prompt encodes to no tokens; valid: a non-empty "
                            "--prompt.")
        limit = source.model_cfg.max_seq_len
        if len(ids) + args.max_new_tokens - 1 > limit:
            raise UserError(f"generate: {len(ids)} prompt tokens and --max-new-tokens="
                            f"{args.max_new_tokens} exceed the model's {limit} positions "
                            f"(model.max_seq_len); valid: a shorter prompt or fewer new "
                            f"tokens.")
        backend = build_backend(compose([f"backend={args.backend}"]).backend, world.local_rank)
    setup_logging(None, world, "INFO")
    init_process_group(world, backend.cfg.timeout_s, **backend.process_group_kwargs())
    try:
        with reported(speak=world.is_main):
            mesh = build_mesh(ParallelDims(args.tp, 1, world.world_size // args.tp), world.rank,
                              backend.group_options)
            if source.kind == "dcp":
                verify_checksums_agreed(source.directory, world.is_main)
            start = time.perf_counter()
            model = load_model(source, backend.device, DTYPES[args.dtype], mesh.tp_group)
            logger.info("loaded %s (%s, tp=%d) in %.1f s; tokenizer %s", source.described,
                        source.model_cfg.get("name", "model"), args.tp,
                        time.perf_counter() - start, tokenizer.name)
            stop = set() if args.ignore_eos else (
                source.stop_ids if source.stop_ids is not None else tokenizer.stop_ids)
            sampling = Sampling(args.temperature, args.top_p, args.seed)
            start = time.perf_counter()
            new = generate_tokens(model, ids, args.max_new_tokens, stop, sampling,
                                  mesh.tp_group, backend.cut_graph)
            seconds = time.perf_counter() - start
            logger.info("%d prompt tokens, %d new tokens in %.2f s (%.1f tokens/s)%s", len(ids),
                        len(new), seconds, len(new) / max(seconds, 1e-9),
                        "" if len(new) == args.max_new_tokens else ", stopped at an end token")
            if world.is_main:
                text = tokenizer.decode(new)
                sys.stdout.write(text + ("\n" if sys.stdout.isatty() else ""))
                sys.stdout.flush()
    finally:
        destroy_process_group()
