"""Every Triton kernel compiled ahead of time for sm_80 and sm_90, no GPU needed: fits, native half MMA, no spills.

The model runs on CPU tensors with each kernel launch recorded instead of run; every recorded launch is then compiled
to a cubin, once per autotune config the autotuner may pick on that GPU, with the ptxas that ships in the triton
wheel. Kernel files are found by listing minigrok.kernels, so a new one is covered as soon as the model calls it.
All of it runs in a fresh process: triton decides at import whether it interprets, and the tests here run
with the interpreter on.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import math
import multiprocessing
import os
import pkgutil
import re
import tempfile
import types
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch

triton = pytest.importorskip("triton")
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner, Heuristics  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

import minigrok.kernels  # noqa: E402
from minigrok import MiniGrok, ModelConfig, functional  # noqa: E402
from minigrok.model import KVCache  # noqa: E402
from minigrok.quantize import quantize_model  # noqa: E402


def _ptxas_missing() -> str | None:
    try:
        path = knobs.nvidia.ptxas.path  # resolved lazily; raises when the wheel ships no usable binary
    except Exception as error:
        return f"no usable ptxas in this triton install ({error}): reinstall the triton wheel to compile for GPUs"
    return None if os.access(path, os.X_OK) else f"{path} is not an executable ptxas: reinstall the triton wheel"


pytestmark = pytest.mark.skipif(_ptxas_missing() is not None, reason=str(_ptxas_missing()))

# torch.cuda.get_device_properties(...).shared_memory_per_block_optin on A100 (sm_80) and H100 (sm_90).
ARCHS = {80: 166912, 90: 232448}


# -- the kernels and the model's launches of them --------------------------------------------------------------


def kernel_modules() -> dict[str, ModuleType]:
    """Every op module of minigrok.kernels, by short name."""
    ops = [info.name for info in pkgutil.iter_modules(minigrok.kernels.__path__) if not info.name.startswith("_")]
    return {name: importlib.import_module(f"minigrok.kernels.{name}") for name in ops}


def jit_of(kernel) -> JITFunction:
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def launchable_kernels(module: ModuleType) -> dict[str, object]:
    """The module's own @triton.jit kernels (autotuned or not) that no other kernel of the module calls."""
    kernels = {
        name: obj
        for name, obj in vars(module).items()
        if isinstance(obj, JITFunction | Autotuner | Heuristics) and jit_of(obj).fn.__module__ == module.__name__
    }
    sources = {name: jit_of(obj).src for name, obj in kernels.items()}
    return {
        name: obj
        for name, obj in kernels.items()
        if not any(re.search(rf"\b{name}\(", src) for other, src in sources.items() if other != name)
    }


@dataclass
class Launch:
    module: str
    name: str
    kernel: object  # JITFunction, Autotuner or Heuristics
    args: tuple
    kwargs: dict
    head_dim: int = 0


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    def __init__(self, record):
        self._record = record

    def __getitem__(self, grid):
        return self._record


@contextlib.contextmanager
def recording(modules: dict[str, ModuleType]):
    """Record, not run, each kernel launch; yields the record."""
    launches: list[Launch] = []
    with pytest.MonkeyPatch.context() as patch:
        # The dispatch lets CPU tensors through to the kernels only when it believes it interprets.
        patch.setattr(importlib.import_module("minigrok.kernels._common"), "INTERPRET", True)
        for short, module in modules.items():
            for name, kernel in launchable_kernels(module).items():

                def record(*args, _where=(short, name, kernel), **kwargs):
                    launches.append(Launch(*_where, args, kwargs))

                patch.setattr(module, name, _Recorder(record))
        yield launches


def drive_model(dtype: torch.dtype, head_dim: int, seq_len: int) -> None:
    """A training step and a distillation loss (the model its own teacher), with soft-capped logits and then without,
    then a prefill and a one-token decode against a KV cache, of a 4:2 GQA model on the kernels; then the same prefill
    and decode quantised to int4 and int8 (capped and int4 first: where only the first launch of a kernel is compiled,
    the one with more to do)."""
    overrides = {"dim": 4 * head_dim, "n_heads": 4, "n_kv_heads": 2, "head_dim": head_dim, "n_layers": 1}
    overrides |= {"n_unique_layers": None, "max_seq_len": seq_len + 2}
    config = ModelConfig.from_dict(ModelConfig.from_yaml("tiny").to_dict() | overrides | {"backend": "triton"})
    ids = torch.randint(0, config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(0))
    for softcap in (30.0, None):
        model = MiniGrok(ModelConfig.from_dict(config.to_dict() | {"logit_softcap": softcap})).to(dtype)
        model(ids, targets=ids.roll(-1, dims=1)).loss.backward()
        hidden = model.hidden_states(ids).flatten(0, 1)
        distillation = functional.linear_distillation_loss(
            hidden,
            model.head_weight,
            hidden.detach(),
            model.head_weight.detach(),
            ids.flatten(),
            student_softcap=softcap,
            teacher_softcap=softcap,
            backend="triton",
        )
        distillation.loss.backward()
    quantized = [quantize_model(MiniGrok(config).to(dtype), bits, group) for bits, group in ((4, 32), (8, None))]
    for decoder in (model, *quantized):
        cache = KVCache(config, 1, seq_len + 1, dtype, ids.device)
        with torch.no_grad():  # not model.generate: the recorded kernels leave their outputs unwritten
            decoder(ids[:1], cache=cache)
            decoder(ids[:1, :1], cache=cache)


# -- configs and compiles ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def on_gpu(arch: int, shared_memory: int | None = None):
    """Answer torch.cuda.get_device_properties as that GPU would, for autotune pruning that asks it."""
    props = types.SimpleNamespace(
        major=arch // 10, minor=arch % 10, shared_memory_per_block_optin=shared_memory or ARCHS[arch]
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
        yield


def candidate_configs(kernel, args: tuple, kwargs: dict) -> list[tuple[triton.Config | None, dict]]:
    """(config, launch kwargs plus its meta-parameters) for each config the autotuner may pick; None if not tuned."""
    if isinstance(kernel, Heuristics):
        named = dict(zip(kernel.arg_names, args, strict=False)) | kwargs
        return candidate_configs(kernel.fn, args, kwargs | {name: rule(named) for name, rule in kernel.values.items()})
    if not isinstance(kernel, Autotuner):
        return [(None, kwargs)]
    return [(config, kwargs | config.all_kwargs()) for config in admitted(kernel, kernel.configs, args, kwargs)]


def admitted(kernel: Autotuner, configs: list[triton.Config], args: tuple, kwargs: dict) -> list[triton.Config]:
    """The configs the autotuner's pruner keeps for this launch."""
    if not kernel.early_config_prune:
        return configs
    return kernel.early_config_prune(configs, dict(zip(kernel.arg_names, args, strict=False)), **kwargs)


@dataclass
class Compiled:
    shared: int  # bytes of shared memory per program
    registers: int  # per thread
    spilled: int  # bytes of spill stores per thread
    mma: set[str]  # MMA instructions by input type, e.g. {"wgmma.bf16", "mma.bf16", "mma.tf32"}
    inputs: set[str]  # the pointer arguments' element types, e.g. {"bf16", "fp32"}


def specialise(arch: int, kernel, args: tuple, kwargs: dict) -> tuple[ASTSource, dict]:
    """What JITFunction.run would compile for this launch on that GPU: the specialised source and the options."""
    jit = jit_of(kernel)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    kwargs = {"debug": False, **kwargs}
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(jit, signature, constexprs, attrs), options.__dict__


def compile_for(arch: int, source: ASTSource, options: dict) -> Compiled:
    """Compile to a cubin; shared memory from the metadata, registers and spills from `ptxas -v`."""
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # where triton prints the ptxas report
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    report, ptx = log.getvalue(), compiled.asm["ptx"]
    mma = {f"wgmma.{t}" for t in re.findall(r"wgmma\.mma_async\.\S*?\.f32\.(\w+)\.", ptx)}
    mma |= {f"mma.{t}" for t in re.findall(r"mma\.sync\.aligned\.\S*?\.f32\.(\w+)\.", ptx)}
    return Compiled(
        shared=compiled.metadata.shared,
        registers=int(re.search(r"Used (\d+) registers", report).group(1)),
        spilled=int(re.search(r"(\d+) bytes spill stores", report).group(1)),
        mma=mma,
        inputs={t[1:] for t in source.signature.values() if t.startswith("*")},
    )


@dataclass
class Result:
    where: str  # kernel, arch, config and launch: what a failure message names
    arch: int
    head_dim: int
    has_dot: bool  # the kernel's own source calls tl.dot
    compiled: Compiled
    estimate_problem: str | None  # how the autotune pruner misjudges this config's shared memory, if it does


@dataclass(frozen=True)
class Matrix:
    dtypes: tuple[torch.dtype, ...]
    head_dims: tuple[int, ...]
    seq_len: int
    every_config: bool  # else only the largest tile the autotuner may pick, the one most likely to overflow
    every_launch: bool  # else one specialisation per kernel, arch and head dim (e.g. no separate decode compile)


FAST = Matrix((torch.bfloat16,), (128,), 256, every_config=False, every_launch=False)
FULL = Matrix((torch.bfloat16, torch.float16, torch.float32), (16, 32, 64, 80, 128, 256), 200, True, True)


def _tile_size(kwargs: dict) -> tuple[int, int]:
    """How demanding a config is: the product of its BLOCK_* sizes, then its pipeline depth."""
    blocks = [v for name, v in kwargs.items() if name.startswith("BLOCK") and isinstance(v, int)]
    return math.prod(blocks), kwargs.get("num_stages", 0)


def _describe(launch: Launch) -> str:
    first = next(a for a in launch.args if isinstance(a, torch.Tensor))
    flags = [f"{name}={value}" for name, value in launch.kwargs.items() if name.isupper()]
    return " ".join([f"head_dim={launch.head_dim}", str(first.dtype).removeprefix("torch."), *flags])


def _estimate_problem(launch: Launch, arch: int, config: triton.Config | None, shared: int) -> str | None:
    """Whether the pruner admits the config under a limit just below what it uses (it must not: the autotuner would
    compile it, then drop it), or rejects it on the real GPU although it fits there (it must not either: a config
    that fits is thrown away). Pessimism below the limit is harmless and not judged."""
    if config is None or not launch.kernel.early_config_prune:
        return None
    with on_gpu(arch, shared_memory=shared - 1):
        if admitted(launch.kernel, [config], launch.args, launch.kwargs):
            return f"uses {shared} B but is admitted under a limit of {shared - 1} B"
    if shared <= ARCHS[arch]:
        with on_gpu(arch, shared_memory=ARCHS[arch]):
            if not admitted(launch.kernel, [config], launch.args, launch.kwargs):
                return f"uses {shared} B, within sm_{arch}'s {ARCHS[arch]} B, but the pruner drops it"
    return None


def compile_matrix(matrix: Matrix) -> tuple[list[Result], list[str]]:
    """Record the model's launches over the matrix and compile each distinct one for every arch; also returns
    the kernels never launched. Runs in a process where triton does not interpret."""
    modules = kernel_modules()
    with recording(modules) as launches:
        for dtype in matrix.dtypes:
            for head_dim in matrix.head_dims:
                start = len(launches)
                drive_model(dtype, head_dim, matrix.seq_len)
                for launch in launches[start:]:
                    launch.head_dim = head_dim
    launched = {(launch.module, launch.name) for launch in launches}
    never = [f"{m}.{n}" for m, module in modules.items() for n in launchable_kernels(module) if (m, n) not in launched]
    results, done = [], set()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="minigrok-gpu-compile-"))  # a hit skips ptxas
        patch.setattr(knobs.nvidia, "dump_ptxas_log", True)
        for launch in launches:
            for arch in ARCHS:
                with on_gpu(arch):
                    configs = candidate_configs(launch.kernel, launch.args, launch.kwargs)
                if not configs:  # the autotuner would have nothing to launch
                    raise AssertionError(f"{launch.module}.{launch.name} sm_{arch} {_describe(launch)}: no config left")
                if not matrix.every_config:
                    configs = [max(configs, key=lambda config: _tile_size(config[1]))]
                for config, kwargs in configs:
                    source, options = specialise(arch, launch.kernel, launch.args, kwargs)
                    kind = (launch.module, launch.name, arch, str(config))
                    key = kind + ((source.hash(),) if matrix.every_launch else (launch.head_dim,))
                    if key in done:
                        continue
                    done.add(key)
                    where = f"{launch.module}.{launch.name} sm_{arch} [{config or 'not autotuned'}] {_describe(launch)}"
                    try:
                        compiled = compile_for(arch, source, options)
                    except Exception as error:
                        raise AssertionError(f"{where}: does not compile: {type(error).__name__}: {error}") from None
                    has_dot = "tl.dot(" in jit_of(launch.kernel).src
                    problem = _estimate_problem(launch, arch, config, compiled.shared)
                    results.append(Result(where, arch, launch.head_dim, has_dot, compiled, problem))
    return results, never


@pytest.fixture(scope="module", params=[FAST, pytest.param(FULL, marks=pytest.mark.slow)], ids=["fast", "full"])
def compiled(request) -> tuple[list[Result], list[str]]:
    """compile_matrix, run in a fresh process started without TRITON_INTERPRET."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("TRITON_INTERPRET", raising=False)
        patch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # the default, stated so triton does not warn
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(compile_matrix, request.param).result()


def _fail_if(problems: list[str], what: str) -> None:
    assert not problems, f"{len(problems)} {what}:\n" + "\n".join(problems)


def test_the_model_launches_every_kernel(compiled):
    _, never = compiled
    _fail_if(never, "kernels the model never launches, so nothing here compiles them")


def test_fits_shared_memory(compiled):
    results, _ = compiled
    over = [
        f"{r.where}: {r.compiled.shared} B > {ARCHS[r.arch]} B" for r in results if r.compiled.shared > ARCHS[r.arch]
    ]
    _fail_if(over, "configs over the per-block shared memory limit")


def test_half_precision_dots_use_native_mma(compiled):
    results, _ = compiled
    wrong = []
    for r in results:
        half = r.compiled.inputs & {"bf16", "fp16"}
        if half and r.has_dot:
            # A kernel may take two half dtypes (the quantised matmul: bf16 activations, fp16 scales); its dots
            # must run in one of them, never tf32.
            want = sorted(kind.replace("fp16", "f16") for kind in half)
            if not r.compiled.mma or any(kind.rsplit(".", 1)[-1] not in want for kind in r.compiled.mma):
                wrong.append(f"{r.where}: MMA {sorted(r.compiled.mma) or 'none'}, want only {' or '.join(want)}")
    _fail_if(wrong, "half-precision kernels without native half MMA")


def test_no_register_spills_up_to_head_dim_128(compiled):
    results, _ = compiled
    spills = [
        f"{r.where}: {r.compiled.spilled} B spilled ({r.compiled.registers} registers)"
        for r in results
        if r.head_dim <= 128 and r.compiled.spilled
    ]
    _fail_if(spills, "configs that spill registers")


def test_autotune_pruning_is_honest_about_shared_memory(compiled):
    results, _ = compiled
    _fail_if([f"{r.where}: {r.estimate_problem}" for r in results if r.estimate_problem], "shared memory estimates off")
