"""LoRA against independent references: the transformers base model at step 0, PEFT's
own LoRA (`peft.PeftModel.from_pretrained`) on the exported adapters, the merged model
in transformers; bitwise resume from DCP and refusal of another base; bad settings."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.conftest import tiny_config
from trntrain.checkpoint.convert import merge_adapters
from trntrain.checkpoint.dcp import checkpoint_keys
from trntrain.checkpoint.manager import step_dir_name
from trntrain.config import validate
from trntrain.distributed import World
from trntrain.errors import UserError
from trntrain.trainer import Trainer

TOKENS = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))
MODEL = ("model.n_layers=2", "model.n_kv_heads=2", "model.max_seq_len=256")
LORA = ("peft=lora", "peft.rank=4", "peft.alpha=8", "optim.lr=1e-2", "optim.warmup_steps=0",
        *MODEL)


pytestmark = pytest.mark.usefixtures("one_thread")


def save_random_llama(directory: Path, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=264, hidden_size=128, intermediate_size=384,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                         rms_norm_eps=1e-5, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms away from 1
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("base")
    save_random_llama(directory, seed=3)
    return directory


def hf_model(directory: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(directory, torch_dtype=torch.float32,
                                            attn_implementation="eager").eval()


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(TOKENS)
    return getattr(out, "logits", out)


def test_step0_logits_equal_the_base(base):
    trainer = Trainer(tiny_config(*LORA, f"checkpoint.init_from={base}"), World())
    torch.testing.assert_close(logits_of(trainer.model), logits_of(hf_model(base)),
                               rtol=1e-5, atol=1e-5)
    # Every weight but the adapters frozen; the adapters on every linear layer.
    trained = {n.split(".", 2)[-1] for n, p in trainer.model.named_parameters()
               if p.requires_grad}
    assert trained == {f"{m}.lora_{x}" for m in ("attention.wq", "attention.wk",
                                                   "attention.wv", "attention.wo",
                                                   "feed_forward.w1", "feed_forward.w2",
                                                   "feed_forward.w3") for x in "AB"}


def test_peft_export_and_merge_equal_trntrain(base, tmp_path):
    from peft import PeftModel

    trainer = Trainer(tiny_config(*LORA, f"checkpoint.init_from={base}", "train.max_steps=3",
                                  "checkpoint=hf", "peft.target_modules=[q_proj,v_proj,down_proj]"),
                      World(), run_dir=tmp_path / "run")
    trainer.fit()
    ours = logits_of(trainer.model)
    assert (ours - logits_of(hf_model(base))).abs().max() > 1e-3  # the adapters moved it
    exported = tmp_path / "run" / "checkpoints" / step_dir_name(3)
    config = json.loads((exported / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    peft_model = PeftModel.from_pretrained(hf_model(base), exported).eval()
    torch.testing.assert_close(logits_of(peft_model), ours, rtol=1e-4, atol=1e-4)
    merge_adapters(tmp_path / "run", tmp_path / "merged")
    torch.testing.assert_close(logits_of(hf_model(tmp_path / "merged")), ours,
                               rtol=1e-4, atol=1e-4)


def test_dcp_resume_is_bitwise_and_refuses_another_base(base, tmp_path):
    common = (*LORA, f"checkpoint.init_from={base}", "train.max_steps=6", "checkpoint=dcp",
              "checkpoint.every=3", "checkpoint.keep=0")
    straight = Trainer(tiny_config(*common), World(), run_dir=tmp_path / "a")
    losses = [r["loss"] for r in straight.fit()]
    halfway = tmp_path / "a" / "checkpoints" / step_dir_name(3)
    keys = checkpoint_keys(halfway)
    model_keys = {k for k in keys if k.startswith("model.")}
    assert model_keys and all(k.endswith((".lora_A", ".lora_B")) for k in model_keys)
    assert {k for k in keys if k.startswith("optim.") and k != "optim.step"} == {
        f"optim.{k.removeprefix('model.')}.{m}" for k in model_keys
        for m in ("exp_avg", "exp_avg_sq")}
    assert "peft.base_sha256" in keys
    resumed = Trainer(tiny_config(*common, f"checkpoint.resume={halfway}"), World(),
                      run_dir=tmp_path / "b")
    assert [r["loss"] for r in resumed.fit()] == losses[3:]
    for a, b in zip(straight.params, resumed.params, strict=True):
        assert torch.equal(a, b)

    other = tmp_path / "other_base"
    save_random_llama(other, seed=4)
    refused = Trainer(tiny_config(*LORA, f"checkpoint.init_from={other}", "train.max_steps=6",
                                  "checkpoint=dcp", f"checkpoint.resume={halfway}"), World(),
                      run_dir=tmp_path / "c")
    with pytest.raises(UserError, match="not the base these LoRA adapters") as err:
        refused.fit()
    assert "\n" not in str(err.value)

    # The run's own checkpoint merges into its recorded base, equal to trntrain.
    merge_adapters(tmp_path / "a", tmp_path / "merged")
    torch.testing.assert_close(logits_of(hf_model(tmp_path / "merged")),
                               logits_of(straight.model), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("overrides", "message"), [
    (("peft.target_modules=[]",), "peft.target_modules=[] is invalid"),
    (("peft.target_modules=[c_attn]",), "peft.target_modules=['c_attn'] is invalid"),
    (("peft.rank=0",), "peft.rank=0 is invalid"),
    (("peft.allow_random_base=false",),
     "peft.name='lora' is invalid: LoRA trains adapters on a frozen base, and "
     "checkpoint.init_from is null"),
])
def test_bad_lora_settings_are_one_line(overrides, message):
    cfg = tiny_config("peft=lora", "peft.allow_random_base=true", *overrides)
    with pytest.raises(UserError, match="^" + re.escape(message)) as err:
        validate(cfg, 1)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("checkpoint", ["hf", "dcp"])
def test_generate_from_adapters_equals_peft_generate(base, tmp_path, checkpoint, capsys):
    """`trntrain generate` on a LoRA run (its PEFT export, or its DCP checkpoint) gives,
    token for token, what PEFT's model on the transformers base generates greedily."""
    from peft import PeftModel

    from trntrain.data import ByteTokenizer
    from trntrain.generate import adapted_source, generate_main, generate_tokens, load_model

    run = tmp_path / "run"
    Trainer(tiny_config(*LORA, f"checkpoint.init_from={base}", "train.max_steps=3",
                        "optim.lr=5e-2", f"checkpoint={checkpoint}"), World(), run_dir=run).fit()
    adapters = run / "checkpoints" / step_dir_name(3)
    if checkpoint == "dcp":  # PEFT reads its own format: export the same adapters
        exported = tmp_path / "peft"
        Trainer(tiny_config(*LORA, f"checkpoint.init_from={base}", "train.max_steps=3",
                            "optim.lr=5e-2", "checkpoint=hf"), World(),
                run_dir=exported).fit()
        adapters = exported / "checkpoints" / step_dir_name(3)
    prompt = list(b"LoRA says: ")
    peft_model = PeftModel.from_pretrained(hf_model(base), adapters).eval()
    with torch.no_grad():
        out = peft_model.generate(input_ids=torch.tensor([prompt]), do_sample=False,
                                  max_new_tokens=24, min_new_tokens=24)
    expected = out[0, len(prompt):].tolist()
    assert expected != generate_tokens(load_model(adapted_source(base, None, tmp_path),
                                                  torch.device("cpu")), prompt, 24)
    source = adapted_source(run, None, tmp_path / "scratch")
    assert generate_tokens(load_model(source, torch.device("cpu")), prompt, 24) == expected
    # The command: the same tokens, printed as text.
    generate_main([str(run), "--prompt", "LoRA says: ", "--max-new-tokens", "24",
                   "--ignore-eos", "--backend", "cpu"])
    assert capsys.readouterr().out == ByteTokenizer().decode(expected)


def test_generate_refuses_a_base_without_adapters(base, tmp_path):
    from trntrain.generate import adapted_source

    with pytest.raises(UserError, match="--base is for LoRA adapters"):
        adapted_source(base, base, tmp_path)
