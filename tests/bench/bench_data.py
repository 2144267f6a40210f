"""Data loading throughput against what training consumes, and `trntrain prepare` throughput.

1. writer: random tokens (--tokens, uint16 and int32, documents of geometric length
   around --doc-tokens) written with `IndexedDatasetWriter` into a temporary
   directory in /tmp, MB/s including the writer's fsync;
2. loader: tokens/s of `StepBatches.step(s)` for consecutive steps, as the trainer
   builds it (vocab_size given: the id check runs), reading one dp rank's share
   (global batch / dp samples) for each --seq-lens and --dp, from the indexed
   datasets page-cached and cold (`posix_fadvise(DONTNEED)` on the .bin first, only
   as many steps as keep to the first --cold-fraction of the windows), a 0.7/0.3
   blend of two indexed datasets, and the in-memory default `corpus`. Two
   references read the same number of windows of the same stream: one contiguous
   copy of as many bytes, and a loop-free gather (one fancy index of random
   windows, then int64);
3. start-up: opening and validating an index of --index-sequences sequences (warm
   and cold), `build_data_source` of `data=indexed` on the dataset of part 1, and of
   `data=jsonl` (tokenized at start) on the JSONL of part 5 with the byte and the
   BPE tokenizer;
4. consumption: tokens/s of the default `llama_tiny` training run on this CPU
   (`trntrain train`, metrics.jsonl), and the tokens/s one data-parallel rank of
   Llama-3-8B on 32 trn1.32xlarge needs (`trntrain plan`'s cluster tokens/s over
   dp; if the planner cannot run, an estimate from 6N FLOPs per token, said so);
   each against the loader: the headroom;
5. prepare: MB/s of input and of text of `trntrain.data.prepare.prepare` with
   --workers, on ~--prepare-mb of JSONL made from the Python standard library's
   .py files (one document per file, repeated), for the byte tokenizer, a
   ByteLevel BPE trained here (tokenizers, --vocab ids, tokenizer.json) and a
   tiktoken file made from its ranks; and the same texts as parquet when pyarrow
   is installed.

Nothing is downloaded. Read the figures as rough: the machine is shared (the load
average is printed) and each loader figure is the median of --repeats. torch runs
--threads intra-op threads (default 1, what torchrun gives each of several ranks):
with 2 on this shared 2-core machine, the loader's one reduction (the id check's
`max`) was measured at ~8 ms whatever the tensor's size, waiting on a thread the
other work had descheduled, 500x its 1-thread time on 32 x 2049 ids. Prints
figures; never asserts on time. Run from the repository root:

    .venv/bin/python -m tests.bench.bench_data
    .venv/bin/python -m tests.bench.bench_data --only loader --tokens 50e6
    .venv/bin/python -m tests.bench.bench_data --only prepare --prepare-mb 16 --workers 1 2
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trntrain.config import compose
from trntrain.data import DataSource, StepBatches, build_data_source
from trntrain.data.corpus import corpus_files, stdlib_root
from trntrain.data.indexed import IndexedDataset, IndexedDatasetWriter, optimal_dtype
from trntrain.data.prepare import Settings, prepare

MB = 1e6
SECTIONS = ("loader", "startup", "train", "prepare")
# Vocabularies of the random datasets: Llama 2's (uint16) and Llama 3's (int32).
VOCABS = {"uint16": 32_000, "int32": 128_256}
PLAN_EXPERIMENT = "llama3_8b_trn1_32nodes"


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def drop_page_cache(path: Path) -> None:
    """Evict path's clean pages; pages still mapped by a live memmap stay, so callers
    drop their maps first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def fill_page_cache(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass


def cached_fraction(path: Path) -> float | None:
    """Share of path's pages in the page cache (util-linux fincore), None without it."""
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                             capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None
    return int(out[0]) / max(path.stat().st_size, 1)


def fmt_rate(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.1f} {suffix}{unit}"
    return f"{x:.0f} {unit}".rstrip()


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                     for i, (h, w) in enumerate(zip(header, widths, strict=True)))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths, strict=True))))


def spread(values: list[float]) -> str:
    """median (min-max) of rates."""
    return (f"{fmt_rate(statistics.median(values))} "
            f"({fmt_rate(min(values))}-{fmt_rate(max(values))})")


# ---------------------------------------------------------------- 1. writer


def write_random_dataset(prefix: Path, num_tokens: int, dtype: str, doc_tokens: int,
                         seed: int) -> float:
    """Seconds to write num_tokens random ids as documents (eot last); tokens made first."""
    rng = np.random.default_rng(seed)
    vocab = VOCABS[dtype]
    assert optimal_dtype(vocab) == np.dtype(dtype)
    tokens = rng.integers(0, vocab - 1, num_tokens, dtype=dtype)
    lengths = rng.geometric(1 / doc_tokens, size=2 * num_tokens // doc_tokens + 16)
    ends = np.cumsum(lengths)
    ends = np.append(ends[ends < num_tokens], num_tokens)
    tokens[ends - 1] = vocab - 1
    starts = np.concatenate([[0], ends[:-1]]).tolist()

    def write() -> None:
        with IndexedDatasetWriter(prefix, dtype) as writer:
            for a, b in zip(starts, ends.tolist(), strict=True):
                writer.add_document(tokens[a:b])

    return seconds(write)


# ---------------------------------------------------------------- 2. loader


@dataclass
class Case:
    name: str
    overrides: list[str]
    files: list[Path]  # .bin files whose cache state the case sets
    cold: bool
    vocab: int


def make_source(overrides: list[str], seq_len: int) -> DataSource:
    return build_data_source(compose([*overrides, f"train.seq_len={seq_len}"]))


def time_steps(batches: StepBatches, first: int, min_s: float, max_steps: int
               ) -> tuple[int, float]:
    """Consecutive steps from `first` until min_s seconds or max_steps steps: (steps, s)."""
    start = time.perf_counter()
    n = 0
    while n < max_steps and (n == 0 or time.perf_counter() - start < min_s):
        batches.step(first + n)
        n += 1
    return n, time.perf_counter() - start


def loader_rates(case: Case, seq_len: int, global_batch: int, dp: int, args: argparse.Namespace,
                 in_cache: list[float] | None = None) -> list[float]:
    """tokens/s of one dp rank's StepBatches over --repeats stretches of steps; appends to
    in_cache the share of the case's files in the page cache as each stretch starts."""
    share = global_batch // dp
    rates = []
    step = 0
    for _ in range(args.repeats):
        gc.collect()
        if case.cold:
            for f in case.files:
                drop_page_cache(f)
        source = make_source(case.overrides, seq_len)
        batches = StepBatches(source, "train", global_batch, 1, 0, dp,
                              vocab_size=case.vocab)
        if case.cold:
            # The epoch permutation is drawn on first use: draw it on one window, so
            # that the timed steps read the files. Only steps over the first
            # --cold-fraction of the windows are timed: later ones may hit pages
            # that read-around brought in.
            source.samples("train", torch.tensor([0]))
            max_steps = max(1, int(args.cold_fraction * source.num_samples("train")) // share)
        else:
            batches.step(step)  # warm-up: allocator, permutation
            step += 1
            max_steps = args.max_steps
        if in_cache is not None and case.files:
            fractions = [cached_fraction(f) for f in case.files]
            if None not in fractions:
                in_cache.append(min(fractions))
        n, s = time_steps(batches, step, args.min_s, max_steps)
        step = 0 if case.cold else step + n
        rates.append(n * share * seq_len / s)
        del batches, source
    return rates


def reference_rates(stream: np.ndarray, seq_len: int, share: int, repeats: int
                    ) -> tuple[list[float], list[float]]:
    """tokens/s of (a contiguous copy of share windows' bytes to int64, a one-index gather
    of share random windows to int64) from stream (page-cached)."""
    rng = np.random.default_rng(0)
    width = seq_len + 1
    n_windows = (len(stream) - 1) // seq_len
    copy, gather = [], []
    for _ in range(repeats):
        first = int(rng.integers(0, n_windows - share)) * seq_len
        s = seconds(lambda a=first: np.array(stream[a:a + share * width]).astype(np.int64))
        copy.append(share * seq_len / s)
        idx = rng.choice(n_windows, share, replace=False) * seq_len
        s = seconds(lambda starts=idx: torch.from_numpy(
            stream[starts[:, None] + np.arange(width)].astype(np.int64)))
        gather.append(share * seq_len / s)
    return copy, gather


def cold_window_rates(path: Path, seq_len: int, windows: int, repeats: int
                      ) -> dict[str, list[float]]:
    """tokens/s of reading `windows` random windows (int64) of a uint16 .bin just dropped
    from the page cache, through mmap with the kernel's default read-around (what
    np.memmap gets) and with madvise(MADV_RANDOM) (no read-around: a fault reads a page)."""
    import mmap

    rng = np.random.default_rng(1)
    width = seq_len + 1
    n_windows = (path.stat().st_size // 2 - 1) // seq_len
    rates: dict[str, list[float]] = {"default": [], "MADV_RANDOM": []}
    for _ in range(repeats):
        for advice in rates:
            gc.collect()
            drop_page_cache(path)
            with open(path, "rb") as f:
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            if advice == "MADV_RANDOM":
                m.madvise(mmap.MADV_RANDOM)
            stream = np.frombuffer(m, np.uint16)
            starts = (rng.choice(n_windows, windows, replace=False) * seq_len).tolist()
            s = seconds(lambda st=starts, x=stream: np.stack(
                [x[a:a + width] for a in st]).astype(np.int64))
            rates[advice].append(windows * seq_len / s)
            del stream
            m.close()
    return rates


def bench_loader(root: Path, args: argparse.Namespace) -> tuple[dict, dict]:
    """Writer figures and loader figures; the latter keyed by (case name, seq_len, dp)."""
    prefixes = {"uint16": root / "tokens_u16", "int32": root / "tokens_i32"}
    blend_b = root / "tokens_u16_b"
    writes = []
    for dtype, prefix in prefixes.items():
        s = write_random_dataset(prefix, args.tokens, dtype, args.doc_tokens, seed=1)
        size = Path(f"{prefix}.bin").stat().st_size
        writes.append([f"IndexedDatasetWriter {dtype}", f"{args.tokens / 1e6:.0f} M",
                       f"{size / MB:,.0f}", f"{s:.2f}", f"{size / MB / s:,.0f}"])
    b_tokens = max(args.tokens // 4, 1_000_000)
    write_random_dataset(blend_b, b_tokens, "uint16", args.doc_tokens, seed=2)
    table("1. writer (random tokens made beforehand; includes the final fsync)",
          ["", "tokens", "MB", "s", "MB/s"], writes)

    bins = {k: Path(f"{p}.bin") for k, p in prefixes.items()}
    blend = (f"data.blend=[{{weight:0.7,path:'{prefixes['uint16']}'}},"
             f"{{weight:0.3,path:'{blend_b}'}}]")
    cases = []
    for dtype, prefix in prefixes.items():
        for cold in (False, True):
            cases.append(Case(f"indexed {dtype} {'cold' if cold else 'cached'}",
                              ["data=indexed", f"data.path={prefix}"], [bins[dtype]], cold,
                              VOCABS[dtype]))
    blend_bins = [bins["uint16"], Path(f"{blend_b}.bin")]
    for cold in (False, True):
        cases.append(Case(f"blend 0.7/0.3 uint16 {'cold' if cold else 'cached'}",
                          ["data=indexed", blend], blend_bins, cold, VOCABS["uint16"]))
    cases.append(Case("corpus (in memory)", [], [], False, 257))

    results: dict = {}
    rows = []
    for seq_len in args.seq_lens:
        for dp in args.dp:
            share = args.global_batch // dp
            for case in cases:
                if not case.cold:
                    for f in case.files:
                        fill_page_cache(f)
                in_cache: list[float] = []
                rates = loader_rates(case, seq_len, args.global_batch, dp, args, in_cache)
                results[(case.name, seq_len, dp)] = rates
                per_step = share * seq_len / statistics.median(rates)
                cached = f"{100 * min(in_cache):.0f}" if in_cache else "-"
                rows.append([case.name, str(seq_len), str(dp), str(share), cached,
                             spread(rates), f"{per_step * 1e3:,.1f}"])
            stream = np.memmap(bins["uint16"], dtype=np.uint16, mode="r")
            fill_page_cache(bins["uint16"])
            copy, gather = reference_rates(np.frombuffer(stream, np.uint16), seq_len, share,
                                           args.repeats)
            del stream
            cold_windows = max(1, min(share, int(args.cold_fraction * args.tokens / seq_len)))
            cold = cold_window_rates(bins["uint16"], seq_len, cold_windows, args.repeats)
            for advice, rates in cold.items():
                rows.append([f"  ref: cold mmap {advice}, {cold_windows} windows", str(seq_len),
                             str(dp), str(share), "0", spread(rates), ""])
            results[("ref copy", seq_len, dp)] = copy
            results[("ref gather", seq_len, dp)] = gather
            rows.append(["  ref: contiguous copy uint16->int64", str(seq_len), str(dp),
                         str(share), "100", spread(copy), ""])
            rows.append(["  ref: one-index gather uint16->int64", str(seq_len), str(dp),
                         str(share), "100", spread(gather), ""])
    try:
        device = os.stat(bins["uint16"]).st_dev
        read_ahead = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}/queue/"
                          f"read_ahead_kb").read_text().strip() + " KiB"
    except OSError:
        read_ahead = "unknown"
    table(f"2. loader: one dp rank's StepBatches.step, tokens/s, median (min-max) of "
          f"{args.repeats}; global batch {args.global_batch}, micro-batch 1; stream "
          f"{args.tokens / 1e6:.0f} M tokens; 'cache %': least share of the .bin files in the "
          f"page cache as a stretch starts; read-ahead of their device {read_ahead} (an mmap "
          f"fault reads around this much)",
          ["source", "seq_len", "dp", "samples/step", "cache %", "tokens/s", "ms/step"], rows)
    return results, prefixes


# ---------------------------------------------------------------- 3. start-up


def write_many_sequences(prefix: Path, sequences: int) -> float:
    """An index of `sequences` one-token documents, built by appending one shard of
    100k over and over (add_index copies its index in bulk); seconds taken."""
    shard = Path(f"{prefix}_shard")
    per_shard = min(100_000, sequences)
    with IndexedDatasetWriter(shard, np.uint16) as writer:
        for i in range(per_shard):
            writer.add_document([i % 1000])

    def build() -> None:
        with IndexedDatasetWriter(prefix, np.uint16) as writer:
            for _ in range(sequences // per_shard):
                writer.add_index(shard)

    return seconds(build)


def bench_startup(root: Path, args: argparse.Namespace, indexed_prefix: Path | None,
                  jsonl: Path, bpe: Path) -> None:
    rows = []
    prefix = root / "many"
    s = write_many_sequences(prefix, args.index_sequences)
    idx = Path(f"{prefix}.idx")
    n = len(IndexedDataset(prefix))
    rows.append([f"write {n / 1e6:.0f} M sequences (add_index x{n // 100_000})",
                 f"{s:.2f}", f"{idx.stat().st_size / MB:,.0f} MB .idx"])
    warm, cold = [], []
    for _ in range(args.repeats):
        gc.collect()
        drop_page_cache(idx)
        cold.append(seconds(lambda: IndexedDataset(prefix)))
        warm.append(seconds(lambda: IndexedDataset(prefix)))
    rows.append([f"IndexedDataset() on {n / 1e6:.0f} M sequences, cold .idx",
                 f"{statistics.median(cold):.3f}", f"min {min(cold):.3f}"])
    rows.append([f"IndexedDataset() on {n / 1e6:.0f} M sequences, cached",
                 f"{statistics.median(warm):.3f}", f"min {min(warm):.3f}"])
    for suffix in (".bin", ".idx", "_shard.bin", "_shard.idx"):
        Path(f"{prefix}{suffix}").unlink(missing_ok=True)
    if indexed_prefix is not None:
        t = [seconds(lambda: make_source(["data=indexed", f"data.path={indexed_prefix}"], 8192))
             for _ in range(args.repeats)]
        ds = IndexedDataset(indexed_prefix)
        rows.append([f"build_data_source indexed ({ds.num_tokens / 1e6:.0f} M tokens, "
                     f"{ds.num_documents / 1e3:.0f} k docs)", f"{statistics.median(t):.3f}",
                     f"min {min(t):.3f}"])
    mb = jsonl.stat().st_size / MB
    for name, tok in (("byte", "byte"), ("BPE", str(bpe))):
        if name not in args.tokenizers:
            continue
        s = seconds(lambda t=tok: make_source(["data=jsonl", f"data.path={jsonl}",
                                               f"data.tokenizer={t}"], 2048))
        rows.append([f"build_data_source jsonl {mb:.0f} MB, {name} tokenizer", f"{s:.2f}",
                     f"{mb / s:,.1f} MB/s"])
    table("3. start-up", ["", "s", ""], rows)


# ---------------------------------------------------------------- 4. consumption


def train_tokens_per_s(root: Path, steps: int) -> tuple[float, int, int]:
    """tokens/s of the last record of `trntrain train` (default llama_tiny on the corpus)."""
    run_dir = root / "train_run"
    cmd = [sys.executable, "-m", "trntrain", "train", f"train.max_steps={steps}",
           "logging.progress_bar=false", f"run.dir={run_dir}", "checkpoint=none"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "tokens_per_s" in r][-1]
    cfg = compose([])
    return float(last["tokens_per_s"]), cfg.train.seq_len, cfg.train.global_batch_size


def llama_params(model) -> int:
    """Parameters of a Llama config by arithmetic (no model built)."""
    kv_dim = model.dim // model.n_heads * model.n_kv_heads
    attention = model.dim * (2 * model.dim + 2 * kv_dim)
    mlp = 3 * model.dim * model.ffn_hidden_dim
    embeddings = model.vocab_size * model.dim * (1 if model.get("tie_embeddings") else 2)
    return model.n_layers * (attention + mlp + 2 * model.dim) + model.dim + embeddings


def trainium_rank_tokens_per_s() -> tuple[float, str]:
    """(tokens/s one dp rank of the Llama-3-8B experiment needs, where the figure comes from):
    `trntrain plan`, else the planner's Python API, else a 6N-FLOPs estimate."""
    overrides = [f"+experiment={PLAN_EXPERIMENT}"]
    cmd = [sys.executable, "-m", "trntrain", "plan", *overrides, "plan.format=json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    cli_error = (proc.stderr.strip().splitlines() or ["no output"])[-1][:120]
    plan = None
    if proc.returncode == 0:
        try:
            plan, how = json.loads(proc.stdout), f"`trntrain plan {overrides[0]}`"
        except ValueError:
            cli_error = "output is not JSON"
    if plan is None:
        try:
            from trntrain.plan import plan as make_plan

            plan = make_plan(compose(overrides)).as_dict()
            how = f"trntrain.plan.plan() ({' '.join(cmd[2:])} failed: {cli_error})"
        except Exception as err:  # noqa: BLE001 - the planner is optional here
            cli_error += f"; trntrain.plan.plan(): {type(err).__name__}: {err}"
    if plan is not None and plan.get("tokens_per_s"):
        return plan["tokens_per_s"] / plan["dp"], (
            f"{how}: {plan['tokens_per_s']:,.0f} tokens/s on {plan['world_size']} cores, "
            f"tp={plan['tp']} pp={plan['pp']} dp={plan['dp']}, MFU {100 * plan['mfu']:.1f} %, "
            f"step {plan['step_time_s']:.2f} s")
    cfg = compose(overrides)
    params = llama_params(cfg.model)
    cores = cfg.cluster.nodes * cfg.cluster.procs_per_node
    dp = cores // (cfg.parallel.tp * cfg.parallel.pp)
    mfu = 0.4
    total = mfu * cfg.cluster.peak_flops_per_core * cores / (6 * params)
    return total / dp, (f"estimate (planner failed: {cli_error}): 6N FLOPs/token, N = "
                        f"{params / 1e9:.2f} B, {cfg.cluster.peak_flops_per_core / 1e12:.0f} "
                        f"TFLOP/s per core, {100 * mfu:.0f} % MFU, {cores} cores, dp={dp}")


def bench_consumption(root: Path, args: argparse.Namespace, loader: dict) -> None:
    rows = []
    cpu, seq_len, gbs = train_tokens_per_s(root, args.train_steps)
    corpus = loader_rates(Case("corpus", [], [], False, 257), seq_len, gbs, 1, args)
    rows.append([f"llama_tiny on this CPU ({seq_len} x {gbs} tokens/step)", fmt_rate(cpu),
                 f"corpus loader at {seq_len} x {gbs}", spread(corpus),
                 f"{statistics.median(corpus) / cpu:,.0f}x"])
    trn, source = trainium_rank_tokens_per_s()
    for (name, seq, dp), rates in sorted(loader.items()):
        if seq != 8192 or name.startswith("ref"):
            continue
        rows.append(["Llama-3-8B trn1 dp rank (seq 8192)", fmt_rate(trn), f"{name}, dp={dp}",
                     spread(rates), f"{statistics.median(rates) / trn:,.0f}x"])
    if not loader:
        rows.append(["Llama-3-8B trn1 dp rank (seq 8192)", fmt_rate(trn), "-", "-", "-"])
    table("4. consumption against the loader (headroom = loader median / consumption)",
          ["consumer", "tokens/s", "loader", "loader tokens/s", "headroom"], rows)
    print(f"Trainium figure: {source}")


# ---------------------------------------------------------------- 5. prepare


def stdlib_texts() -> list[str]:
    root = stdlib_root()
    return [p.read_bytes().decode("utf-8", errors="replace") for p in corpus_files(root)]


def write_jsonl(path: Path, texts: list[str], target_mb: float) -> tuple[int, int]:
    """JSONL of the texts repeated until ~target_mb of file: (documents, text bytes)."""
    docs = text_bytes = 0
    with path.open("w", encoding="utf-8") as f:
        while f.tell() < target_mb * MB:
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")
                docs += 1
                text_bytes += len(text.encode("utf-8"))
                if f.tell() >= target_mb * MB:
                    break
    return docs, text_bytes


def write_parquet(path: Path, jsonl: Path) -> bool:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return False
    texts = [json.loads(line)["text"] for line in jsonl.open(encoding="utf-8")]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=1000)
    return True


def train_bpe(texts: list[str], vocab: int, path: Path) -> float:
    """A ByteLevel BPE (every byte in its alphabet) saved as tokenizer.json; seconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    s = seconds(lambda: tok.train_from_iterator(texts, trainer))
    tok.save(str(path))
    return s


def byte_level_decoder() -> dict[str, int]:
    """GPT-2's printable character of each byte, inverted (ByteLevel's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return {c: b for b, c in chars.items()}


def write_tiktoken(bpe: Path, path: Path) -> int:
    """The BPE's tokens as tiktoken ranks (in id order, which is merge order), specials
    left out: lines of `<base64 bytes> <rank>`; the number of ranks."""
    data = json.loads(bpe.read_text())
    specials = {t["content"] for t in data["added_tokens"]}
    decode = byte_level_decoder()
    vocab = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [bytes(decode[c] for c in t) for t, _ in vocab if t not in specials]
    assert len(set(tokens)) == len(tokens) and all(bytes([b]) in set(tokens) for b in range(256))
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n"
                            for rank, t in enumerate(tokens)))
    return len(tokens)


def bench_prepare(root: Path, args: argparse.Namespace, jsonl: Path, text_bytes: int,
                  tokenizers: dict[str, str]) -> None:
    inputs = {"jsonl": jsonl}
    parquet = root / "input.parquet"
    if write_parquet(parquet, jsonl):
        inputs["parquet"] = parquet
    rows = []
    for input_name, path in inputs.items():
        for tok_name in tokenizers:
            if input_name == "parquet" and tok_name == "tiktoken":
                continue  # the tokenizer's cost is the jsonl row's; parquet changes the reading
            for workers in args.workers:
                out = root / f"prepared_{input_name}_{tok_name}_{workers}"
                result = prepare([str(path)], str(out), Settings(tokenizer=tokenizers[tok_name]),
                                 workers=workers, progress=False)
                rows.append([f"{input_name} {path.stat().st_size / MB:.0f} MB, {tok_name}",
                             str(workers), f"{result.seconds:.1f}",
                             f"{result.input_bytes / MB / result.seconds:,.1f}",
                             f"{text_bytes / MB / result.seconds:,.1f}",
                             fmt_rate(result.tokens / result.seconds),
                             f"{text_bytes / result.tokens:.2f}"])
                for suffix in (".bin", ".idx", ".prepare.json"):
                    Path(f"{out}{suffix}").unlink(missing_ok=True)
    table(f"5. prepare (text: {text_bytes / MB:.0f} MB of UTF-8 documents in every input)",
          ["input, tokenizer", "workers", "s", "input MB/s", "text MB/s", "tokens/s",
           "bytes/token"], rows)


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="sections to run (loader includes the writer)")
    parser.add_argument("--tokens", type=float, default=200e6,
                        help="tokens of each random indexed dataset")
    parser.add_argument("--doc-tokens", type=int, default=1024,
                        help="mean document length of the random datasets")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--global-batch", type=int, default=1024, help="samples per step")
    parser.add_argument("--dp", type=int, nargs="+", default=[1, 32],
                        help="data-parallel sizes; rank 0 of each is read")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-s", type=float, default=0.3, help="seconds per timed stretch")
    parser.add_argument("--max-steps", type=int, default=50, help="steps per timed stretch")
    parser.add_argument("--cold-fraction", type=float, default=0.05,
                        help="share of a split's windows a cold stretch may read")
    parser.add_argument("--index-sequences", type=int, default=10_000_000)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--prepare-mb", type=float, default=64, help="MB of JSONL input")
    parser.add_argument("--vocab", type=int, default=16_384, help="ids of the trained BPE")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokenizers", nargs="+", choices=["byte", "BPE", "tiktoken"],
                        default=["byte", "BPE", "tiktoken"],
                        help="tokenizers of the prepare and jsonl start-up figures")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (torchrun's default for several ranks)")
    args = parser.parse_args()
    args.tokens = int(args.tokens)
    torch.set_num_threads(args.threads)

    print(f"python {sys.version.split()[0]} | numpy {np.__version__} | torch {torch.__version__} "
          f"| {torch.get_num_threads()} torch threads | {os.cpu_count()} CPUs | load average "
          f"{os.getloadavg()[0]:.1f}")
    root = Path(tempfile.mkdtemp(prefix="bench_data_", dir="/tmp"))
    try:
        loader: dict = {}
        prefixes: dict = {}
        if "loader" in args.only:
            loader, prefixes = bench_loader(root, args)
        if "startup" in args.only or "prepare" in args.only:
            texts = stdlib_texts()
            jsonl = root / "input.jsonl"
            docs, text_bytes = write_jsonl(jsonl, texts, args.prepare_mb)
            bpe = root / "tokenizer.json"
            bpe_s = train_bpe(texts[:400], args.vocab, bpe)
            tiktoken_file = root / "tiktoken.bpe"
            ranks = write_tiktoken(bpe, tiktoken_file)
            print(f"\ninput: {jsonl.stat().st_size / MB:.1f} MB of JSONL, {docs} documents "
                  f"(the standard library's {len(texts)} .py files, repeated); BPE of "
                  f"{args.vocab} ids trained in {bpe_s:.1f} s on {len(texts[:400])} files; "
                  f"tiktoken file of {ranks} ranks")
            if "startup" in args.only:
                bench_startup(root, args, prefixes.get("uint16"), jsonl, bpe)
            if "prepare" in args.only:
                specs = {"byte": "byte", "BPE": str(bpe), "tiktoken": str(tiktoken_file)}
                bench_prepare(root, args, jsonl, text_bytes,
                              {k: v for k, v in specs.items() if k in args.tokenizers})
        if "train" in args.only:
            bench_consumption(root, args, loader)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
