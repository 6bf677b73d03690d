"""`minigrok bench train`: training throughput, MFU and peak memory of our model against its baselines."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..machine import autocast, matmul_peak_flops, resolve_dtype
from .memory import peak_bytes
from .timing import Timing, clock_resolution, sample_seconds


def training_step(
    model: torch.nn.Module, loss_fn, optimizer: torch.optim.Optimizer, dtype: str, device: torch.device
) -> Callable[[], None]:
    """One forward + backward + AdamW step, under bf16/fp16 autocast when asked (weights stay fp32)."""

    def step() -> None:
        with autocast(dtype, device):
            loss = loss_fn(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_train(
    config,
    batch_size: int,
    seq_len: int,
    dtype: str = "auto",
    steps: int = 10,
    warmup: int = 2,
    compare: tuple[str, ...] = (),
    device: str = "cpu",
    compile: bool = False,
) -> dict:
    """Training throughput (tokens/s), MFU and peak memory of a MiniGrok step on random tokens, timed interleaved
    in this process with each baseline named in `compare`:

    "hf": transformers' LlamaForCausalLM of the same shape, batch and dtype (and, when `dtype` is not fp32, also in
    fp32 as `hf_fp32_*`, the baseline of a mixed-precision win); "naive-loss": our model with full logits and
    F.cross_entropy instead of the chunked linear cross-entropy. All use fused AdamW (the default of transformers'
    Trainer); `compile` wraps every model in torch.compile. `dtype="auto"` runs in the dtype the trainer would
    choose here, and the result gives the figures of every candidate. `*step_stable` is false where the step times
    spread too wide to trust (see `Timing.note`).
    """
    from ..model import MiniGrok

    device = torch.device(device)
    choice = resolve_dtype(dtype, config, batch_size * seq_len, device, training=True, field="--dtype")
    dtype = choice.dtype
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), generator=generator).to(device)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    torch.manual_seed(0)
    ours = MiniGrok(config).to(device)
    flops_per_token = ours.report(context=seq_len).train_flops_per_token
    maybe_compile = torch.compile if compile else (lambda model: model)
    steps_by_name = {
        "ours": training_step(
            maybe_compile(ours),
            lambda m: m(inputs, targets=targets).loss,
            torch.optim.AdamW(ours.parameters(), fused=True),
            dtype,
            device,
        )
    }
    if "naive-loss" in compare:
        naive_loss = lambda m: F.cross_entropy(m(inputs).logits.flatten(0, 1).float(), targets.flatten())  # noqa: E731
        steps_by_name["naive_loss"] = training_step(
            maybe_compile(ours), naive_loss, torch.optim.AdamW(ours.parameters(), fused=True), dtype, device
        )
    if "hf" in compare:
        import transformers

        from ..hf import hf_config_dict

        hf_config = transformers.LlamaConfig(**hf_config_dict(config) | {"use_cache": False})
        llama = transformers.LlamaForCausalLM(hf_config).to(device)
        hf_loss = lambda m: m(input_ids=inputs, labels=ids[:, :-1]).loss  # noqa: E731
        hf_optimizer = torch.optim.AdamW(llama.parameters(), fused=True)
        steps_by_name["hf"] = training_step(maybe_compile(llama), hf_loss, hf_optimizer, dtype, device)
        if dtype != "fp32":
            steps_by_name["hf_fp32"] = training_step(maybe_compile(llama), hf_loss, hf_optimizer, "fp32", device)
    seconds: dict[str, list[float]] = {name: [] for name in steps_by_name}
    for step in steps_by_name.values():
        sample_seconds(step, warmup, device)
    for _ in range(steps):  # interleaved, so drift on a shared machine hits every model alike
        for name, step in steps_by_name.items():
            seconds[name] += sample_seconds(step, 1, device)
    peaks = {name: peak_bytes(step, device)[0] for name, step in steps_by_name.items()}
    peak_flops = matmul_peak_flops(dtype, device)
    tokens = batch_size * seq_len
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        **choice.to_dict(),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "steps": steps,
        "compile": compile,
        "peak_flops": peak_flops,
        "train_flops_per_token": flops_per_token,
    }
    for name, values in seconds.items():
        prefix = "" if name == "ours" else f"{name}_"
        timing = Timing.of(values, clock_resolution())
        result[f"{prefix}step_s_median"] = timing.median_s
        result[f"{prefix}step_s_p20_p80"] = [timing.p20_s, timing.p80_s]
        result[f"{prefix}step_stable"] = timing.stable
        result[f"{prefix}tokens_per_s"] = tokens / timing.median_s
        result[f"{prefix}mfu"] = tokens / timing.median_s * flops_per_token / peak_flops
        result[f"{prefix}peak_mb"] = peaks[name] / 2**20
    if "naive-loss" in compare:
        result["ratio_vs_naive_loss"] = result["tokens_per_s"] / result["naive_loss_tokens_per_s"]
    if "hf" in compare:
        result["ratio_vs_hf"] = result["tokens_per_s"] / result["hf_tokens_per_s"]
        if dtype != "fp32":
            result["ratio_vs_hf_fp32"] = result["tokens_per_s"] / result["hf_fp32_tokens_per_s"]
    return result
