"""train.optimizer=muon: the update against torch.optim.Muon, which parameters it takes, shared matrices stepped
once, the schedule scaling its lr, and its state saved and loaded."""

import pytest
import torch

from minigrok import MiniGrok, ModelConfig
from minigrok.train.config import TrainConfig
from minigrok.train.optim import (
    MuonUpdate,
    MuonWithAdamW,
    build_optimizer,
    is_muon_group,
    orthogonalise,
    set_learning_rates,
)

MODEL = dict(vocab_size=96, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=32)


def muon_config(**overrides) -> TrainConfig:
    return TrainConfig(max_steps=10, optimizer="muon", **({"warmup_steps": 2} | overrides))


@pytest.mark.parametrize("adjust", ["match_rms_adamw", "original"])
@pytest.mark.parametrize("shape", [(37, 19), (19, 37)], ids=["tall", "wide"])
def test_muon_update_matches_torchs_on_the_same_inputs(adjust, shape):
    torch.manual_seed(1)
    start = torch.randn(shape)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    settings = dict(lr=0.02, weight_decay=0.1, momentum=0.9, adjust_lr_fn=adjust)
    optimizers = [MuonUpdate([ours], **settings), torch.optim.Muon([theirs], nesterov=True, **settings)]
    for _ in range(3):  # momentum carried over steps
        grad = torch.randn(shape)
        for param, optimizer in zip((ours, theirs), optimizers, strict=True):
            param.grad = grad.clone()
            optimizer.step()
    assert (ours.data - start).abs().max() > 1e-3  # moved
    torch.testing.assert_close(ours.data, theirs.data, rtol=1e-5, atol=1e-6)
    buffers = [o.state[p]["momentum_buffer"] for p, o in zip((ours, theirs), optimizers, strict=True)]
    torch.testing.assert_close(*buffers, rtol=1e-6, atol=1e-7)


def test_orthogonalise_flattens_the_singular_values_and_keeps_the_vectors():
    torch.manual_seed(2)
    matrix = torch.randn(29, 45, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    result = orthogonalise(matrix.float(), steps=5).double()
    # Newton-Schulz gives U S' V^T with S' near 1 (Keller Jordan's coefficients trade exactness for speed): the
    # singular values land in about [0.7, 1.2], the singular vectors are those of the input.
    values = torch.linalg.svdvals(result)
    assert 0.6 < values.min() and values.max() < 1.3, values
    cross = u.T @ result @ vh.T  # diagonal when the vectors agree
    assert (cross - torch.diag(torch.diagonal(cross))).abs().max() < 0.05


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    config = ModelConfig(**MODEL | dict(layer_pattern="CA", n_experts=4, experts_per_token=2, tie_embeddings=False))
    model = MiniGrok(config)
    optimizer = build_optimizer(model, muon_config())
    assert isinstance(optimizer, MuonWithAdamW)
    names = {id(p): name for name, p in model.named_parameters()}
    muon = {names[id(p)] for g in optimizer.param_groups if is_muon_group(g) for p in g["params"]}
    adamw = {names[id(p)] for g in optimizer.param_groups if not is_muon_group(g) for p in g["params"]}
    expected = {
        name
        for name in names.values()
        if name.endswith(("qkv_proj.weight", "o_proj.weight", "in_proj.weight", "out_proj.weight", "router.weight"))
    }
    assert muon == expected and len(expected) == 4 * 3  # attention or conv projections, and routers
    assert adamw == set(names.values()) - muon  # embedding, head, norms, conv taps, 3-D experts
    assert {"embed.weight", "lm_head.weight", "norm.weight", "blocks.0.conv.weight", "blocks.1.mlp.down_proj"} <= adamw
    dense = build_optimizer(MiniGrok(ModelConfig(**MODEL)), muon_config())
    dense_muon = [p.shape for g in dense.param_groups if is_muon_group(g) for p in g["params"]]
    assert len(dense_muon) == 4 * 4  # qkv (GQA: 64 rows for 32 + 2 x 16), o, gate_up, down per layer
    assert torch.Size([64, 32]) in dense_muon
    adamw_only = build_optimizer(MiniGrok(ModelConfig(**MODEL)), TrainConfig(max_steps=1))
    assert isinstance(adamw_only, torch.optim.AdamW) and not any(map(is_muon_group, adamw_only.param_groups))


def test_a_shared_matrix_is_one_parameter_stepped_once():
    torch.manual_seed(0)
    model = MiniGrok(ModelConfig(**MODEL | dict(share="all")))  # one block run at all 4 depths
    config = muon_config(muon_lr=0.01, muon_weight_decay=0.05)
    optimizer = build_optimizer(model, config)
    (group,) = [g for g in optimizer.param_groups if is_muon_group(g)]
    assert len(group["params"]) == 4  # the one block's matrices, not 4 x 4
    ids = torch.randint(0, 96, (2, 16))
    model(ids, targets=ids).loss.backward()
    weight = model.blocks[0].attn.o_proj.weight
    alone = torch.nn.Parameter(weight.detach().clone())
    alone.grad = weight.grad.clone()  # the gradient summed over the 4 depths
    set_learning_rates(optimizer, config, step=5, progress=0.5)
    reference = torch.optim.Muon([alone], lr=group["lr"], weight_decay=0.05, adjust_lr_fn="match_rms_adamw")
    optimizer.step()
    reference.step()  # one update of the summed gradient: a second one would move it twice as far
    torch.testing.assert_close(weight.detach(), alone.detach(), rtol=0, atol=0)


def test_the_schedule_scales_muons_lr_as_adamws_and_warms_up_its_momentum():
    model = MiniGrok(ModelConfig(**MODEL))
    config = muon_config(lr=1e-3, muon_lr=0.02, warmup_steps=4, muon_momentum_warmup_steps=10)
    optimizer = build_optimizer(model, config)
    for step, progress, factor, momentum in [(0, 0.0, 0.25, 0.85), (5, 0.5, None, 0.9), (20, 1.0, 0.1, 0.95)]:
        adamw_lr = set_learning_rates(optimizer, config, step, progress)
        for group in optimizer.param_groups:
            if is_muon_group(group):
                assert group["lr"] == pytest.approx(0.02 * adamw_lr / 1e-3)
                assert group["momentum"] == pytest.approx(momentum)
            else:
                assert group["lr"] == adamw_lr
        if factor is not None:
            assert adamw_lr == pytest.approx(1e-3 * factor)


def test_state_round_trips_through_one_numbering_of_both_optimizers():
    torch.manual_seed(0)
    model = MiniGrok(ModelConfig(**MODEL))
    config = muon_config()
    optimizer = build_optimizer(model, config)
    ids = torch.randint(0, 96, (2, 16))
    model(ids, targets=ids).loss.backward()
    optimizer.step()
    saved = optimizer.state_dict()
    pairs = zip(optimizer.param_groups, saved["param_groups"], strict=True)
    numbered = [(i, p, group) for group, kept in pairs for i, p in zip(kept["params"], group["params"], strict=True)]
    assert sorted(saved["state"]) == [i for i, _, _ in numbered] == list(range(len(numbered)))
    for index, param, group in numbered:  # each parameter's state is its own optimizer's, of its shape
        key = "momentum_buffer" if is_muon_group(group) else "exp_avg"
        assert sorted(saved["state"][index]) == ([key] if is_muon_group(group) else ["exp_avg", "exp_avg_sq", "step"])
        assert saved["state"][index][key].shape == param.shape
    assert sum("momentum_buffer" in values for values in saved["state"].values()) == 4 * 4
    fresh = build_optimizer(model, config)
    fresh.load_state_dict(saved)
    for index, values in fresh.state_dict()["state"].items():
        for key, value in values.items():
            assert torch.equal(value, saved["state"][index][key]), (index, key)
