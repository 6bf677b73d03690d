"""Logit soft-capping (ModelConfig.logit_softcap): the config, the model's logits, loss and gradients, generation's
logits, distillation, checkpoints, the Llama export and the report, each against the same weights uncapped."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from minigrok import MiniGrok, ModelConfig
from minigrok.cli import main
from minigrok.config import ConfigError
from minigrok.generate import decode_logits, prefill
from minigrok.train.config import TrainConfig
from minigrok.train.distill import DistilledStudent

CAP = 2.0
SHAPE = dict(vocab_size=97, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=80, max_seq_len=64)


def capped_and_plain(seed: int = 0, cap: float = CAP, **overrides) -> tuple[MiniGrok, MiniGrok]:
    """A soft-capped model and one with its weights but no cap; the head is scaled so the logits have a std of ~3, well
    past the cap."""
    torch.manual_seed(seed)
    capped = MiniGrok(ModelConfig(**SHAPE | overrides, logit_softcap=cap))
    with torch.no_grad():
        capped.head_weight.mul_(20)
    plain = MiniGrok(ModelConfig(**SHAPE | overrides))
    plain.load_state_dict(capped.state_dict())
    return capped, plain


def random_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("value", [0, -1.0, math.nan, math.inf, "30", True])
def test_bad_logit_softcap_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"logit_softcap=.* must be a positive number such as 30.0, or null"):
        ModelConfig(**SHAPE, logit_softcap=value)


def test_logits_are_the_capped_tanh_of_the_plain_ones():
    capped, plain = capped_and_plain()
    ids = random_ids(2, 20)
    logits, plain_logits = capped(ids).logits, plain(ids).logits
    assert plain_logits.abs().max() > 2 * CAP  # the cap is reached
    torch.testing.assert_close(logits, CAP * torch.tanh(plain_logits / CAP), rtol=1e-5, atol=1e-6)
    assert logits.abs().max() <= CAP


def test_generation_prefill_and_decode_logits_are_capped():
    """What generate, speculative decoding and the server sample from: prefill and one-token decode logits."""
    capped, plain = capped_and_plain(seed=1)
    prompts = [random_ids(1, 7, seed=2)[0], random_ids(1, 4, seed=3)[0]]
    with torch.no_grad():
        (logits, cache), (plain_logits, plain_cache) = (prefill(m, prompts, 16) for m in (capped, plain))
        torch.testing.assert_close(logits, CAP * torch.tanh(plain_logits / CAP), rtol=1e-5, atol=1e-6)
        tokens = plain_logits.argmax(-1)
        logits, plain_logits = decode_logits(capped, tokens, cache), decode_logits(plain, tokens, plain_cache)
    assert plain_logits.abs().max() > 2 * CAP
    torch.testing.assert_close(logits, CAP * torch.tanh(plain_logits / CAP), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_loss_and_gradients_are_those_of_the_capped_logits(tie_embeddings):
    """The fused head + loss (training and evaluation) against float64 autograd through explicit capped logits."""
    capped, plain = capped_and_plain(seed=4, tie_embeddings=tie_embeddings)
    ids, targets = random_ids(2, 24, seed=5), random_ids(2, 24, seed=6)
    targets[:, ::5] = -100
    capped(ids, targets=targets).loss.backward()
    loss = capped(ids, targets=targets).loss
    reference = copy.deepcopy(plain).double()
    logits = reference(ids).logits
    ref_loss = F.cross_entropy(CAP * torch.tanh(logits / CAP).flatten(0, 1), targets.flatten(), ignore_index=-100)
    ref_loss.backward()
    plain_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert (plain_loss - ref_loss).abs() > 0.1 * ref_loss  # the cap changes the loss a lot
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=0)
    for (name, param), ref_param in zip(capped.named_parameters(), reference.parameters(), strict=True):
        scale = ref_param.grad.abs().max()
        assert (param.grad.double() - ref_param.grad).abs().max() <= 1e-5 * scale, name


@pytest.mark.parametrize("teacher_cap", [None, 1.5])
def test_distillation_caps_the_student_and_teacher_each_by_its_own(teacher_cap):
    student, _ = capped_and_plain(seed=7)
    teacher, teacher_plain = capped_and_plain(seed=8, cap=teacher_cap or CAP)
    teacher = teacher if teacher_cap else teacher_plain
    config = TrainConfig(max_steps=1, distill_alpha=0.5, distill_temperature=2.0, distill_kind="reverse")
    ids, targets = random_ids(2, 24, seed=9), random_ids(2, 24, seed=10)
    loss = DistilledStudent(student, teacher, config)(ids, targets).loss
    loss.backward()
    ref_student, ref_teacher = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    s, t = (m(ids).logits.flatten(0, 1) / 2.0 for m in (ref_student, ref_teacher))  # logits capped by each model
    log_s, log_t = s.log_softmax(-1), t.log_softmax(-1)
    kl = (log_s.exp() * (log_s - log_t)).sum(-1).mean()
    ref_loss = 0.5 * 4.0 * kl + 0.5 * F.cross_entropy(2.0 * s, targets.flatten())
    ref_loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=0)
    grad, ref_grad = student.embed.weight.grad, ref_student.embed.weight.grad
    assert (grad.double() - ref_grad).abs().max() <= 1e-5 * ref_grad.abs().max()


def test_a_capped_checkpoint_loads_back_capped(tmp_path):
    capped, _ = capped_and_plain(seed=11)
    capped.save_pretrained(tmp_path)
    loaded = MiniGrok.from_pretrained(tmp_path)
    assert loaded.config.logit_softcap == CAP
    ids = random_ids(1, 9, seed=12)
    torch.testing.assert_close(loaded(ids).logits, capped(ids).logits, rtol=0, atol=0)


def test_export_hf_refuses_a_capped_model(tmp_path, capsys):
    capped, _ = capped_and_plain(seed=13)
    capped.save_pretrained(tmp_path / "ours")
    assert main(["export-hf", "--checkpoint", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")]) == 2
    assert "logit_softcap=2.0: the Llama layout has no logit soft-capping" in capsys.readouterr().err
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def test_info_and_report_show_the_cap(capsys):
    assert main(["info", "--config", "tiny", "--set", "model.logit_softcap=30"]) == 0
    out = capsys.readouterr().out
    assert "  logit_softcap: 30\n" in out
    assert "logit_softcap=30 (logits = 30 * tanh(z / 30))" in out
    assert main(["info", "--config", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "  logit_softcap: None\n" in out and "tanh" not in out
    assert "logits = 2.0 * tanh(z / 2.0)" in str(capped_and_plain()[0].report())
    assert main(["info", "--config", "tiny", "--set", "model.logit_softcap=-1"]) == 2
    assert "logit_softcap=-1 must be a positive number" in capsys.readouterr().err
