"""Activation checkpointing: the same gradients as without, recomputing what each mode says, in less memory; with
shared layers, torch.compile and FSDP2."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from minigrok import MiniGrok, ModelConfig, functional
from minigrok.bench.memory import peak_bytes
from minigrok.model import CHECKPOINTING

SHARED = {
    "none": {},
    "cycle": {"share": "cycle", "n_unique_layers": 2},
    "all": {"share": "all"},
    "conv-cycle": {"share": "cycle", "n_unique_layers": 2, "layer_pattern": "CA"},  # selective recomputes C whole
    "options": {"qk_norm": True, "mlp": "relu2", "embed_dim": 16},  # the q/k norms sit in the recomputed projections
}


def small_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=97, dim=48, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=80, max_seq_len=64) | overrides
    return ModelConfig(**values)


def batch(config: ModelConfig, rows: int = 3, length: int = 33) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, config.vocab_size, (rows, length + 1), generator=torch.Generator().manual_seed(0))
    return ids[:, :-1], ids[:, 1:]


def gradients(model: MiniGrok, mode: str, forward=None) -> tuple[float, list[torch.Tensor]]:
    """(loss, every parameter's gradient) of one backward with activation checkpointing `mode`."""
    model.activation_checkpointing = mode
    model.zero_grad(set_to_none=True)
    inputs, targets = batch(model.config)
    loss = (model if forward is None else forward)(inputs, targets=targets).loss
    loss.backward()
    return loss.item(), [param.grad.clone() for param in model.parameters()]


@pytest.mark.parametrize("share", list(SHARED))
def test_gradients_equal_those_without_checkpointing(share):
    torch.manual_seed(0)
    model = MiniGrok(small_config(**SHARED[share]))
    loss, expected = gradients(model, "none")
    for mode in ("full", "selective"):
        checkpointed_loss, got = gradients(model, mode)
        assert checkpointed_loss == loss
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_each_mode_recomputes_what_it_says_and_saves_memory(monkeypatch):
    """full reruns every block in backward; selective reruns all but the attention op; both hold less at peak."""
    calls = {"attention": 0, "swiglu": 0}
    for name in calls:
        original = getattr(functional, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(functional, name, counted)
    torch.manual_seed(0)
    config = small_config(**SHARED["cycle"], dim=64, ffn_dim=256, max_seq_len=128)
    model = MiniGrok(config)
    inputs, targets = batch(config, rows=4, length=128)
    expected_calls = {"none": (4, 4), "full": (8, 8), "selective": (4, 8)}  # (attention, swiglu) over 4 layers
    peaks = {}
    for mode in CHECKPOINTING:
        model.activation_checkpointing = mode
        calls.update(attention=0, swiglu=0)
        peaks[mode], _ = peak_bytes(lambda: model(inputs, targets=targets).loss.backward(), torch.device("cpu"))
        assert (calls["attention"], calls["swiglu"]) == expected_calls[mode], mode
    assert peaks["full"] < peaks["selective"] < 0.75 * peaks["none"]
    with torch.no_grad():  # no graph, nothing to recompute
        calls.update(attention=0, swiglu=0)
        model(inputs, targets=targets)
        assert (calls["attention"], calls["swiglu"]) == (4, 4)


def test_compiled_model_checkpoints_with_the_same_gradients():
    torch.manual_seed(0)
    model = MiniGrok(small_config(**SHARED["cycle"], dim=32, ffn_dim=64))
    loss, expected = gradients(model, "none")
    compiled = torch.compile(model, backend="aot_eager")  # traced and partitioned as inductor would, without codegen
    for mode in ("full", "selective"):
        compiled_loss, got = gradients(model, mode, compiled)
        assert compiled_loss == pytest.approx(loss, rel=1e-6)
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _fsdp_rank(rank: int, port: int, results) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = MiniGrok(small_config(**SHARED["cycle"], dim=32, ffn_dim=64))
        for block in model.blocks:  # each physical block sharded once, however many depths run it
            fully_shard(block)
        fully_shard(model)
        for mode in CHECKPOINTING:
            _, grads = gradients(model, mode)  # the same batch on both ranks: the mean gradient is its own
            if rank == 0:
                results[mode] = [grad.full_tensor() for grad in grads]
            else:
                [grad.full_tensor() for grad in grads]  # full_tensor is a collective: every rank takes part
    finally:
        dist.destroy_process_group()


def test_fsdp2_sharded_blocks_checkpoint_with_the_same_gradients():
    torch.manual_seed(0)
    _, expected = gradients(MiniGrok(small_config(**SHARED["cycle"], dim=32, ffn_dim=64)), "none")
    with socket.socket() as probe:  # a free port for the process group
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_fsdp_rank, args=(port, results), nprocs=2)
    for mode in CHECKPOINTING:
        for a, b in zip(results[mode], expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unknown_mode_is_refused():
    model = MiniGrok(small_config())
    model.activation_checkpointing = "partial"
    with pytest.raises(ValueError, match=r"activation_checkpointing='partial' is unknown: choose one of"):
        model(*batch(model.config))
