"""How train.py's runs compute on this machine: the device, the precision policy that gives
every arm of a command one numeric recipe, and the switches of torch and glibc it sets."""
import ctypes
import dataclasses
import os
import sys

import torch

from bert.errors import InputError
from workers import local_index


def pick_device(name):
    """cuda when available (auto); under torchrun or srun, the GPU of this process's local rank."""
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available (use --device cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and local_index() is not None:
        torch.cuda.set_device(local_index() % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def cpu_flags() -> set:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


def native_bf16(device) -> bool:
    """Does the hardware compute bf16 matrix products natively?"""
    if device.type == "cuda":               # emulated bf16 (before Ampere) is slower than fp32
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


@dataclasses.dataclass(frozen=True)
class NumericRecipe:
    """How every run of one command computes: the format of its matrix products."""
    precision: str           # "fp32", "tf32" (CUDA: fp32 storage, TF32 tensor-core products) or "bf16"
    allow_tf32: bool         # torch.backends.cuda.matmul.allow_tf32 during the runs


def numeric_recipe(requested: str, methods, device_type: str, native: bool) -> NumericRecipe:
    """The precision policy: one recipe for every arm of a command, the strictest any arm needs.

    `methods` are the command's arms, Regularizer objects with their options.
    - Methods that perturb inputs or hidden states (`Regularizer.needs_fp32`: lnsr with its
      default difference estimator, noise, smart, r3f) need full fp32. LNSR's sigma 1e-4 on the
      embedding output (elements of size ~0.5) is ~2e-4 of a value, below the rounding error of
      both bf16 (up to 2^-8 ~ 4e-3 of a value, 7 mantissa bits) and TF32 (2^-11 ~ 5e-4, 10
      mantissa bits): in either format the penalty measures rounding error, not the noise
      (tests/test_train.py measures both). So with such a method, fp32 products stay fp32 on a
      GPU too: no TF32. `lnsr --lnsr-estimator jvp` computes J eps directly, without subtracting
      two passes, and tolerates both (tests/test_lnsr_jvp.py).
    - Table 1 compares arms trained alike, so a command's arms share one recipe: `auto` picks
      bf16 only if every arm tolerates it and the hardware computes it natively (a CUDA GPU with
      bf16, a CPU with avx512_bf16 or amx_bf16; elsewhere bf16 is emulated, slower than fp32),
      and full fp32 otherwise. `auto` never picks TF32.
    - An explicit format that some arm cannot take is refused before any work.
    """
    strict = sorted({method.name for method in methods if method.needs_fp32})
    if requested in ("bf16", "tf32") and strict:
        jvp = " or --lnsr-estimator jvp" if "lnsr" in strict else ""
        raise InputError(f"--precision {requested} with {', '.join(strict)}: its perturbations are below "
                         f"{requested}'s resolution, so its penalty would measure rounding error; "
                         f"use fp32 (auto picks it){jvp}")
    if requested == "tf32" and device_type != "cuda":
        raise InputError("--precision tf32: TF32 is a format of CUDA tensor cores; on a CPU use fp32 or bf16")
    if requested == "auto":
        requested = "bf16" if native and not strict else "fp32"
    return NumericRecipe(precision=requested, allow_tf32=requested == "tf32")


def autocast(device, precision):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def make_deterministic():
    """Deterministic kernels for CUDA. cuBLAS reads its workspace setting when its first handle is
    made, so this runs before anything touches the GPU."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def apply_recipe(recipe: NumericRecipe):
    """Set torch's global switches for fp32 matrix products (they only matter on CUDA)."""
    torch.backends.cuda.matmul.allow_tf32 = recipe.allow_tf32
    torch.backends.cudnn.allow_tf32 = recipe.allow_tf32


# glibc's caches of small freed blocks (the per-thread cache and the fast bins), switched off.
MALLOC_TUNABLES = "glibc.malloc.tcache_count=0:glibc.malloc.mxfast=0"


def started_as_script(script: str) -> bool:
    """True when this process is `python [interpreter options] SCRIPT ...`: no -m, -c or stdin,
    no debugger, profiler or other program in front (whose own start a restart would repeat)."""
    orig_argv = getattr(sys, "orig_argv", None)          # Python 3.10+
    if not orig_argv or not sys.argv or not os.path.isfile(sys.argv[0]):
        return False
    if not os.path.samefile(sys.argv[0], script) or orig_argv[-len(sys.argv):] != sys.argv:
        return False
    options = orig_argv[1:-len(sys.argv)]
    for before, option in zip([None] + options, options):
        if before in ("-X", "-W"):                       # the value of the option before
            continue
        if not option.startswith("-") or option == "-" or option.startswith(("-m", "-c")):
            return False
    return True


def restart_without_small_block_caches():
    """Start this command again, in this process, with glibc's caches of small freed blocks off
    (MALLOC_TUNABLES in GLIBC_TUNABLES, which glibc reads only when a process starts).

    Why: torch allocates every tensor 64-byte aligned, and glibc carves such a block out of a
    larger free chunk and frees the unaligned pieces beside it, tens of bytes each. Its caches
    keep freed small pieces apart from their neighbours for the next small request, so the
    step's small objects (torch's and autograd's own) land right beside the large blocks, and
    each keeps two large freed blocks from merging into the space the next step needs: about
    0.8 GiB of holes in a full LNSR run on RTE (docs/SPEED.md, "Memory on a CPU"). With the caches
    off, freed pieces merge back at once: that run peaks at 2.76 GiB instead of 3.19, in the same
    time. No computed value changes: only where blocks are placed.

    The caller (sweep.run_command) restarts a CPU training command started as
    `python train.py ...` (`started_as_script`), once its flags are checked and before it prints
    or starts anything. A GLIBC_TUNABLES of the user's own, even an empty one, is kept: then, as
    on systems without glibc, this does nothing. The restart costs the imports again, about
    1.3 s; the processes the run starts inherit the setting. Does not return when it restarts.
    """
    if not sys.platform.startswith("linux") or "GLIBC_TUNABLES" in os.environ:
        return
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return
    except (ValueError, OSError):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, {**os.environ, "GLIBC_TUNABLES": MALLOC_TUNABLES})
    except (OSError, ValueError):     # the interpreter cannot be started again: go on as we are
        pass


def keep_freed_memory():
    """Ask glibc to keep the large blocks a training step frees, for the next step to reuse.

    Every step allocates and frees the same large tensors (a (32, 12, 128, 128) attention map is
    25 MB). By default glibc may hand such blocks back to the kernel when they are freed (blocks
    above its mmap threshold are unmapped; the heap's top is trimmed), and the next step then
    page-faults the same memory back in, zero-filled by the kernel. Measured for LNSR on MiniLM,
    batch 32 x 128: about 0.2 GB of page faults and 0.3-0.6 s of kernel time per step. A fixed
    32 MiB mmap threshold (glibc's largest) and a 1 GiB trim threshold keep those blocks in the
    heap. Linux with glibc only; elsewhere, or if libc cannot be loaded, this does nothing.

    The price is memory: the heap keeps the holes between freed blocks too, and a run's resident
    memory levels off above what a step holds (an LNSR run on RTE: 3.19 GiB, 2.76 GiB with
    `restart_without_small_block_caches`, about 2.4 GiB live; 2.57 GiB with bert/speed.py's
    `gelu_linear` as well).
    It levels off because the blocks of one step fit the next: tensor sizes repeat from step to
    step (bert/speed.py rounds the real-token row counts, `row_bucket`) and a step frees what
    it made before the next one starts (`train.train_one`). With a new size at every step the heap
    grew for as long as the run went on (docs/SPEED.md, "Memory on a CPU"). A user who sets
    glibc's own MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ has chosen otherwise: then this
    does nothing (docs/USAGE.md, "Memory on a CPU").
    """
    if not sys.platform.startswith("linux") or {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3          # from glibc's <malloc.h>
    mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
    mallopt(M_TRIM_THRESHOLD, 2**30)
