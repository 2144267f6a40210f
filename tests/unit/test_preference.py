"""Preference objectives: the papers' formulas by hand, TRL's DPO losses, the data rows."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import tiny_config
from trntrain.config import ConfigError, validate
from trntrain.data.base import IGNORE_INDEX
from trntrain.data.preference import render_response
from trntrain.data.tokenizer import ByteChatTemplate
from trntrain.distributed import World
from trntrain.errors import UserError
from trntrain.objective.preference import (
    PairLogps,
    dpo_loss,
    orpo_loss,
    pair_logps,
    simpo_loss,
)
from trntrain.trainer import Trainer

# Fixed log-probabilities of three pairs: summed over (4, 2), (3, 5), (6, 6) tokens.
POLICY = PairLogps(torch.tensor([-4.0, -2.5, -9.0]), torch.tensor([-5.0, -2.0, -7.5]),
                   torch.tensor([4.0, 3.0, 6.0]), torch.tensor([2.0, 5.0, 6.0]))
REFERENCE = torch.tensor([[-4.5, -4.6], [-2.0, -2.2], [-8.0, -8.5]])


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def by_hand(name: str, beta: float, smoothing: float = 0.0, gamma: float = 0.0) -> list[float]:
    out = []
    for i in range(3):
        pc, pr = POLICY.chosen[i].item(), POLICY.rejected[i].item()
        nc, nr = POLICY.chosen_tokens[i].item(), POLICY.rejected_tokens[i].item()
        rc, rr = REFERENCE[i].tolist()
        delta = (pc - rc) - (pr - rr)
        if name == "sigmoid":
            out.append(-(1 - smoothing) * logsig(beta * delta) - smoothing * logsig(-beta * delta))
        elif name == "hinge":
            out.append(max(0.0, 1 - beta * delta))
        elif name == "ipo":
            out.append(((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2)
        elif name == "orpo":  # Hong et al. 2024, eq. 6-7: odds = P / (1 - P), P = exp(mean)
            mc, mr = pc / nc, pr / nr
            odds = (mc - math.log(1 - math.exp(mc))) - (mr - math.log(1 - math.exp(mr)))
            out.append(-mc - beta * logsig(odds))
        elif name == "simpo":  # Meng et al. 2024, eq. 6
            x = beta * (pc / nc - pr / nr) - gamma
            out.append(-(1 - smoothing) * logsig(x) - smoothing * logsig(-x))
    return out


@pytest.mark.parametrize(("loss_type", "smoothing"), [("sigmoid", 0.0), ("sigmoid", 0.2),
                                                      ("hinge", 0.0), ("ipo", 0.0)])
def test_dpo_losses_equal_the_papers_formulas(loss_type, smoothing):
    loss, chosen, rejected = dpo_loss(POLICY, REFERENCE, 0.3, loss_type, smoothing)
    assert loss.tolist() == pytest.approx(by_hand(loss_type, 0.3, smoothing), rel=1e-6)
    assert chosen.tolist() == pytest.approx((0.3 * (POLICY.chosen - REFERENCE[:, 0])).tolist())
    assert rejected.tolist() == pytest.approx((0.3 * (POLICY.rejected - REFERENCE[:, 1])).tolist())


def test_orpo_and_simpo_equal_the_papers_formulas():
    assert orpo_loss(POLICY, 0.25)[0].tolist() == pytest.approx(by_hand("orpo", 0.25), rel=1e-6)
    assert simpo_loss(POLICY, 2.0, 0.8)[0].tolist() == pytest.approx(
        by_hand("simpo", 2.0, gamma=0.8), rel=1e-6)
    assert simpo_loss(POLICY, 2.0, 0.8, 0.1)[0].tolist() == pytest.approx(
        by_hand("simpo", 2.0, 0.1, gamma=0.8), rel=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_losses_equal_trl(loss_type):
    """TRL's DPOTrainer loss on the same per-token log-probabilities and masks."""
    trl = pytest.importorskip("trl.trainer.dpo_trainer")
    gen = torch.Generator().manual_seed(0)
    pairs, seq = 4, 12
    completion = torch.zeros(2 * pairs, seq, dtype=torch.long)
    for row in range(2 * pairs):  # a prompt of 3-5 tokens, a response of 2-6
        start = 3 + row % 3
        completion[row, start:start + 2 + (row * 7) % 5] = 1
    token_logps = -torch.rand(2 * pairs, seq - 1, generator=gen) * 3 * completion[:, 1:]
    reference = -torch.rand(2, pairs, generator=gen) * 10

    class Outputs(SimpleNamespace):
        pass

    def model(**kwargs):
        zeros = torch.zeros_like(token_logps)
        return Outputs(log_probs=token_logps, entropy=zeros, mean_logits=zeros,
                       is_top1=zeros.bool())

    identity = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x,
                               device=torch.device("cpu"))
    fake = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=identity, aux_loss_enabled=False,
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=0.2, label_smoothing=0.0,
        use_weighting=False, _metrics={"train": defaultdict(list)}, _total_train_tokens=0,
        _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * pairs, seq, dtype=torch.long),
              "attention_mask": torch.ones(2 * pairs, seq, dtype=torch.long),
              "completion_mask": completion, "ref_chosen_logps": reference[0],
              "ref_rejected_logps": reference[1]}
    expected = trl.DPOTrainer._compute_loss(fake, model, inputs, False)

    sums, counts = token_logps.sum(1), completion[:, 1:].sum(1).float()
    ours = PairLogps(sums[:pairs], sums[pairs:], counts[:pairs], counts[pairs:])
    loss, chosen, rejected = dpo_loss(ours, reference.T, 0.2, loss_type)
    assert loss.mean().item() == pytest.approx(expected.item(), rel=1e-6)
    metrics = fake._metrics["train"]
    assert chosen.mean().item() == pytest.approx(metrics["rewards/chosen"][0], rel=1e-6)
    assert (chosen > rejected).float().mean().item() == metrics["rewards/accuracies"][0]


def test_pair_logps_sum_each_documents_trained_tokens():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 10, 7, generator=gen)
    labels = torch.randint(0, 7, (2, 10), generator=gen)
    labels[:, :2] = IGNORE_INDEX  # prompts
    labels[:, 5:7] = IGNORE_INDEX
    documents = torch.tensor([[0] * 5 + [1] * 4 + [2]] * 2)
    labels[:, 9] = IGNORE_INDEX  # padding
    token = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    got = pair_logps(token.masked_fill(labels == IGNORE_INDEX, 0), labels, documents)
    for r in range(2):
        assert got.chosen[r].item() == pytest.approx(token[r, 2:5].sum().item(), rel=1e-6)
        assert got.rejected[r].item() == pytest.approx(token[r, 7:9].sum().item(), rel=1e-6)
    assert got.chosen_tokens.tolist() == [3.0, 3.0] and got.rejected_tokens.tolist() == [2.0, 2.0]


# -- data and configuration --------------------------------------------------------------------

def write_pairs(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def pair_config(path, *overrides):
    return tiny_config("data=preference", f"data.path={path}", "objective=dpo",
                       "data.val_fraction=0.3", *overrides)


def test_rows_hold_chosen_then_rejected_with_only_the_responses_trained(tmp_path):
    path = write_pairs(tmp_path / "p.jsonl", [{"prompt": "Hi", "chosen": "AB",
                                               "rejected": "xyz"}] * 12)
    trainer = Trainer(pair_config(path, "train.seq_len=96", "train.global_batch_size=2"),
                      World())
    batch = trainer.data.batch("train", torch.tensor([0]), shuffle=False)
    inputs, labels, positions, documents = (t[0] for t in batch[:4])
    # "<|user|>\nHi\n<|assistant|>\nAB<eot>": 9 + 3 + 14 + 3 = 29 tokens, 28 inputs.
    chosen, rejected = documents == 0, documents == 1
    assert chosen.sum() == 28 and rejected.sum() == 29
    assert bytes(labels[chosen][-3:-1].tolist()) == b"AB" and labels[chosen][-1] == 256
    assert (labels[chosen] != IGNORE_INDEX).sum() == 3
    assert bytes(labels[rejected][-4:-1].tolist()) == b"xyz"
    assert (labels[rejected] != IGNORE_INDEX).sum() == 4
    assert positions[28] == 0 and positions[27] == 27 and positions[28 + 28] == 28
    assert (labels[documents == 2] == IGNORE_INDEX).all() and (inputs[documents == 2] == 256).all()
    assert batch.pairs.tolist() == [0]


def test_a_multi_turn_prompts_assistant_turns_are_not_trained():
    template = ByteChatTemplate()
    prompt = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
              {"role": "user", "content": "Q2"}]
    ids, mask = render_response(template, prompt, [{"role": "assistant", "content": "A2"}])
    full_ids, full_mask = template.render(prompt + [{"role": "assistant", "content": "A2"}])
    assert (ids == full_ids).all()
    assert mask.sum() == 3 and full_mask.sum() == 6  # "A2" and its end-of-text token only
    assert bytes(ids[mask][:2].tolist()) == b"A2"


@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": "Hi", "chosen": "", "rejected": "no"}, "chosen response is empty"),
    ({"prompt": "Hi", "chosen": "ok"}, "'rejected' is missing"),
    ({"prompt": "x" * 80, "chosen": "a", "rejected": "b"}, "more than the row of train.seq_len"),
])
def test_bad_pairs_are_one_line_naming_the_file_and_line(tmp_path, record, message):
    good = {"prompt": "Hi", "chosen": "yes", "rejected": "no"}
    path = write_pairs(tmp_path / "p.jsonl", [good] * 4 + [record] + [good] * 4)
    with pytest.raises(UserError, match=message) as err:
        cfg = pair_config(path, "train.seq_len=64")
        validate(cfg, 1)
        Trainer(cfg, World())
    assert f"{path}:5" in str(err.value) and "\n" not in str(err.value)


def test_objective_and_data_must_agree():
    with pytest.raises(ConfigError, match="objective.name.*no preference pairs"):
        validate(tiny_config("objective=dpo"), 1)
    with pytest.raises(ConfigError, match="objective.name.*only a preference objective"):
        validate(tiny_config("data=preference", "train.seq_len=128"), 1)
    with pytest.raises(ConfigError, match="objective.loss_type"):
        validate(tiny_config("data=preference", "objective=dpo", "objective.loss_type=kto",
                             "train.seq_len=128"), 1)
