"""The whole model on the Triton kernels (interpreter on CPU) against the PyTorch path: same loss and gradients."""

import pytest
import torch

from minigrok import MiniGrok, ModelConfig

# The architecture options together: per-head QK RMSNorm (the Triton rms_norm over head_dim rows), ReLU² and a
# factorised embedding whose down projection feeds the fused head + cross-entropy.
OPTIONS = {"qk_norm": True, "mlp": "relu2", "embed_dim": 24}


@pytest.mark.parametrize(
    ("share", "window", "layer_pattern", "options"),
    [
        ("none", None, "A", {}),
        ("cycle", None, "A", {}),
        ("cycle", 5, "A", {}),
        ("none", None, "CA", {}),
        ("cycle", 5, "A", OPTIONS),
    ],
)
def test_triton_backend_matches_torch_backend(share, window, layer_pattern, options):
    torch.manual_seed(0)
    overrides = {"share": share, "n_unique_layers": None, "backend": "torch", "window": window} | options
    overrides |= {"layer_pattern": layer_pattern} | ({"n_layers": 4, "window_pattern": "SSL"} if window else {})
    config = ModelConfig.from_dict(ModelConfig.from_yaml("tiny").to_dict() | overrides)
    reference = MiniGrok(config)
    triton_model = MiniGrok(ModelConfig.from_dict(config.to_dict() | {"backend": "triton"}))
    triton_model.load_state_dict(reference.state_dict())
    ids = torch.randint(0, config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    targets = ids.roll(-1, dims=1)
    targets[:, -3:] = -100
    outputs = []
    for model in (reference, triton_model):
        out = model(ids, targets=targets)
        out.loss.backward()
        outputs.append((out, {name: p.grad for name, p in model.named_parameters()}))
    (ref_out, ref_grads), (tri_out, tri_grads) = outputs
    torch.testing.assert_close(tri_out.loss, ref_out.loss, rtol=1e-5, atol=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(tri_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("window", "layer_pattern", "options"),
    [(None, "A", {}), (3, "A", {}), (None, "CA", {}), (3, "CA", {}), (3, "CA", OPTIONS)],
)
def test_triton_backend_generation_with_kv_cache(window, layer_pattern, options):
    """With a window of 3 the decode steps run far past it, the windowed (attention) layer through its ring of 3 slots."""
    torch.manual_seed(2)
    overrides = {"backend": "torch", "layer_pattern": layer_pattern} | options
    overrides |= {"window": window, "window_pattern": "LS"} if window else {}
    config = ModelConfig.from_dict(ModelConfig.from_yaml("tiny").to_dict() | overrides)
    reference = MiniGrok(config).eval()
    triton_model = MiniGrok(ModelConfig.from_dict(config.to_dict() | {"backend": "triton"})).eval()
    triton_model.load_state_dict(reference.state_dict())
    prompt = torch.randint(0, config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    expected = reference.generate(prompt, 12, temperature=0)
    assert torch.equal(triton_model.generate(prompt, 12, temperature=0), expected)
