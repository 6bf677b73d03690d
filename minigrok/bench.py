"""Benchmarks: the machine's matmul peak, training throughput, and kernel microbenchmarks."""

from __future__ import annotations

import time

import torch

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(dtype: torch.dtype, device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """Best achieved FLOP/s of a size^3 matmul in `dtype`: the ceiling that MFU is measured against."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=generator).to(dtype)
    b = torch.randn(size, size, device=device, generator=generator).to(dtype)
    a @ b  # warm-up: first calls pick kernels and allocate
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def _time_steps(step, n_steps: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(n_steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def _training_step(model: torch.nn.Module, loss_fn, optimizer: torch.optim.Optimizer, dtype: str, device: torch.device):
    """One forward + backward + AdamW step, under bf16/fp16 autocast when asked (weights stay fp32)."""

    def step():
        context = torch.autocast(device.type, dtype=TORCH_DTYPES[dtype], enabled=dtype != "fp32")
        with context:
            loss = loss_fn(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_train(
    config,
    batch_size: int,
    seq_len: int,
    dtype: str = "fp32",
    steps: int = 10,
    warmup: int = 2,
    compare_hf: bool = False,
    device: str = "cpu",
    compile: bool = False,
) -> dict:
    """Training throughput (tokens/s) and MFU of MiniGrok on random tokens; optionally the same for transformers'
    LlamaForCausalLM of the same shape, batch and dtype, timed interleaved with ours in this process.

    When `dtype` is not fp32, the Llama model is also timed in fp32 (`hf_fp32_*`), the baseline of a mixed-precision win.
    Both use fused AdamW (the default of transformers' Trainer); `compile` wraps both models in torch.compile.
    """
    from .model import MiniGrok

    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), generator=generator).to(device)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    torch.manual_seed(0)
    ours = MiniGrok(config).to(device)
    flops_per_token = ours.report(context=seq_len).train_flops_per_token
    maybe_compile = torch.compile if compile else (lambda model: model)
    steps_by_name = {
        "ours": _training_step(
            maybe_compile(ours),
            lambda m: m(inputs, targets=targets).loss,
            torch.optim.AdamW(ours.parameters(), fused=True),
            dtype,
            device,
        )
    }
    if compare_hf:
        import transformers

        from .hf import hf_config_dict

        hf_config = transformers.LlamaConfig(**hf_config_dict(config) | {"use_cache": False})
        llama = transformers.LlamaForCausalLM(hf_config).to(device)
        hf_loss = lambda m: m(input_ids=inputs, labels=ids[:, :-1]).loss  # noqa: E731
        hf_optimizer = torch.optim.AdamW(llama.parameters(), fused=True)
        steps_by_name["hf"] = _training_step(maybe_compile(llama), hf_loss, hf_optimizer, dtype, device)
        if dtype != "fp32":
            steps_by_name["hf_fp32"] = _training_step(maybe_compile(llama), hf_loss, hf_optimizer, "fp32", device)
    times: dict[str, list[float]] = {name: [] for name in steps_by_name}
    for step in steps_by_name.values():
        _time_steps(step, warmup, device)
    for _ in range(steps):  # interleaved, so drift on a shared machine hits every model alike
        for name, step in steps_by_name.items():
            times[name] += _time_steps(step, 1, device)
    peak = matmul_peak_flops(TORCH_DTYPES[dtype], device)
    tokens = batch_size * seq_len
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": dtype,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "steps": steps,
        "compile": compile,
        "peak_flops": peak,
        "train_flops_per_token": flops_per_token,
    }
    for name, values in times.items():
        prefix = "" if name == "ours" else f"{name}_"
        median = sorted(values)[len(values) // 2]
        result[f"{prefix}step_s_median"] = median
        result[f"{prefix}step_s_p20_p80"] = [_quantile(values, 0.2), _quantile(values, 0.8)]
        result[f"{prefix}tokens_per_s"] = tokens / median
        result[f"{prefix}mfu"] = tokens / median * flops_per_token / peak
    if compare_hf:
        result["ratio_vs_hf"] = result["tokens_per_s"] / result["hf_tokens_per_s"]
        if dtype != "fp32":
            result["ratio_vs_hf_fp32"] = result["tokens_per_s"] / result["hf_fp32_tokens_per_s"]
    return result


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
