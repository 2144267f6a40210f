"""Chat data (`data=chat`) through the real source: the trained-token mask against
`transformers`' `return_assistant_tokens_mask` and against the byte template worked out by
hand; packing (whole conversations, first-fit decreasing, too_long, packing=false) by
hand; packed chat windows give each conversation's own logits; bad input as one line
naming the file and line, before any process group."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from tests.unit.test_document_mask import model_of
from trntrain.config import compose, validate
from trntrain.data.base import IGNORE_INDEX, is_validation
from trntrain.data.chat import ChatSource, first_fit_decreasing
from trntrain.errors import UserError

EOT = 256  # the byte tokenizer's end-of-text token, which ends each assistant turn

# A ChatML-like template whose assistant turns (content and end-of-turn token) are marked
# for transformers' return_assistant_tokens_mask.
GENERATION_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ m['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# 20 conversations: multi-turn, system prompts, empty and whitespace contents, unicode,
# control-token text in a content, an assistant first, a user last, prompt/completion.
CONVERSATIONS: list[dict] = [
    {"messages": [{"role": "user", "content": "hello"},
                  {"role": "assistant", "content": "hi there"}]},
    {"messages": [{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "What is the question?"},
                  {"role": "assistant", "content": "The model answers."}]},
    {"messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
                  {"role": "user", "content": "three"}, {"role": "assistant", "content": "four"},
                  {"role": "user", "content": "five"}, {"role": "assistant", "content": "six"}]},
    {"messages": [{"role": "user", "content": "say nothing"},
                  {"role": "assistant", "content": ""}]},
    {"messages": [{"role": "user", "content": ""},
                  {"role": "assistant", "content": "you said nothing"}]},
    {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello"}]},
    {"messages": [{"role": "user", "content": "漢字 and 🚀?"},
                  {"role": "assistant", "content": "ÄÖÜ é 漢字 🚀"}]},
    {"messages": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
                  {"role": "user", "content": "a last question left unanswered"}]},
    {"prompt": "The question of the user", "completion": "The answer of the model."},
    {"messages": [{"role": "user", "content": "line1\nline2\n\n"},
                  {"role": "assistant", "content": "\nindented\n  two\n"}]},
    {"messages": [{"role": "user", "content": "what ends a turn?"},
                  {"role": "assistant", "content": "the token </s> or <|im_end|> does"}]},
    {"messages": [{"role": "user", "content": "repeat"},
                  {"role": "assistant", "content": "the model answers " * 12}]},
    {"messages": [{"role": "assistant", "content": "I speak first."},
                  {"role": "user", "content": "fine"},
                  {"role": "assistant", "content": "good"}]},
    {"messages": [{"role": "system", "content": "Two replies."},
                  {"role": "assistant", "content": "one"},
                  {"role": "assistant", "content": "two"}]},
    {"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "\t"}]},
    {"messages": [{"role": "user", "content": "{{ x }} {% if y %}"},
                  {"role": "assistant", "content": "{% endif %} }}"}]},
    {"messages": [{"role": "user", "content": "\"quoted\"\t'single'"},
                  {"role": "assistant", "content": "\\ back\\slash"}]},
    {"prompt": "Überprüfe: 漢字", "completion": "✓ 🚀"},
    {"messages": [{"role": "system", "content": "You answer in one short line."},
                  {"role": "user", "content": "1 + 1 = ?"},
                  {"role": "assistant", "content": "1 + 1 = 2"},
                  {"role": "user", "content": "and 2 + 2?"},
                  {"role": "assistant", "content": ""}]},
    {"messages": [{"role": "user", "content": "punctuation!?.,;:"},
                  {"role": "assistant", "content": "---...!!!"}]},
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False))
                            + "\n" for r in records), encoding="utf-8")
    return path


def chat_config(path: Path, *overrides: str):
    return compose(["data=chat", f"data.path={path}", "train.seq_len=64", *overrides])


def chat_source(path: Path, *overrides: str) -> ChatSource:
    cfg = chat_config(path, *overrides)
    return ChatSource(cfg.data, cfg.model, cfg.train.seq_len, cfg.train.seed)


def windows(source: ChatSource, split: str) -> list[list[tuple[torch.Tensor, ...]]]:
    """Each window of the split in order (unshuffled), as its documents' (inputs, labels,
    positions); the padding at a window's end (end-of-text inputs, no trained label)
    left out."""
    count = source.num_samples(split)
    batch = source.batch(split, torch.arange(count), shuffle=False)
    out = []
    for row in range(count):
        docs = []
        for d in batch.documents[row].unique().tolist():
            at = batch.documents[row] == d
            doc = (batch.inputs[row][at], batch.labels[row][at], batch.positions[row][at])
            if bool((doc[0] == source.pad_id).all() and (doc[1] == IGNORE_INDEX).all()):
                continue
            docs.append(doc)
        out.append(docs)
    return out


def documents(source: ChatSource) -> list[tuple[torch.Tensor, ...]]:
    return [doc for split in ("train", "val") for docs in windows(source, split) for doc in docs]


def as_messages(record: dict) -> list[dict]:
    if "messages" in record:
        return record["messages"]
    return [{"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]}]


# -- masks against transformers ---------------------------------------------------------------

@pytest.fixture(scope="module")
def generation_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer trained here (<s> bos, </s> eos, <|im_start|> and
    <|im_end|> special), with GENERATION_TEMPLATE, written by save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = ["The model answers the question of the user.", "user: hello\nassistant: hi",
             "one two three four five six, 1 + 1 = 2"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts * 10, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = GENERATION_TEMPLATE
    directory = tmp_path_factory.mktemp("hf_generation")
    fast.save_pretrained(str(directory))
    return directory


def test_trained_tokens_equal_transformers_assistant_masks(generation_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(generation_tokenizer_dir))
    expected = []
    for record in CONVERSATIONS:
        out = reference.apply_chat_template(as_messages(record), tokenize=True,
                                            return_dict=True, return_assistant_tokens_mask=True)
        expected.append((list(out["input_ids"]), list(out["assistant_masks"])))
    assert sum(sum(mask) for _, mask in expected) > 100  # the template does mark turns
    path = write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS)
    source = chat_source(path, f"data.tokenizer={generation_tokenizer_dir}", "train.seq_len=160",
                         "data.packing=false", "data.val_fraction=0.3")
    got = documents(source)
    assert len(got) == len(CONVERSATIONS)
    # Window order is not file order: match each conversation by its tokens. A label
    # is the next token, kept where that token is the assistant's.
    by_inputs = {tuple(inputs.tolist()): labels.tolist() for inputs, labels, _ in got}
    for i, (ids, mask) in enumerate(expected):
        labels = by_inputs.get(tuple(ids[:-1]))
        assert labels is not None, f"conversation {i} is not a whole document of a window"
        want = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:], strict=True)]
        assert labels == want, i


# -- the byte template, by hand ---------------------------------------------------------------

BYTE_CONVERSATION = {"messages": [
    {"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"}, {"role": "user", "content": "and?"},
    {"role": "assistant", "content": "é!"}]}


def byte_pieces() -> list[tuple[list[int], bool]]:
    """BYTE_CONVERSATION in the byte template's documented format, as (tokens, whether
    they are the assistant's)."""
    def text(s: str) -> list[int]:
        return list(s.encode("utf-8"))

    return [(text("<|system|>\nBe kind.\n<|user|>\nhi\n<|assistant|>\n"), False),
            (text("yo") + [EOT], True),
            (text("<|user|>\nand?\n<|assistant|>\n"), False),
            ([0xC3, 0xA9, ord("!"), EOT], True)]


@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_byte_template_trains_the_assistant_turns_or_everything(tmp_path, train_on):
    ids = [t for tokens, _ in byte_pieces() for t in tokens]
    trained = [m for tokens, m in byte_pieces() for _ in tokens]
    assert len(ids) == 81
    path = write_jsonl(tmp_path / "chat.jsonl", [BYTE_CONVERSATION] * 12)
    source = chat_source(path, f"data.train_on={train_on}", "train.seq_len=80",
                         "data.val_fraction=0.5")
    for inputs, labels, positions in documents(source):
        assert inputs.tolist() == ids[:-1]
        assert positions.tolist() == list(range(80))
        if train_on == "assistant":  # "yo", "é!" and each turn's end-of-text token
            assert labels.tolist() == [t if m else IGNORE_INDEX
                                       for t, m in zip(ids[1:], trained[1:], strict=True)]
            assert (labels != IGNORE_INDEX).sum() == 7
        else:
            assert labels.tolist() == ids[1:]


def test_padding_is_never_trained(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [BYTE_CONVERSATION] * 12)
    source = chat_source(path, "data.train_on=all", "train.seq_len=100", "data.val_fraction=0.5")
    batch = source.batch("train", torch.arange(source.num_samples("train")), shuffle=False)
    assert batch.inputs.shape[1] == 100
    assert torch.equal(batch.inputs[:, 80:], torch.full_like(batch.inputs[:, 80:], EOT))
    assert (batch.labels[:, 80:] == IGNORE_INDEX).all()
    assert (batch.labels[:, :80] != IGNORE_INDEX).all()
    assert (batch.documents[:, 80:] == 1).all() and (batch.documents[:, :80] == 0).all()


# -- packing -----------------------------------------------------------------------------------

def sized(a: int, b: int) -> dict:
    """A conversation that renders to 25 + a + b byte tokens: one document of 24 + a + b."""
    return {"messages": [{"role": "user", "content": "u" * a},
                         {"role": "assistant", "content": "v" * b}]}


def rendered(record: dict) -> list[int]:
    m = record["messages"]
    return (list(f"<|user|>\n{m[0]['content']}\n<|assistant|>\n{m[1]['content']}".encode())
            + [EOT])


# Documents of 24 to 64 tokens, for windows of 64.
VARIED = [sized(a, b) for a, b in ((1, 2), (10, 30), (5, 0), (20, 20), (0, 39), (7, 3),
                                   (12, 12), (3, 9), (30, 10), (2, 2), (15, 1), (6, 6),
                                   (18, 4), (0, 0), (9, 21), (11, 11))]
TOO_LONG = sized(35, 25)  # 85 tokens: a document of 84 > 64


def test_whole_conversations_with_restarting_positions(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", VARIED)
    source = chat_source(path, "data.train_on=all", "data.val_fraction=0.2")
    docs = documents(source)
    got = sorted(inputs.tolist() + labels[-1:].tolist() for inputs, labels, _ in docs)
    assert got == sorted(rendered(r) for r in VARIED)
    for inputs, _, positions in docs:
        assert positions.tolist() == list(range(len(inputs)))
    # Packed: fewer windows than conversations, each of at most 64 tokens of documents.
    counts = [len(docs) for split in ("train", "val") for docs in windows(source, split)]
    assert sum(counts) == len(VARIED) and len(counts) < len(VARIED)


def test_too_long_truncate_keeps_the_start_in_one_window(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [*VARIED, TOO_LONG])
    source = chat_source(path, "data.train_on=all", "data.too_long=truncate",
                         "data.val_fraction=0.2")
    docs = documents(source)
    assert len(docs) == len(VARIED) + 1
    cut = [(inputs, labels) for inputs, labels, _ in docs if len(inputs) == 64
           and inputs.tolist() == rendered(TOO_LONG)[:64]]
    assert len(cut) == 1 and cut[0][1].tolist() == rendered(TOO_LONG)[1:65]


def test_too_long_drop_drops_and_counts(tmp_path, caplog):
    path = write_jsonl(tmp_path / "chat.jsonl", [*VARIED, TOO_LONG])
    with caplog.at_level(logging.INFO, logger="trntrain.data.chat"):
        source = chat_source(path, "data.train_on=all", "data.too_long=drop",
                             "data.val_fraction=0.2")
    got = sorted(inputs.tolist() + labels[-1:].tolist() for inputs, labels, _ in
                 documents(source))
    assert got == sorted(rendered(r) for r in VARIED)
    counted = [r.getMessage() for r in caplog.records if "longer than a window" in r.getMessage()]
    assert len(counted) == 2 and sum("1 longer than a window dropped" in m for m in counted) == 1


def test_too_long_fail_names_the_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [*VARIED[:3], TOO_LONG, *VARIED[3:]])
    with pytest.raises(UserError) as err:
        chat_source(path, "data.too_long=fail", "data.val_fraction=0.2")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}:4: ")
    assert "85 tokens" in message and "train.seq_len + 1 = 65" in message


def test_packing_false_is_a_padded_window_per_conversation(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", VARIED)
    source = chat_source(path, "data.packing=false", "data.val_fraction=0.2")
    rows = [docs for split in ("train", "val") for docs in windows(source, split)]
    assert len(rows) == len(VARIED) and all(len(docs) == 1 for docs in rows)
    batch = source.batch("train", torch.arange(source.num_samples("train")), shuffle=False)
    for row in range(len(batch.inputs)):
        used = int((batch.documents[row] == 0).sum())
        assert (batch.inputs[row, used:] == EOT).all()
        assert (batch.labels[row, used:] == IGNORE_INDEX).all()


def test_first_fit_decreasing_by_hand():
    # Longest first: 7 opens bin 0 (room 1), 5 bin 1 (room 3), 4 bin 2 (room 4), 3 fills
    # bin 1, 2 goes to bin 2 (room 2), 1 fills bin 0; ties (the two 2s) in index order.
    assert first_fit_decreasing([5, 3, 7, 2, 4, 1], 8) == [[0, 1], [2, 5], [3, 4]]
    assert first_fit_decreasing([2, 6, 2, 6], 8) == [[0, 1], [2, 3]]
    assert first_fit_decreasing([], 8) == []


def test_the_source_packs_first_fit_decreasing(tmp_path):
    # Documents of 60, 45, 30, 35, 25 and 50 tokens into windows of 100. Longest first:
    # 60 opens w0 (40 left), 50 opens w1 (50 left), 45 into w1, 35 into w0, 30 opens w2,
    # 25 into w2; windows by their first conversation, in file order within.
    lengths = [60, 45, 30, 35, 25, 50]
    records = [sized(n - 24, 0) for n in lengths]
    # A file name whose six lines all fall in the train split, and a line of val.
    name = next(f"t{i}.jsonl" for i in range(1000)
                if not any(is_validation(f"t{i}.jsonl:{line}", 0.02) for line in range(1, 7)))
    val = next(f"v{i}.jsonl" for i in range(10_000) if is_validation(f"v{i}.jsonl:1", 0.02))
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / name, records)
    write_jsonl(tmp_path / "data" / val, [sized(1, 1)])
    source = chat_source(tmp_path / "data", "train.seq_len=100")
    got = [[len(inputs) for inputs, _, _ in docs] for docs in windows(source, "train")]
    assert got == [[60, 35], [45, 50], [30, 25]]


@pytest.mark.parametrize("name", ["llama_tiny", "qwen3_tiny"])
@torch.no_grad()
def test_packed_chat_windows_give_each_conversation_its_own_logits(name):
    cfg = compose(["data=chat", f"model={name}", "train.seq_len=128"])
    source = ChatSource(cfg.data, cfg.model, 128, cfg.train.seed)
    batch = source.batch("train", torch.arange(3), shuffle=False)
    assert int(batch.documents.max()) >= 2  # several conversations in a window
    model = model_of(name)
    logits = model(batch.inputs, batch.positions, batch.documents)
    for row in range(3):
        for d in batch.documents[row].unique().tolist():
            at = (batch.documents[row] == d).nonzero().flatten()
            alone = model(batch.inputs[row:row + 1, at])
            torch.testing.assert_close(logits[row:row + 1, at], alone, atol=1e-5, rtol=0)


# -- bad input ---------------------------------------------------------------------------------

def one_line_error(cfg) -> str:
    """validate's error (what the CLI prints before creating any process group)."""
    with pytest.raises(UserError) as err:
        validate(cfg, 1)
    message = str(err.value)
    assert "\n" not in message, message
    return message


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


@pytest.mark.parametrize("bad, why", [
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]},
     "no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"},
                   {"role": "assistant", "content": "yo"}]},
     "message 1 has role 'tool'; valid: one of ('system', 'user', 'assistant')"),
    ('{"messages": [{"role": "user", "content": "hi"}', "not valid JSON"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
     "its content is a int"),
    ({"prompt": "p"}, "'completion' is missing"),
], ids=["no_assistant", "unknown_role", "invalid_json", "content_not_text", "no_completion"])
def test_bad_lines_are_one_error_naming_the_file_and_line(tmp_path, bad, why):
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, GOOD, bad, GOOD])
    message = one_line_error(chat_config(path))
    assert message.startswith(f"{path}:3: ") and why in message, message
    assert "data.on_bad_line=skip" in message


def test_skipped_bad_lines_are_counted(tmp_path, caplog):
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD] * 10 + ["{", {"messages": []}])
    with caplog.at_level(logging.WARNING, logger="trntrain.data.text"):
        source = chat_source(path, "data.on_bad_line=skip", "data.val_fraction=0.5")
    assert len(documents(source)) == 10
    assert any("skipped 2 malformed line(s), the first at " + f"{path}:11" in r.getMessage()
               for r in caplog.records)


def tokenizer_dir(tmp_path: Path, template: str) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["hello there"] * 5, trainers.BpeTrainer(
        vocab_size=270, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = template
    fast.save_pretrained(str(tmp_path / "tok"))
    return tmp_path / "tok"


def test_a_template_that_refuses_a_conversation_names_its_line(tmp_path):
    template = ("{% if messages[0]['role'] == 'system' %}"
                "{{ raise_exception('System messages are not supported') }}{% endif %}"
                "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}")
    directory = tokenizer_dir(tmp_path, template)
    system = {"messages": [{"role": "system", "content": "s"}, *GOOD["messages"]]}
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD, system])
    message = one_line_error(chat_config(path, f"data.tokenizer={directory}"))
    assert message.startswith(f"{path}:2: the chat template of ") and \
        "fails to render it" in message and "System messages are not supported" in message


def test_a_template_that_is_not_jinja_is_one_error(tmp_path):
    directory = tokenizer_dir(tmp_path, "{% for m in messages %}{{ m['content'] }")
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD])
    message = one_line_error(chat_config(path, f"data.tokenizer={directory}"))
    assert "chat_template.jinja" in message and "not valid Jinja" in message, message
