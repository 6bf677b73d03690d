"""Training in several processes under torchrun: the process group, the model wrapped for DDP or sharded by FSDP2,
what the processes agree on (rank 0's choices, the loss, a stop), and FSDP's sharded checkpoints.

Everything goes through torch.distributed itself. A process started without torchrun is rank 0 of a world of 1, and
then nothing here communicates.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from minigrok.checkpoint import (
    SHARDS_NAME,
    CheckpointError,
    check_files,
    read_config,
    read_manifest,
    save_weights,
    write_manifest,
)
from minigrok.model import MiniGrok

from . import checkpoint

T = TypeVar("T")
PATIENT_TIMEOUT = timedelta(days=1)  # waits on rank 0's own work (encoding a corpus, writing a checkpoint)


class RankLost(ConnectionError):
    """Another process of the run died or stopped answering, so this one stops too."""


@dataclass(frozen=True)
class World:
    """This process's place among the processes training together; rank 0 of 1 when it runs alone."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run's files and the console."""
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This process's rows of a global batch of size x batch_size."""
        return slice(self.rank * batch_size, (self.rank + 1) * batch_size)


ALONE = World()  # a process started without torchrun


def current_world() -> World:
    if not dist.is_initialized():
        return ALONE
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


_patient_group: dist.ProcessGroup | None = None  # gloo, without the short timeout: see PATIENT_TIMEOUT


@contextlib.contextmanager
def process_group(device: str, timeout_s: float) -> Iterator[World]:
    """Join torchrun's processes for the duration (nothing to join without torchrun): nccl with device
    cuda:LOCAL_RANK when training on CUDA, else gloo. A collective that waits `timeout_s` for a process that died or
    hung fails, and this process stops with a RankLost saying so. Ranks other than 0 print nothing on stdout."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        yield ALONE
        return
    if missing := [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]:
        raise ValueError(
            f"WORLD_SIZE={size} but {', '.join(missing)} unset: launch with "
            f"torchrun --nproc_per_node={size} -m minigrok.cli train ..."
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPU(s): "
                "lower torchrun's --nproc_per_node to the number of GPUs"
            )
        torch.cuda.set_device(local_rank)
    global _patient_group
    timeout = timedelta(seconds=timeout_s)
    store, rank, size = next(dist.rendezvous("env://", timeout=timeout))
    # A group that torchrun restarts meets in the same store: its own prefix keeps it from the old group's addresses.
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        store=dist.PrefixStore(f"restart-{restart}/", store),
        rank=rank,
        world_size=size,
        timeout=timeout,
        device_id=torch.device("cuda", local_rank) if cuda else None,
    )
    _patient_group = dist.new_group(backend="gloo", timeout=PATIENT_TIMEOUT)
    world = current_world()
    quiet = None if world.is_main else open(os.devnull, "w")
    try:
        with contextlib.redirect_stdout(quiet) if quiet else contextlib.nullcontext():
            yield world
    except RuntimeError as error:
        if not (isinstance(error, dist.DistError) or any(word in str(error) for word in ("gloo", "NCCL"))):
            raise
        if threading.current_thread() is threading.main_thread():  # torchrun's SIGTERM must not cut the message
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise RankLost(
            f"rank {world.rank} of {world.size}: another process of this run died or stopped answering "
            f"({_gist(error)}), so this one stops too (train.dist_timeout_s={timeout_s:g}). Continue from the newest "
            "checkpoint with the same command and --resume (torchrun --max-restarts=N resumes by itself)"
        ) from error
    finally:
        _patient_group = None
        dist.destroy_process_group()
        if quiet:
            quiet.close()


def _gist(error: BaseException) -> str:
    """A gloo or NCCL error's first sentence without its source location ("[.../pair.cc:537] Read error ...")."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip()).split(". ")[0]
    return text[:200] or type(error).__name__


def main_first(work: Callable[[], T]) -> T:
    """work() on rank 0, then, once it succeeded, on every other rank: rank 0 writes what the processes share (the
    tokenizer, the token files, run.json) and the others find it written. A failure on rank 0 stops them all."""
    world = current_world()
    if world.size == 1:
        return work()
    failure: list[str | None] = [None]
    if world.is_main:
        try:
            result = work()
        except BaseException as error:
            dist.broadcast_object_list([f"{type(error).__name__}: {error}"], src=0, group=_patient_group)
            raise
    dist.broadcast_object_list(failure, src=0, group=_patient_group)
    if failure[0] is not None:
        raise ValueError(f"rank 0 could not open the run ({failure[0]}); rank {world.rank} stops with it")
    return result if world.is_main else work()


def from_main(work: Callable[[], T]) -> T:
    """work() on rank 0 alone, its result handed to every process: a choice all of them must share (the dtype,
    timed once rather than by every process at the same time on the same cores)."""
    if current_world().size == 1:
        return work()
    box = [work() if current_world().is_main else None]
    dist.broadcast_object_list(box, src=0, group=_patient_group)
    return box[0]


def wait_for_main() -> None:
    """Every other process waits here for rank 0 (after writing a checkpoint alone), as long as it takes; rank 0 goes
    on at once, so a process that died or hung meanwhile fails rank 0's next collective within its timeout."""
    if current_world().size > 1:
        dist.broadcast(torch.zeros(1), src=0, group=_patient_group)


def resolve_parallel(requested: str, world_size: int) -> str:
    """train.parallel for this launch: auto is ddp under torchrun and none alone; a contradiction is an error."""
    if requested == "auto":
        return "ddp" if world_size > 1 else "none"
    if requested != "none" and world_size == 1:
        raise ValueError(
            f"train.parallel={requested} needs several processes: launch with "
            "torchrun --nproc_per_node=N -m minigrok.cli train ..., or set train.parallel=auto"
        )
    if requested == "none" and world_size > 1:
        raise ValueError(
            f"train.parallel=none with {world_size} processes would train {world_size} copies into one run: "
            "set train.parallel=ddp, fsdp or auto"
        )
    return requested


def parallelize(model: MiniGrok, parallel: str, device: torch.device) -> torch.nn.Module:
    """The module the training step calls: `model` itself, a DistributedDataParallel around it, or (fsdp) `model`
    sharded in place by FSDP2: each physical block first (a block run at several depths is one module, sharded
    once), then the model, whose embedding stays the one parameter the tied head reads."""
    if parallel == "ddp":
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (current_world().size,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def gather(values: list[float], device: torch.device) -> torch.Tensor:
    """Every process's `values`, [world size, len(values)] in float64, on every process."""
    local = torch.tensor(values, dtype=torch.float64, device=device)
    if current_world().size == 1:
        return local[None]
    parts = [torch.empty_like(local) for _ in range(current_world().size)]
    dist.all_gather(parts, local)
    return torch.stack(parts).cpu()


def clip_gradients(parameters: Iterable[torch.Tensor], max_norm: float) -> float:
    """torch's clip_grad_norm_ in its two halves, so the norm of FSDP's sharded gradients (a DTensor) is the norm of
    the whole gradient, every shard counted, before it scales them; returns that norm."""
    from torch.distributed.tensor import DTensor

    parameters = list(parameters)
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm.item()


# -- FSDP's sharded checkpoints (torch.distributed.checkpoint takes a second to import: only FSDP runs load it) ---


def _sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict, dict[str, Any]]:
    """(model state, optimizer state, both as one flat dict of this rank's shards) by parameter name."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    tensors = {f"model.{name}": tensor for name, tensor in model_state.items()}
    for name, moments in optimizer_state["state"].items():
        tensors |= {f"optimizer.{name}.{key}": value for key, value in moments.items()}
    return model_state, optimizer_state, tensors


def save_sharded(run_dir: Path, step: int, state: dict[str, Any], tokenizer, model: torch.nn.Module, optimizer) -> Path:
    """RUN/ckpt-<step>/ of an FSDP run: every rank writes its shards of the weights and optimizer moments into the
    staging directory (torch.distributed.checkpoint, as safetensors under shards/), then rank 0 adds the rest of
    `state` and the manifest, last, and renames it into place."""
    import torch.distributed.checkpoint as dcp

    if current_world().is_main:
        checkpoint.clear_leftovers(run_dir)
    wait_for_main()
    staging = checkpoint.staging_dir(run_dir, step)
    _, _, tensors = _sharded_state(model, optimizer)
    dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(staging / SHARDS_NAME), save_distributed=True))
    path = run_dir / f"ckpt-{step}"
    if current_world().is_main:
        sharded = state | {
            "model": None,
            "optimizer": {"state": None, "param_groups": state["optimizer"]["param_groups"]},
        }
        path = checkpoint.save_checkpoint(run_dir, step, sharded, tokenizer, staged=True)
    wait_for_main()
    return path


def load_sharded(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load an FSDP checkpoint's shards into `model` and `optimizer`, sharded as they are now (over any number of
    processes: torch.distributed.checkpoint reads each rank's part from whichever files hold it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model_state, optimizer_state, tensors = _sharded_state(model, optimizer)
    try:
        dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(ckpt / SHARDS_NAME)))
    except Exception as error:
        raise CheckpointError(f"{ckpt / SHARDS_NAME} does not fit this model and optimizer ({error})") from error
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)


def gathered_model(model: MiniGrok) -> MiniGrok | None:
    """The whole of an FSDP-sharded model as a plain one on rank 0 (every process must call this), None elsewhere."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not current_world().is_main:
        return None
    plain = MiniGrok(model.config)
    plain.load_state_dict(state)
    return plain


def consolidate(ckpt: Path, verify: bool = True) -> Path:
    """Write the weights of a sharded (FSDP) checkpoint as its model.safetensors, in one process, and list it in the
    manifest, so generate, eval and export-hf read the checkpoint like any other. Returns the file written."""
    import torch.distributed.checkpoint as dcp

    manifest = read_manifest(ckpt)
    if not (ckpt / SHARDS_NAME).is_dir() or manifest is None:
        raise CheckpointError(f"{ckpt} is not a sharded (FSDP) checkpoint with a manifest: nothing to consolidate")
    check_files(ckpt, manifest, hashes=verify)
    config = read_config(ckpt)
    model = MiniGrok(config)
    tensors = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}
    dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(ckpt / SHARDS_NAME)), no_dist=True)
    save_weights(ckpt, manifest["config"], model.state_dict())
    write_manifest(ckpt, manifest["config"])
    return ckpt / "model.safetensors"
