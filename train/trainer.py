"""The training loop: accumulation, clipping, mixed precision, eval, logging, checkpoints, signals (the optimizer
and its schedule are in optim.py), in one process or in each of torchrun's (the glue is in distributed.py).

A run is reproducible to the bit: batches are a pure function of (seed, step), and a checkpoint holds everything
else that changes (weights, optimizer moments, RNG, step, tokens, elapsed time), so --resume continues exactly.
Under torchrun each process reads its own rows of the same global batch, so 2 processes x batch b train on what one
process at batch 2b trains on; only rank 0 writes the log, the checkpoints and the console.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from minigrok import tasks
from minigrok.checkpoint import CheckpointError
from minigrok.files import atomic_write
from minigrok.machine import autocast, matmul_peak_flops, resolve_dtype
from minigrok.model import MiniGrok

from . import checkpoint, distributed
from .config import TrainConfig
from .data import TokenFiles
from .distill import DistilledStudent, Teacher, check_teacher_tokenizer, check_teacher_vocab, teacher_model
from .distributed import ALONE, World, current_world
from .optim import build_optimizer, check_optimizer_state, describe_optimizer, set_hyperparameters, set_learning_rates
from .qat import add_fake_quantization
from .tokenizer import TOKENIZER_NAME, Tokenizer, check_vocab
from .tracking import Tracking, open_tracking

LOG_NAME = "log.jsonl"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


class TrainingStopped(Exception):
    """SIGINT or SIGTERM stopped the run after a checkpoint of the step it was in; `signum` says which."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def resolve_device(name: str, world: World = ALONE) -> torch.device:
    """train.device made concrete; under torchrun each process takes cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but no CUDA device is available: use train.device=cpu or auto")
    if name.startswith("cuda") and world.size > 1:
        if name != "cuda":
            raise ValueError(
                f"train.device={name!r} with {world.size} processes: each takes cuda:LOCAL_RANK; "
                "use train.device=cuda or auto"
            )
        return torch.device("cuda", world.local_rank)
    return torch.device(name)


@torch.no_grad()
def evaluate(
    model: MiniGrok,
    tokens: np.ndarray,
    config: TrainConfig,
    device: torch.device,
    bytes_per_token: float,
    dtype: str,
    world: World = ALONE,
) -> dict:
    """Mean loss and bits per byte over about eval_tokens of `tokens`, in windows spread evenly over all of it,
    with the matmuls in `dtype` (a resolved one: fp32, bf16 or fp16).

    Spreading (rather than taking a prefix) keeps the estimate unbiased when one file fills the start of the split;
    the windows are the same at every evaluation, so the curve compares like with like. Under torchrun each process
    scores its rows of every batch of world.size x batch_size windows, and the sums are added up across processes.
    """
    if len(tokens) < 2:
        raise ValueError(f"evaluation needs at least 2 tokens (one to predict from, one to predict); got {len(tokens)}")
    seq_len = min(config.seq_len, model.config.max_seq_len, len(tokens) - 1)
    available = (len(tokens) - 1) // seq_len  # non-overlapping windows that fit
    n_windows = max(1, min(available, config.eval_tokens // seq_len))
    window_starts = np.linspace(0, (available - 1) * seq_len, n_windows).astype(np.int64) // seq_len * seq_len
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    rows = world.rows(config.batch_size)
    for first in range(0, n_windows, world.size * config.batch_size):
        starts = window_starts[first : first + world.size * config.batch_size][rows]
        # Every process runs as many forwards as the others (FSDP gathers weights inside them): one whose rows ran
        # out scores a window that counts for nothing.
        weight = 1 if len(starts) else 0
        starts = starts if len(starts) else window_starts[:1]
        window = torch.from_numpy(np.stack([tokens[s : s + seq_len + 1].astype(np.int64) for s in starts])).to(device)
        with autocast(dtype, device):
            loss = model(window[:, :-1], targets=window[:, 1:]).loss
        total += weight * loss.item() * window[:, 1:].numel()
        count += weight * window[:, 1:].numel()
    model.train(was_training)
    if world.size > 1:
        total, count = distributed.gather([total, count], device).sum(dim=0).tolist()
    val_loss = total / count
    return {"val_loss": val_loss, "val_bpb": val_loss / math.log(2) / bytes_per_token, "val_tokens": int(count)}


def read_log(path: Path) -> list[tuple[str, dict]]:
    """(line, record) for every line of a log.jsonl. A torn last line (a write cut short by a kill or a full disk)
    is dropped, and said; any other unreadable line is an error naming the file and line."""
    lines = path.read_text(errors="replace").splitlines()
    entries = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with an integer step")
        except ValueError as error:
            if number == len(lines):
                print(f"{path}: dropped a torn last line (a write was cut short): {line[:60]!r}", file=sys.stderr)
                break
            raise CheckpointError(f"{path}:{number} is not a log record ({error}): fix or delete that line") from error
        entries.append((line, record))
    return entries


class Trainer:
    """Trains `model` on `data` into `run_dir`. state_dict() is everything a checkpoint holds; load_state_dict()
    of a saved one continues that run exactly (minigrok.train.run.resume_run opens a run directory that way).

    Under torchrun (a process group set up by distributed.process_group) every process builds its own Trainer and
    `parallel` (train.parallel resolved) says how they share the work: ddp replicates the model, fsdp shards it."""

    def __init__(
        self,
        model: MiniGrok,
        config: TrainConfig,
        data: TokenFiles,
        tokenizer: Tokenizer,
        run_dir: str | Path,
        progress: bool = True,
        teacher: Teacher | None = None,
    ):
        check_vocab(tokenizer, model.config.vocab_size)
        if config.seq_len > model.config.max_seq_len:
            raise ValueError(
                f"train.seq_len={config.seq_len} exceeds model.max_seq_len={model.config.max_seq_len}: "
                "lower train.seq_len or raise model.max_seq_len"
            )
        self.world = current_world()
        self.parallel = distributed.resolve_parallel(config.parallel, self.world.size)
        config.world_size = self.world.size  # the global batch, token counts and budgets count every process
        self.config, self.data, self.tokenizer = config, data, tokenizer
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(config.device, self.world)
        self.model = model.to(self.device)
        self.model.activation_checkpointing = config.activation_checkpointing
        if config.qat != "none" and self.parallel == "fsdp":
            raise ValueError(f"train.qat={config.qat} does not go with train.parallel=fsdp: use ddp or none")
        self.fake_quantizer = add_fake_quantization(self.model, config)  # None without QAT
        self._choose_dtype(recorded=None)
        torch.manual_seed(config.seed)
        self.teacher = teacher
        trained = self.model if teacher is None else self._with_teacher(teacher)
        self.wrapped = distributed.parallelize(trained, self.parallel, self.device)  # fsdp: the model itself
        self.optimizer = build_optimizer(self.model, config)
        self.forward = torch.compile(self.wrapped) if config.compile else self.wrapped
        # Every process draws the global batch and reads its own rows of it.
        self.sampler = data.sampler("train", self.world.size * config.batch_size, config.seq_len, config.seed)
        self.rows = self.world.rows(config.batch_size)
        self.val_tokens = data.tokens("val")
        self.eval_tasks = tasks.load_tasks(config.eval_tasks or [])  # a bad task file fails here, at the start
        self.progress = progress and self.world.is_main
        self.step, self.tokens_seen, self.elapsed_before = 0, 0, 0.0
        self.start_time: float | None = None  # set while train() runs
        self.best_val: float | None = None
        self.last_task_step: int | None = None
        self.best_step: int | None = None
        self.changes: list[str] = []  # what a resume changed (config fields, data): logged when training starts
        self.flops_per_token = self.model.report(context=config.seq_len).train_flops_per_token
        self.tracking = Tracking()  # the train.log_to writers, open while train() runs

    def _with_teacher(self, teacher: Teacher) -> DistilledStudent:
        """The student and its teacher (on this device, in train.distill_teacher_dtype) as the one module trained."""
        if self.parallel == "fsdp":
            raise ValueError(
                "--teacher does not go with train.parallel=fsdp (the teacher is replicated, not sharded): "
                "use train.parallel=ddp, or train without --teacher"
            )
        check_teacher_vocab(teacher, self.model.config.vocab_size)
        check_teacher_tokenizer(teacher, self.tokenizer, self.run_dir / TOKENIZER_NAME)
        model = teacher_model(teacher, self.device, self.config.distill_teacher_dtype)
        return DistilledStudent(self.model, model, self.config)

    def _choose_dtype(self, recorded: str | None) -> None:
        """Resolve train.dtype ("auto" measures this machine in under a second; a resumed run keeps `recorded`).
        Under torchrun rank 0 measures and every process takes its choice."""
        self.dtype_choice = distributed.from_main(
            lambda: resolve_dtype(
                self.config.dtype,
                self.model.config,
                rows=self.config.batch_size * self.config.seq_len,
                device=self.device,
                training=True,
                recorded=recorded,
                field="train.dtype",
            )
        )
        self.dtype = self.dtype_choice.dtype
        if self.dtype == "fp16" and self.parallel == "fsdp":  # loss scaling would need every shard's inf check
            raise ValueError("train.dtype=fp16 does not go with train.parallel=fsdp: set train.dtype=bf16 or fp32")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == "fp16")

    # -- state: what a checkpoint holds -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Weights, optimizer, RNG, loss scaler, progress counters, the configs, the dtype and the world size of the
        run (rank 0's RNG: nothing in training draws from it). Under fsdp the weights and moments are this rank's
        shards, which save_checkpoint hands to torch.distributed.checkpoint."""
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng |= {f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())}
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed": self.elapsed(),
            "best_val": self.best_val,
            "best_step": self.best_step,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "model_config": self.model.config.to_dict(),
            "train_config": self.config.to_dict(),
            "tokenizer_fingerprint": self.tokenizer.fingerprint(),
            "dtype": self.dtype,
            "world_size": self.world.size,
            "parallel": self.parallel,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the run `state` (a state_dict(), e.g. from checkpoint.load_checkpoint) comes from, checked first.

        This trainer's config stays in force: a field changed since the checkpoint applies from here on."""
        source = state.get("path", "the checkpoint")
        if state["model_config"] != self.model.config.to_dict():
            raise ValueError(f"--resume: {source} was trained with another model config; resume with the same config")
        if state["tokenizer_fingerprint"] != self.tokenizer.fingerprint():
            raise CheckpointError(
                f"{source}: the run was trained with tokenizer {state['tokenizer_fingerprint'][:12]}, but this one is "
                f"{self.tokenizer.fingerprint()[:12]}: the tokenizer.json was swapped or damaged; restore it"
            )
        sharded = state["model"] is None
        if sharded != (self.parallel == "fsdp"):
            raise ValueError(
                f"--resume: {source} was saved by a {'sharded (fsdp)' if sharded else 'ddp or single-process'} run; "
                f"continue it with train.parallel={'fsdp under torchrun' if sharded else 'ddp, none or auto'}"
            )
        if sharded:
            distributed.load_sharded(Path(source), self.model, self.optimizer)
        else:
            check_optimizer_state(state["optimizer"], self.optimizer, self.model, source)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        set_hyperparameters(self.optimizer, self.config)
        torch.set_rng_state(state["rng"]["torch"])
        cuda_states = [state["rng"][k] for k in sorted(k for k in state["rng"] if k.startswith("cuda."))]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
        self._choose_dtype(recorded=state.get("dtype"))
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.tokens_seen, self.elapsed_before = state["step"], state["tokens_seen"], state["elapsed"]
        self.best_val, self.best_step = state["best_val"], state["best_step"]
        if (saved_world := state.get("world_size", 1)) != self.world.size:
            self.changes.append(
                f"world size {saved_world} -> {self.world.size}: each step's batch is drawn differently from here "
                "(not bit for bit)"
            )
        if self.world.is_main:
            self._truncate_log()

    def _truncate_log(self) -> None:
        """Drop log lines written after the checkpoint we resume from (the killed run went past it)."""
        log = self.run_dir / LOG_NAME
        if log.is_file():
            kept = [line for line, record in read_log(log) if record["step"] <= self.step]
            atomic_write(log, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))

    def save_checkpoint(self) -> Path:
        """ckpt-<step>: written by rank 0 alone (ddp: every rank holds the same weights), or by every rank its own
        shards (fsdp); the others wait for it."""
        if self.parallel == "fsdp":
            path = distributed.save_sharded(
                self.run_dir, self.step, self.state_dict(), self.tokenizer, self.model, self.optimizer
            )
        elif self.world.is_main:
            path = checkpoint.save_checkpoint(self.run_dir, self.step, self.state_dict(), self.tokenizer)
        else:
            path = self.run_dir / f"ckpt-{self.step}"
        if self.world.is_main:
            checkpoint.prune(self.run_dir, self.config.keep_last, self.best_step)
        distributed.wait_for_main()
        return path

    def plain_model(self) -> MiniGrok | None:
        """The trained model as a plain MiniGrok on rank 0 (fsdp gathers its shards: every process calls this),
        None on the other ranks."""
        if self.parallel == "fsdp":
            return distributed.gathered_model(self.model)
        return self.model if self.world.is_main else None

    # -- the loop -----------------------------------------------------------------------------------------------

    def elapsed(self) -> float:
        """Seconds of training in this run, over every stretch of it."""
        running = 0.0 if self.start_time is None else time.perf_counter() - self.start_time
        return self.elapsed_before + running

    def budget_progress(self) -> float:
        """Fraction of the budget spent: by steps/tokens when they bound the run, else by wall time."""
        fractions = []
        if self.config.total_steps is not None:
            fractions.append(self.step / self.config.total_steps)
        if self.config.max_minutes is not None:
            fractions.append(self.elapsed() / (60 * self.config.max_minutes))
        return max(fractions)

    def log(self, record: dict[str, Any]) -> None:
        if self.world.is_main:
            with open(self.run_dir / LOG_NAME, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.tracking.write(record)

    def open_tracking(self) -> Tracking:
        """The TensorBoard / wandb writers train.log_to asks for, from this step on (the one place they are made;
        on rank 0 only)."""
        if not self.world.is_main:
            return Tracking()
        run_config = {"model": self.model.config.to_dict(), "train": self.config.to_dict()}
        return open_tracking(self.config.log_to, self.run_dir, self.step, run_config)

    def _gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Gradients are reduced across processes on the last micro-step of a step only."""
        if self.parallel == "fsdp":
            self.model.set_requires_gradient_sync(sync)
        if self.parallel == "ddp" and not sync:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def _weighted_router_losses(self, parts: torch.Tensor) -> torch.Tensor | float:
        """The MoE router losses of the forward just run, weighted by train.moe_aux_loss_weight and moe_z_loss_weight
        (0 for a dense model); adds them unweighted, per micro-batch, to `parts` for the log."""
        router = self.model.router_losses()
        if router is None:
            return 0.0
        parts += torch.stack(router).detach().float() / self.config.grad_accum
        return self.config.moe_aux_loss_weight * router[0] + self.config.moe_z_loss_weight * router[1]

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over grad_accum micro-batches; returns (loss, grad norm), both of the global batch.

        Under torchrun the processes also agree here on whether a signal asked to stop (self.stop_requested), so
        they all stop after the same step."""
        config = self.config
        set_learning_rates(self.optimizer, config, self.step, self.budget_progress())
        total_loss = torch.zeros((), device=self.device)
        if self.fake_quantizer is not None:
            self.fake_quantizer.enabled = self.step >= config.qat_start_step
        distill_parts = torch.zeros(2, device=self.device)  # with a teacher: the batch's KL and CE
        moe_parts = torch.zeros(2, device=self.device)  # with experts: the batch's load-balancing and z losses
        for micro in range(config.grad_accum):
            batch = self.sampler.batch(self.step, micro, self.rows)
            inputs, targets = (t.to(self.device, non_blocking=True) for t in batch)
            with self._gradient_sync(micro == config.grad_accum - 1):
                with autocast(self.dtype, self.device):
                    output = self.forward(inputs, targets=targets)
                    loss = output.loss / config.grad_accum
                    trained = loss + self._weighted_router_losses(moe_parts) / config.grad_accum
                self.scaler.scale(trained).backward()
            total_loss += loss.detach().float()
            if self.teacher is not None:
                distill_parts += torch.stack([output.kl, output.ce]).float() / config.grad_accum
        if self.world.size == 1:
            loss_value, self.stop_requested = total_loss.item(), self.stop_signal
            self.distill_parts = distill_parts.tolist() if self.teacher is not None else None
            self.moe_parts = moe_parts.tolist()
        else:  # the mean of the processes' losses is the global batch's; a signal to any of them stops them all
            local = [total_loss.item(), self.stop_signal or 0, *distill_parts.tolist(), *moe_parts.tolist()]
            gathered = distributed.gather(local, self.device)
            loss_value, self.stop_requested = gathered[:, 0].mean().item(), int(gathered[:, 1].max()) or None
            self.distill_parts = gathered[:, 2:4].mean(dim=0).tolist()
            self.moe_parts = gathered[:, 4:].mean(dim=0).tolist()
            if self.stop_requested is not None:  # not when a process died: the gather failed first
                self._announce_stop(self.stop_requested)
        if not math.isfinite(loss_value):
            found = checkpoint.checkpoint_dirs(self.run_dir)
            last = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written yet"
            # On CUDA an out-of-range target makes its row NaN rather than stop the step: tell the two apart here.
            vocab_size = self.model.config.vocab_size
            largest = max(int(self.sampler.batch(self.step, m)[1].max()) for m in range(config.grad_accum))  # all rows
            if largest >= vocab_size:
                raise TrainingDiverged(
                    f"step {self.step} reads token id {largest}, outside the model's vocabulary of {vocab_size}: "
                    f"{self.sampler.path} is corrupt or from another tokenizer; delete the run's data/ to re-encode it"
                )
            raise TrainingDiverged(
                f"loss is {loss_value} at step {self.step}: training diverged; {last}. "
                "Lower train.lr, raise train.warmup_steps or use train.dtype=fp32"
            )
        self.scaler.unscale_(self.optimizer)
        max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
        grad_norm = distributed.clip_gradients(self.model.parameters(), max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += config.tokens_per_step
        return loss_value, grad_norm

    def done(self) -> bool:
        return self.config.budget_spent(self.step, self.elapsed())

    def run_eval(self) -> dict:
        metrics = evaluate(
            self.model,
            self.val_tokens,
            self.config,
            self.device,
            self.data.bytes_per_token("val"),
            self.dtype,
            self.world,
        )
        if self.best_val is None or metrics["val_loss"] < self.best_val:
            self.best_val, self.best_step = metrics["val_loss"], self.step
        record = {"step": self.step, "tokens": self.tokens_seen, "time": self.elapsed()} | metrics
        self.log(record)
        return record

    def run_task_eval(self, write=print) -> None:
        """Score train.eval_tasks on rank 0 (fsdp gathers the model; the other ranks wait) and log them as
        {"tasks": {name: metrics}}."""
        model = self.plain_model()
        if model is not None:
            was_training = model.training
            model.eval()
            with autocast(self.dtype, self.device):
                results = tasks.evaluate_tasks(model, self.tokenizer, self.eval_tasks)
            model.train(was_training)
            self.log({"step": self.step, "tokens": self.tokens_seen, "time": self.elapsed(), "tasks": results})
            write(f"step {self.step}: {tasks.summary(results)}")
        distributed.wait_for_main()
        self.last_task_step = self.step

    def log_segment(self) -> float:
        """Log (file and console) how this stretch of the run trains: the dtype with its figures, the matmul peak
        behind MFU (of all processes together), the processes and the global batch, and what a resume changed.
        Returns the peak."""
        config = self.config
        peak = config.peak_flops or distributed.from_main(lambda: matmul_peak_flops(self.dtype, self.device))
        source = "train.peak_flops" if config.peak_flops else "measured"
        print(self.dtype_choice.summary())
        print(f"matmul peak ({self.dtype}): {peak / 1e9:,.1f} GFLOP/s, {source}")
        optimizer = describe_optimizer(self.optimizer, config)
        print(f"optimizer: {optimizer}")
        if self.world.size > 1:
            print(
                f"parallel: {self.parallel} over {self.world.size} processes; global batch {self.world.size} x "
                f"{config.batch_size} x {config.grad_accum} = {config.global_batch} sequences of {config.seq_len} tokens"
            )
        for change in self.changes:
            print(f"resumed at step {self.step} with a change: {change}")
        record = {"step": self.step, "tokens": self.tokens_seen, "time": self.elapsed()} | self.dtype_choice.to_dict()
        world = {"world_size": self.world.size, "parallel": self.parallel, "global_batch": config.global_batch}
        record |= {"peak_flops": peak, "peak_source": source, "optimizer": config.optimizer} | world
        self.log(record | {"optimizer_summary": optimizer, "changes": self.changes})
        return peak * self.world.size

    def _announce_stop(self, signum: int) -> None:
        """On rank 0: which signal stops the run, and after which step."""
        if self.world.is_main:
            name = signal.Signals(signum).name
            print(
                f"\n{name}: finishing step {self.step + 1}, then a checkpoint; again to stop at once", file=sys.stderr
            )

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """While training, the first SIGINT (Ctrl-C) or SIGTERM asks the loop to stop after the current step and a
        checkpoint; a second one stops at once (KeyboardInterrupt)."""
        self.stop_signal: int | None = None  # the signal this process received
        self.stop_requested: int | None = None  # the one the processes agreed to stop on (train_step)
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return

        def request_stop(signum, frame) -> None:
            if self.stop_signal is not None:
                raise KeyboardInterrupt
            self.stop_signal = signum
            if self.world.size == 1:  # several processes say it once they agree to stop (train_step)
                self._announce_stop(signum)

        previous = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def train(self) -> dict:
        """Run until the budget is spent; evaluate and checkpoint at the end. Returns the final eval record.

        SIGINT / SIGTERM end it early with a checkpoint of the step reached (TrainingStopped)."""
        with self._stop_on_signals(), contextlib.closing(self.open_tracking()) as self.tracking:
            return self._train()

    def _train(self) -> dict:
        config = self.config
        self.start_time = time.perf_counter()
        peak = self.log_segment()
        self.model.train()
        window_start, window_tokens = time.perf_counter(), 0
        last_eval = None
        with tqdm(
            total=config.total_steps, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True
        ) as bar:  # closed on any exit, so an error starts on its own line
            while not self.done():
                loss, grad_norm = self.train_step()
                window_tokens += config.tokens_per_step
                bar.update(1)
                if self.step % config.log_every == 0:
                    tokens_per_s = window_tokens / (time.perf_counter() - window_start)
                    record = {
                        "step": self.step,
                        "tokens": self.tokens_seen,
                        "time": self.elapsed(),
                        "loss": loss,
                        "lr": self.optimizer.param_groups[0]["lr"],  # AdamW's (Muon's groups come last)
                        "grad_norm": grad_norm,
                        "tokens_per_s": tokens_per_s,
                        "mfu": tokens_per_s * self.flops_per_token / peak,
                    }
                    if config.optimizer == "muon":
                        record["muon_lr"] = self.optimizer.param_groups[-1]["lr"]
                    if self.teacher is not None:  # the loss's two parts, each a mean over the batch's tokens
                        record["distill_kl"], record["ce"] = self.distill_parts
                    if self.model.config.n_experts:  # unweighted, each a mean over the MoE layers run
                        record["moe_aux_loss"], record["moe_z_loss"] = self.moe_parts
                    if len(self.sampler.names) > 1:  # a mixture: the tokens each source gave since the last line
                        steps = range(self.step - config.log_every, self.step)
                        record["source_tokens"] = self.sampler.source_tokens(steps, config.grad_accum)
                    self.log(record)
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                    window_start, window_tokens = time.perf_counter(), 0
                if self.step % config.eval_every == 0:
                    last_eval = self.run_eval()
                    if self.world.is_main:
                        bar.write(
                            f"step {self.step}: val loss {last_eval['val_loss']:.4f}, {last_eval['val_bpb']:.4f} bits/byte"
                        )
                if self.eval_tasks and config.eval_tasks_every and self.step % config.eval_tasks_every == 0:
                    self.run_task_eval(bar.write)
                if self.step % config.ckpt_every == 0 or self.stop_requested is not None:
                    path = self.save_checkpoint()
                if self.stop_requested is not None:
                    raise TrainingStopped(
                        self.stop_requested,
                        f"stopped by {signal.Signals(self.stop_requested).name} at step {self.step}, saved in {path}; "
                        f"continue with: minigrok train --out {self.run_dir} --resume"
                        if self.world.is_main
                        else "",
                    )
        if last_eval is None or last_eval["step"] != self.step:
            last_eval = self.run_eval()
        if self.eval_tasks and self.last_task_step != self.step:
            self.run_task_eval()
        if self.step % config.ckpt_every:  # otherwise the loop has just saved this step
            self.save_checkpoint()
        self.elapsed_before, self.start_time = self.elapsed(), None
        return last_eval
