"""The trainer adds the MoE router losses, weighted by train.moe_aux_loss_weight and train.moe_z_loss_weight."""

import copy
import json

import pytest
import torch

from minigrok import MiniGrok, ModelConfig
from minigrok.train.config import TrainConfig
from minigrok.train.data import prepare_data
from minigrok.train.tokenizer import byte_tokenizer
from minigrok.train.trainer import Trainer

MODEL = dict(vocab_size=320, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)


@pytest.fixture
def data(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Every expert sees only the tokens routed to it, and the router learns to balance them.\n" * 30)
    return prepare_data(tmp_path / "data", byte_tokenizer(), [str(corpus)], val_fraction=0.1)


@pytest.mark.parametrize("weights", [(0.0, 0.0), (0.5, 0.02)])
def test_the_step_gradient_is_the_cross_entropy_plus_the_weighted_router_losses(data, tmp_path, weights):
    torch.manual_seed(0)
    model = MiniGrok(ModelConfig(**MODEL, n_experts=4, experts_per_token=2, moe_shared_expert=True))
    initial = copy.deepcopy(model)
    values = dict(batch_size=2, seq_len=24, max_steps=1, grad_accum=2, dtype="fp32", grad_clip=0.0, peak_flops=1e11)
    values |= dict(log_every=1, eval_every=1, eval_tokens=64, ckpt_every=1)
    config = TrainConfig(**values, moe_aux_loss_weight=weights[0], moe_z_loss_weight=weights[1])
    trainer = Trainer(model, config, data, byte_tokenizer(), tmp_path / "run", progress=False)
    seen = {}
    trainer.optimizer.step = lambda: seen.update({n: p.grad.clone() for n, p in model.named_parameters()})
    trainer.train()
    for micro in range(2):
        inputs, targets = trainer.sampler.batch(0, micro, trainer.rows)
        loss = initial(inputs, targets=targets).loss
        balance, z_loss = initial.router_losses()
        ((loss + weights[0] * balance + weights[1] * z_loss) / 2).backward()
    for name, param in initial.named_parameters():
        torch.testing.assert_close(seen[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    step = next(record for record in logged if "loss" in record)
    parts = []
    with torch.no_grad():
        for micro in range(2):
            initial(trainer.sampler.batch(0, micro, trainer.rows)[0])
            parts.append(initial.router_losses())
    for key, index in (("moe_aux_loss", 0), ("moe_z_loss", 1)):
        assert step[key] == pytest.approx(sum(part[index].item() for part in parts) / 2, rel=1e-5)


def test_qat_refuses_a_moe_model(data, tmp_path):
    model = MiniGrok(ModelConfig(**MODEL, n_experts=4))
    config = TrainConfig(batch_size=2, seq_len=24, max_steps=1, dtype="fp32", qat="int8")
    with pytest.raises(ValueError, match="n_experts=4: quantisation does not handle mixture-of-experts models"):
        Trainer(model, config, data, byte_tokenizer(), tmp_path / "run", progress=False)
