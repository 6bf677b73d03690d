"""`minigrok bench train`: training throughput, MFU and peak memory of our model against its baselines, and of
DDP over N processes against one process on as many threads."""

from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..files import write_json
from ..machine import autocast, matmul_peak_flops, resolve_dtype
from ..model import CHECKPOINTING, MiniGrok
from .memory import peak_bytes, resident_peak_bytes
from .timing import Timing, clock_resolution, sample_seconds

# --compare names of our model run in another activation-checkpointing mode, and the mode each runs in
CHECKPOINTING_BASELINES = {f"checkpointing-{mode}": mode for mode in CHECKPOINTING}


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


def random_batch(vocab_size: int, batch_size: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """[batch_size, seq_len + 1] token ids from a fixed seed: inputs are [:, :-1], targets [:, 1:]."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=generator).to(device)


def interleaved_seconds(
    steps_by_name: dict[str, Callable[[], None]], steps: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds of `steps` calls of each step, taken in turns (A, B, A, B) so drift on a shared machine hits each alike."""
    seconds: dict[str, list[float]] = {name: [] for name in steps_by_name}
    for _ in range(steps):
        for name, step in steps_by_name.items():
            seconds[name] += sample_seconds(step, 1, device)
    return seconds


def throughput(seconds: list[float], tokens: int, flops_per_token: float, peak_flops: float, prefix: str) -> dict:
    """Median step time, its p20-p80 band and verdict, tokens/s and MFU of one step's timed calls, keys prefixed."""
    timing = Timing.of(seconds, clock_resolution())
    return {
        f"{prefix}step_s_median": timing.median_s,
        f"{prefix}step_s_p20_p80": [timing.p20_s, timing.p80_s],
        f"{prefix}step_stable": timing.stable,
        f"{prefix}tokens_per_s": tokens / timing.median_s,
        f"{prefix}mfu": tokens / timing.median_s * flops_per_token / peak_flops,
    }


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
    activation_checkpointing: str = "none",
) -> dict:
    """Training throughput (tokens/s), MFU and peak memory of a MiniGrok step on random tokens, timed interleaved
    in this process with each baseline named in `compare`:

    "hf": transformers' LlamaForCausalLM of the same shape, batch and dtype (and, when `dtype` is not fp32, also in
    fp32 as `hf_fp32_*`, the baseline of a mixed-precision win); "naive-loss": our model with full logits and
    F.cross_entropy instead of the chunked linear cross-entropy; "checkpointing-<mode>": our model with
    activation_checkpointing=<mode> (ours runs with `activation_checkpointing`), its peak memory and tokens/s also
    given as fractions of ours; "muon": our model stepped by the trainer's train.optimizer=muon (Muon for the blocks'
    matrices, AdamW for the rest), its step time as a multiple of ours (`muon_step_vs_ours`). All others use fused
    AdamW (the default of transformers' Trainer); `compile` wraps every
    model in torch.compile. `dtype="auto"` runs in the dtype the trainer would choose here, and the result gives
    the figures of every candidate. Peak memory (`peak_mb`: tensors allocated during the step and live at once; on
    CPU also `peak_rss_mb`, the rise of resident memory) is that of the last of `warmup` (at least 2) warm-up steps:
    the first also allocates the optimizer's moments. `*step_stable` is false where the step times spread too wide to
    trust (see `Timing.note`).
    """
    if activation_checkpointing not in CHECKPOINTING:
        raise ValueError(f"--activation-checkpointing {activation_checkpointing}: choose one of {CHECKPOINTING}")
    if f"checkpointing-{activation_checkpointing}" in compare:
        raise ValueError(
            f"--compare checkpointing-{activation_checkpointing} is what ours already runs "
            f"(--activation-checkpointing {activation_checkpointing}): compare with another mode"
        )
    device = torch.device(device)
    choice = resolve_dtype(dtype, config, batch_size * seq_len, device, training=True, field="--dtype")
    dtype = choice.dtype
    ids = random_batch(config.vocab_size, batch_size, seq_len, device)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    torch.manual_seed(0)
    ours = MiniGrok(config).to(device)
    flops_per_token = ours.report(context=seq_len).train_flops_per_token
    maybe_compile = torch.compile if compile else (lambda model: model)

    def checkpointed_loss(mode: str):
        def loss(m):
            ours.activation_checkpointing = mode  # the one model, run each time in the mode of the step calling it
            return m(inputs, targets=targets).loss

        return loss

    steps_by_name = {
        "ours": training_step(
            maybe_compile(ours),
            checkpointed_loss(activation_checkpointing),
            torch.optim.AdamW(ours.parameters(), fused=True),
            dtype,
            device,
        )
    }
    for name, mode in CHECKPOINTING_BASELINES.items():
        if name in compare:
            optimizer = torch.optim.AdamW(ours.parameters(), fused=True)
            steps_by_name[name.replace("-", "_")] = training_step(
                maybe_compile(ours), checkpointed_loss(mode), optimizer, dtype, device
            )
    if "naive-loss" in compare:
        naive_loss = lambda m: F.cross_entropy(m(inputs).logits.flatten(0, 1).float(), targets.flatten())  # noqa: E731
        steps_by_name["naive_loss"] = training_step(
            maybe_compile(ours), naive_loss, torch.optim.AdamW(ours.parameters(), fused=True), dtype, device
        )
    if "muon" in compare:
        from ..train.config import TrainConfig
        from ..train.optim import build_optimizer

        muon = build_optimizer(ours, TrainConfig(max_steps=1, optimizer="muon"))
        loss = checkpointed_loss(activation_checkpointing)
        steps_by_name["muon"] = training_step(maybe_compile(ours), loss, muon, dtype, device)
    if "hf" in compare:
        from ..hf import hf_config_dict, import_transformers

        transformers = import_transformers()

        hf_config = transformers.LlamaConfig(**hf_config_dict(config) | {"use_cache": False})
        llama = transformers.LlamaForCausalLM(hf_config).to(device)
        hf_loss = lambda m: m(input_ids=inputs, labels=ids[:, :-1]).loss  # noqa: E731
        hf_optimizer = torch.optim.AdamW(llama.parameters(), fused=True)
        steps_by_name["hf"] = training_step(maybe_compile(llama), hf_loss, hf_optimizer, dtype, device)
        if dtype != "fp32":
            steps_by_name["hf_fp32"] = training_step(maybe_compile(llama), hf_loss, hf_optimizer, "fp32", device)
    peaks, resident_peaks = {}, {}
    for name, step in steps_by_name.items():
        sample_seconds(step, max(1, warmup - 1), device)
        # the last warm-up step: its tensors counted one by one, and on CPU the rise of resident memory beside it
        resident, (peaks[name], _) = resident_peak_bytes(lambda step=step: peak_bytes(step, device))
        resident_peaks[name] = resident if device.type == "cpu" else None
    seconds = interleaved_seconds(steps_by_name, steps, device)
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
        "activation_checkpointing": activation_checkpointing,
        "peak_flops": peak_flops,
        "train_flops_per_token": flops_per_token,
    }
    for name, values in seconds.items():
        prefix = "" if name == "ours" else f"{name}_"
        result |= throughput(values, tokens, flops_per_token, peak_flops, prefix)
        result[f"{prefix}peak_mb"] = peaks[name] / 2**20
        if resident_peaks[name] is not None:
            result[f"{prefix}peak_rss_mb"] = resident_peaks[name] / 2**20
    for name in ("naive_loss", "hf", "hf_fp32"):
        if name in seconds:
            result[f"ratio_vs_{name}"] = result["tokens_per_s"] / result[f"{name}_tokens_per_s"]
    if "muon" in compare:
        result["muon_step_vs_ours"] = result["muon_step_s_median"] / result["step_s_median"]
    for name in CHECKPOINTING_BASELINES:
        if name in compare:
            key = name.replace("-", "_")
            result[f"{key}_peak_vs_ours"] = peaks[key] / peaks["ours"]
            result[f"{key}_tokens_per_s_vs_ours"] = result[f"{key}_tokens_per_s"] / result["tokens_per_s"]
    return result


def bench_processes(
    config,
    batch_size: int,
    seq_len: int,
    nproc: int,
    dtype: str = "auto",
    steps: int = 10,
    warmup: int = 2,
    activation_checkpointing: str = "none",
) -> dict:
    """Training tokens/s of DistributedDataParallel over `nproc` CPU processes (gloo) against one process with all
    of their threads, at the same global batch, model and dtype, timed interleaved in one run.

    The threads of this process (torch.get_num_threads(), set with --threads) are the budget both sides share:
    each of the nproc processes runs threads / nproc of them, the single process runs all of them. The processes
    are spawned here; rank 0 also times the single-process step, while the others wait, so the two never share the
    cores. Keys `ddp_*`, `threads_*` and `ratio_ddp_vs_threads` (above 1: scaling out pays on this machine).
    """
    threads = torch.get_num_threads()
    if nproc < 2:
        raise ValueError(f"--nproc {nproc}: compare at least 2 processes with one process")
    if threads % nproc:
        raise ValueError(
            f"--nproc {nproc} with {threads} thread(s): the processes split one process's threads evenly; "
            f"set --threads to a multiple of {nproc}"
        )
    if batch_size % nproc:
        raise ValueError(
            f"--batch-size {batch_size} is the global batch, split over --nproc {nproc}: use a multiple of {nproc}"
        )
    device = torch.device("cpu")
    choice = resolve_dtype(dtype, config, batch_size * seq_len, device, training=True, field="--dtype")
    peak_flops = matmul_peak_flops(choice.dtype, device)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "seconds.json"
        with socket.socket() as free:  # a port for the process group's rendezvous
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
        shape = (batch_size, seq_len, threads // nproc, steps, warmup)
        args = (nproc, port, config, shape, choice.dtype, activation_checkpointing, str(out))
        torch.multiprocessing.spawn(_process_worker, args, nprocs=nproc)
        seconds = json.loads(out.read_text())
    result = {
        "device": "cpu",
        "threads": threads,
        "nproc": nproc,
        "threads_per_process": threads // nproc,
        "torch": torch.__version__,
        **choice.to_dict(),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "steps": steps,
        "activation_checkpointing": activation_checkpointing,
        "peak_flops": peak_flops,
        "train_flops_per_token": seconds["flops_per_token"],
    }
    tokens = batch_size * seq_len
    for name in ("ddp", "threads"):
        result |= throughput(seconds[name], tokens, seconds["flops_per_token"], peak_flops, f"{name}_")
    result["ratio_ddp_vs_threads"] = result["ddp_tokens_per_s"] / result["threads_tokens_per_s"]
    return result


def _process_worker(rank: int, nproc: int, port: int, config, shape: tuple, dtype: str, checkpointing: str, out: str):
    """One rank of bench_processes: DDP steps on its rows of the batch; rank 0 also the whole batch alone."""
    import torch.distributed as dist

    from ..train.distributed import parallelize, process_group

    batch_size, seq_len, threads_per_process, steps, warmup = shape
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(nproc)}
    os.environ |= {"RANK": str(rank), "LOCAL_RANK": str(rank)}
    torch.set_num_threads(threads_per_process)
    device = torch.device("cpu")
    with process_group("cpu", timeout_s=3600) as world:
        ids = random_batch(config.vocab_size, batch_size, seq_len, device)
        rows = ids[world.rows(batch_size // nproc)]

        def model_step(model: MiniGrok, wrapped: torch.nn.Module, batch: torch.Tensor) -> Callable[[], None]:
            model.activation_checkpointing = checkpointing
            inputs, targets = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
            optimizer = torch.optim.AdamW(model.parameters(), fused=True)
            return training_step(wrapped, lambda m: m(inputs, targets=targets).loss, optimizer, dtype, device)

        torch.manual_seed(0)
        replica = MiniGrok(config)
        ddp_step = model_step(replica, parallelize(replica, "ddp", device), rows)
        if world.is_main:
            torch.manual_seed(0)
            alone = MiniGrok(config)
            alone_step = model_step(alone, alone, ids)

        def processes() -> None:
            ddp_step()
            dist.barrier()  # the step ends when the slowest rank's does

        def threads() -> None:
            if world.is_main:
                torch.set_num_threads(nproc * threads_per_process)
                alone_step()
                torch.set_num_threads(threads_per_process)
            dist.barrier()

        steps_by_name = {"ddp": processes, "threads": threads}
        for step in steps_by_name.values():
            sample_seconds(step, warmup, device)
        seconds = interleaved_seconds(steps_by_name, steps, device)
        if world.is_main:
            flops = replica.report(context=seq_len).train_flops_per_token
            write_json(out, seconds | {"flops_per_token": flops})
