"""`trntrain generate` on the command line: stdout holds the continuation alone, the
tokens transformers generates, from a Hugging Face directory with a tokenizer and a chat
template, and from a trained run's DCP checkpoint, in one process and under torchrun
with tp=2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.unit.test_generate import save_tiny_hf_model
from trntrain.data.tokenizer import ByteTokenizer

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
TRNTRAIN = str(BIN / "trntrain")
TORCHRUN = str(BIN / "torchrun")
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")


def run(cmd: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """The command's stdout as bytes (no newline translation), stderr as text."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, timeout=timeout)
    proc.stderr = proc.stderr.decode(errors="replace")
    return proc


def greedy(directory: Path, ids: list[int], new_tokens: int, eos: int | None) -> list[int]:
    """transformers' greedy tokens, ending at (and without) `eos`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=new_tokens,
                             eos_token_id=eos, pad_token_id=eos)
    tokens = out[0, len(ids):].tolist()
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


@pytest.fixture(scope="module")
def hf_chat_dir(tmp_path_factory) -> Path:
    """A tiny Llama with a byte-level BPE tokenizer trained here, `</s>` its eos, and a
    chat template, all written by save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = ["The model answers the question of the user.", "user: hello\nassistant: hi"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    directory = tmp_path_factory.mktemp("hf_chat")
    save_tiny_hf_model(directory, "llama", eos_token_id=fast.eos_token_id,
                       vocab_size=len(fast))
    fast.save_pretrained(str(directory))
    return directory


def test_prompt_from_a_hugging_face_directory(hf_chat_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_chat_dir))
    prompt = "The question of"
    expected = tok.decode(greedy(hf_chat_dir, tok(prompt)["input_ids"], 24, tok.eos_token_id),
                          skip_special_tokens=True)
    proc = run([TRNTRAIN, "generate", str(hf_chat_dir), "--prompt", prompt,
                "--max-new-tokens", "24"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected.encode() and len(expected) > 10
    assert "new tokens in" in proc.stderr


def test_messages_through_the_chat_template(hf_chat_dir, tmp_path):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "hello"}]
    (tmp_path / "messages.json").write_text(json.dumps(messages))
    tok = AutoTokenizer.from_pretrained(str(hf_chat_dir))
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    expected = tok.decode(greedy(hf_chat_dir, list(ids), 24, tok.eos_token_id),
                          skip_special_tokens=True)
    proc = run([TRNTRAIN, "generate", str(hf_chat_dir), "--messages",
                str(tmp_path / "messages.json"), "--max-new-tokens", "24"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected.encode() and len(expected) > 10


def test_a_trained_run_generates_under_torchrun_as_transformers(tmp_path):
    run_dir = tmp_path / "run"
    train = run([TRNTRAIN, "train", "train.max_steps=2", "train.seq_len=32",
                 "train.global_batch_size=8", "train.eval_every=0", "logging.progress_bar=false",
                 "data.max_bytes=100000", "model.init_std=0.1", "checkpoint=dcp",
                 f"run.dir={run_dir}"], tmp_path)
    assert train.returncode == 0, train.stderr
    args = ["generate", str(run_dir), "--prompt", "The ", "--max-new-tokens", "32"]
    single = run([TRNTRAIN, *args], tmp_path)
    assert single.returncode == 0, single.stderr
    assert "latest checkpoint of the run" in single.stderr
    # The same weights through transformers: the run's checkpoint exported to HF.
    converted = run([TRNTRAIN, "convert", str(run_dir), str(tmp_path / "hf")], tmp_path)
    assert converted.returncode == 0, converted.stderr
    byte = ByteTokenizer()
    ids = [int(i) for i in byte.encode("The ")]
    expected = greedy(tmp_path / "hf", ids, 32, byte.eot_id)
    assert single.stdout == byte.decode(expected).encode() and len(set(expected)) > 3
    tp2 = run([TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "trntrain", *args,
               "--tp", "2"], tmp_path)
    assert tp2.returncode == 0, tp2.stderr
    assert tp2.stdout == single.stdout


def test_bad_options_end_in_one_error(hf_chat_dir, tmp_path):
    proc = run([TRNTRAIN, "generate", str(hf_chat_dir), "--prompt", "x", "--pp", "2"], tmp_path)
    assert proc.returncode == 2 and proc.stdout == b""
    assert proc.stderr.strip().splitlines() == [
        "trntrain: error: generate: --pp=2 is not supported; valid: --pp=1 (generate runs "
        "the whole model on every rank: split it with --tp instead)."]
