"""The checks of this machine's hardware and software: library versions and the NVIDIA driver, the GPUs (bf16, memory
against the recipe's estimate), DeepSpeed ops that would need compiling, flash-attn. No CUDA context: nvidia-smi
answers the GPU questions."""

from __future__ import annotations

import os
import platform
import re
import shutil
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from launcher.doctor.checks import Check, Gpu, _run
from launcher.recipe.ds_config import deepspeed_config
from launcher.recipe.schema import Recipe

# Oldest driver (major version) that runs a CUDA major release under minor-version compatibility.
MIN_DRIVER = {13: 580, 12: 525, 11: 450}
# The newest torch wheel index each driver runs, newest first: the fix for a driver that is too old.
TORCH_INDEXES = ((580, "cu130"), (525, "cu126"), (450, "cu118"))


# ---- versions and the NVIDIA driver ---------------------------------------------------------------------------

def _nccl_version() -> str | None:
    import torch

    try:
        v = torch.cuda.nccl.version()
    except Exception:  # noqa: BLE001 - a build without NCCL
        return None
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def library_versions() -> dict[str, str]:
    """Installed versions without importing the packages (metadata only)."""
    versions = {"python": platform.python_version()}
    for pkg in ("torch", "deepspeed", "transformers"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "missing"
    return versions


def check_versions() -> Check:
    import torch

    v = library_versions()
    cuda = torch.version.cuda
    nccl = _nccl_version() if cuda else None
    build = f"CUDA {cuda} build, NCCL {nccl or 'none'}" if cuda else "CPU build"
    found = (f"python {v['python']}, torch {torch.__version__} ({build}), deepspeed {v['deepspeed']}, "
             f"transformers {v['transformers']}")
    missing = [k for k, version in v.items() if version == "missing"]
    if missing:
        return Check("versions", "FAIL", f"{found}; not installed: {', '.join(missing)}",
                     "`make setup` (installs the versions pinned in constraints.txt)")
    return Check("versions", "OK", found)


@lru_cache(maxsize=1)
def _nvidia_smi() -> tuple[tuple[str, ...], ...] | None:
    """nvidia-smi's rows (index, name, memory MiB, compute capability, driver); None without a working one."""
    query = "index,name,memory.total,compute_cap,driver_version"
    for fields in (query, query.replace(",compute_cap", "")):  # drivers before 510 do not know compute_cap
        out = _run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"])
        if out is not None:
            rows = tuple(tuple(f.strip() for f in line.split(",")) for line in out.splitlines() if line.strip())
            return tuple(r if "compute_cap" in fields else (*r[:3], "", r[3]) for r in rows)
    return None


def driver_version() -> str | None:
    """The NVIDIA kernel driver's version (e.g. 550.54.15): nvidia-smi, else /proc/driver/nvidia/version."""
    rows = _nvidia_smi()
    if rows:
        return rows[0][4]
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return match.group(1) if match else None


def torch_index_for(driver_major: int) -> str | None:
    return next((f"https://download.pytorch.org/whl/{tag}" for need, tag in TORCH_INDEXES if driver_major >= need),
                None)


def check_driver(torch_cuda: str | None, driver: str | None) -> Check:
    """The driver must be new enough for the CUDA release torch was built with (minor-version compatibility:
    any 12.x build runs on a >= 525 driver, 13.x on >= 580); otherwise every rank fails at its first CUDA call."""
    if torch_cuda is None:
        if driver is None:
            return Check("driver", "OK", "no NVIDIA driver, CPU build of torch")
        index = torch_index_for(int(driver.split(".")[0]))
        return Check("driver", "WARN", f"NVIDIA driver {driver}, but torch is a CPU build: it would not use the GPUs",
                     f"`make setup TORCH_INDEX={index}` (a fresh .venv)" if index else "upgrade the NVIDIA driver")
    if driver is None:
        return Check("driver", "OK", f"torch built for CUDA {torch_cuda}; no NVIDIA driver here (no GPU)")
    major, needed = int(driver.split(".")[0]), MIN_DRIVER.get(int(torch_cuda.split(".")[0]))
    if needed is None:
        return Check("driver", "WARN", f"driver {driver}; cannot tell which driver CUDA {torch_cuda} needs",
                     "check NVIDIA's CUDA compatibility table")
    if major < needed:
        index = torch_index_for(major)
        fix = (f"install a torch built for a CUDA this driver runs: `make setup TORCH_INDEX={index}` (a fresh .venv), "
               f"or upgrade the driver to >= {needed}") if index else f"upgrade the driver to >= {needed}"
        return Check("driver", "FAIL", f"driver {driver} is too old for torch's CUDA {torch_cuda} (needs >= {needed})",
                     fix)
    return Check("driver", "OK", f"driver {driver} runs torch's CUDA {torch_cuda} (needs >= {needed})")


# ---- GPUs -------------------------------------------------------------------------------------------------------

def _visible(rows: tuple[tuple[str, ...], ...]) -> list[tuple[str, ...]]:
    """nvidia-smi lists every GPU of the machine; torch sees those CUDA_VISIBLE_DEVICES names."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not all(v.strip().isdigit() for v in visible.split(",") if v.strip()):
        return list(rows)  # unset, or GPU UUIDs: keep nvidia-smi's order
    by_index = {r[0]: r for r in rows}
    return [by_index[v.strip()] for v in visible.split(",") if v.strip() in by_index]


def _gpu_from_row(row: tuple[str, ...]) -> Gpu:
    cap = tuple(int(x) for x in row[3].split(".")) if re.fullmatch(r"\d+\.\d+", row[3]) else None
    return Gpu(row[1], float(row[2]) / 1024, cap)  # type: ignore[arg-type]


def detect_gpus() -> list[Gpu]:
    """The GPUs torch can use here. Read from nvidia-smi unless CUDA is already up in this process, because
    asking torch for a GPU's properties creates a CUDA context (memory on GPU 0 for as long as the process lives)."""
    import torch

    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    rows = _nvidia_smi()
    if not torch.cuda.is_initialized() and rows and len(_visible(rows)) >= count:
        try:
            return [_gpu_from_row(r) for r in _visible(rows)[:count]]
        except (ValueError, IndexError):  # "[N/A]" and the like: ask torch after all
            pass
    props = [torch.cuda.get_device_properties(i) for i in range(count)]
    return [Gpu(p.name, p.total_memory / 1024**3, (p.major, p.minor)) for p in props]


def _describe_gpus(gpus: list[Gpu]) -> str:
    kinds: dict[Gpu, int] = {}
    for g in gpus:
        kinds[g] = kinds.get(g, 0) + 1
    return ", ".join(f"{n} x {g.name} ({g.memory_gib:.0f} GiB"
                     + (f", compute capability {g.capability[0]}.{g.capability[1]})" if g.capability else ")")
                     for g, n in kinds.items())


def check_gpus(recipe: Recipe, gpus: list[Gpu], *, estimate_gib: float | None = None,
               accelerator_env: str | None = None) -> Check:
    """GPUs against what the recipe asks for: a 16-bit precision needs a GPU, bf16 needs Ampere (compute
    capability 8.0) or newer (older GPUs only emulate it, slowly); a CPU run needs DS_ACCELERATOR=cpu."""
    precision = recipe.deepspeed.precision
    if not gpus:
        if precision != "fp32":
            return Check("gpus", "FAIL", f"no GPU here, but deepspeed.precision is {precision!r}",
                         "for a CPU run: --set deepspeed.precision=fp32 (and DS_ACCELERATOR=cpu)")
        if accelerator_env == "cpu":
            return Check("gpus", "OK", "no GPU: a CPU run (fp32, gloo), DS_ACCELERATOR=cpu")
        if accelerator_env is None:
            return Check("gpus", "WARN", "no GPU and DS_ACCELERATOR is not set: DeepSpeed on a CPU-only machine "
                                         "needs DS_ACCELERATOR=cpu", "export DS_ACCELERATOR=cpu")
        return Check("gpus", "FAIL", f"no GPU, but DS_ACCELERATOR={accelerator_env}", "export DS_ACCELERATOR=cpu")
    found = _describe_gpus(gpus)
    problems, fixes = [], []
    if precision == "bf16":
        old = sorted({g.name for g in gpus if g.capability is not None and g.capability < (8, 0)})
        if old:
            problems.append(f"no bf16 on {', '.join(old)} (needs compute capability 8.0, Ampere, or newer)")
            fixes.append("--set deepspeed.precision=fp16")
    if accelerator_env not in (None, "cuda"):
        problems.append(f"DS_ACCELERATOR={accelerator_env}: DeepSpeed would not use the GPUs")
        fixes.append("unset DS_ACCELERATOR")
    if problems:
        return Check("gpus", "FAIL", f"{found}; " + "; ".join(problems), "; ".join(fixes))
    smallest = min(g.memory_gib for g in gpus)
    if estimate_gib is not None and estimate_gib > 0.95 * smallest:
        return Check("gpus", "WARN", f"{found}; the recipe's memory estimate is {estimate_gib:.1f} GiB per GPU, "
                                     f"the smallest GPU has {smallest:.1f}",
                     "deepspeed.zero_stage=3, model.gradient_checkpointing=true, a smaller data.batch_size_per_gpu "
                     "(raise optim.grad_accum), or deepspeed.offload_optimizer=true")
    return Check("gpus", "OK", found + (f"; {precision} supported" if precision != "fp32" else ""))


# ---- DeepSpeed ops and flash-attn ---------------------------------------------------------------------------

def optimizer_class(ds_config: dict) -> tuple[str, str | None]:
    """What DeepSpeed's engine builds for this config's optimizer (engine._configure_basic_optimizer) and the
    DeepSpeed op it needs compiled; None when it is a torch optimizer (nothing to build)."""
    import torch

    optimizer = ds_config.get("optimizer") or {}
    kind, params = str(optimizer.get("type", "")).lower(), optimizer.get("params") or {}
    offload = ((ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device") in ("cpu",
                                                                                                           "nvme")
    if not optimizer:
        return "the client's optimizer", None
    if kind in ("adam", "adamw"):
        if params.get("torch_adam"):
            w_mode = kind == "adamw" or params.get("adam_w_mode", True)
            fused = "(fused=True)" if params.get("fused") else ""
            return f"torch.optim.{'AdamW' if w_mode else 'Adam'}{fused}", None
        return ("DeepSpeedCPUAdam", "cpu_adam") if offload else ("FusedAdam", "fused_adam")
    if kind == "lamb":
        return "FusedLamb", "fused_lamb"
    if kind == "lion":
        return ("DeepSpeedCPULion", "cpu_lion") if offload else ("FusedLion", "fused_lion")
    if kind == "adagrad":
        return ("DeepSpeedCPUAdagrad", "cpu_adagrad") if offload else ("torch.optim.Adagrad", None)
    if hasattr(torch.optim, optimizer["type"]):
        return f"torch.optim.{optimizer['type']}", None
    return optimizer["type"], kind


def _jit_missing(op: str) -> list[str]:
    """What compiling a DeepSpeed op just in time would lack here (CUDA ops need nvcc, all need ninja and C++)."""
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available

    missing = [] if is_ninja_available() else ["ninja"]
    if not (shutil.which("c++") or shutil.which("g++")):
        missing.append("a C++ compiler")
    if not op.startswith("cpu_") and CUDA_HOME is None:
        missing.append("the CUDA toolkit (nvcc, CUDA_HOME)")
    return missing


def check_deepspeed_ops(recipe: Recipe, world_size: int, on_gpu: bool | None = None) -> Check:
    """The DeepSpeed config must not need an op compiled at engine start: each node would spend minutes in
    nvcc, or fail there without a CUDA toolkit. Reports DeepSpeed's accelerator; builds nothing."""
    from deepspeed.git_version_info import installed_ops

    from launcher.distributed import on_gpu as gpu_here

    gpu = gpu_here()
    accelerator = "cuda" if gpu else "cpu"
    on_gpu = gpu if on_gpu is None else on_gpu
    cls, op = optimizer_class(deepspeed_config(recipe, world_size, on_gpu=on_gpu))
    found = f"accelerator {accelerator}, optimizer {cls} ({'GPU' if on_gpu else 'CPU'} config)"
    if op is None:
        return Check("deepspeed-ops", "OK", f"{found}: no DeepSpeed op to compile")
    if installed_ops.get(op):
        return Check("deepspeed-ops", "OK", f"{found}: op {op} is prebuilt in this deepspeed")
    fix = (f"prebuild it (DS_BUILD_{op.upper()}=1 pip install deepspeed), or have launcher.recipe.deepspeed_config "
           "use torch's AdamW (optimizer params torch_adam: true)")
    missing = _jit_missing(op)
    if missing:
        return Check("deepspeed-ops", "FAIL", f"{found}: needs DeepSpeed's {op} op, not prebuilt, and it cannot be "
                                              f"compiled here (no {', '.join(missing)})", fix)
    return Check("deepspeed-ops", "WARN", f"{found}: needs DeepSpeed's {op} op, not prebuilt: every node compiles it "
                                          "at engine start (minutes; cached in ~/.cache/torch_extensions)", fix)


def check_flash_attn(recipe: Recipe, gpus: list[Gpu]) -> Check:
    """flash_attention_2 needs the flash_attn package, Ampere or newer, and 16-bit weights."""
    if recipe.model.attn_implementation != "flash_attention_2":
        return Check("flash-attn", "SKIP", f"model.attn_implementation is {recipe.model.attn_implementation!r}")
    problems = []
    try:
        import flash_attn

        found = f"flash_attn {flash_attn.__version__}"
    except Exception as e:  # noqa: BLE001 - not installed, or built against another torch (undefined symbol)
        found = "flash_attn does not import"
        problems.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if not gpus:
        problems.append("no GPU here")
    elif any(g.capability is not None and g.capability < (8, 0) for g in gpus):
        problems.append("it needs compute capability 8.0 (Ampere) or newer")
    if recipe.deepspeed.precision == "fp32":
        problems.append("it runs only in bf16 or fp16, deepspeed.precision is 'fp32'")
    if problems:
        return Check("flash-attn", "FAIL", f"{found}; " + "; ".join(problems),
                     "pip install flash-attn --no-build-isolation (built for this torch) on an Ampere+ GPU in "
                     "bf16/fp16, or --set model.attn_implementation=sdpa")
    return Check("flash-attn", "OK", f"{found}, {_describe_gpus(gpus)}")
