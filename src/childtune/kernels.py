"""Elementwise kernels on the hot path of a step: Child-Tuning_F's counter-based draw, and a masked scale.

**The draw.** Child-Tuning_F needs a fresh Bernoulli(p) mask over every weight every step. Any stateful
generator (torch's CPU generator is mt19937) must be run in sequence, on one thread, into a buffer the
mask is then read from: on the MiniLM parameter set that alone cost more than torch's whole fused AdamW
step (benchmarks/RESULTS.md). Here a weight's keep bit is a pure function of where it is instead:

    x = position ^ k1;  x ^= x >> 16;  x *= 0x21f0aaad;  x ^= k2;  x ^= x >> 15;  x *= 0x735a2d97;  x ^= x >> 15
    keep  <=>  x < threshold            (32-bit unsigned arithmetic; threshold = round(p * 2^32))

`position` is the element's flat index in its whole parameter, and (k1, k2) a key derived from (seed,
step, parameter name) with splitmix64 (`draw_key`). The mixer is the 32-bit xor-shift-multiply hash
"lowbias32" with the lower-bias constants found by C. Wellons' hash-prospector; the key's second half
enters between its rounds, so two steps' masks are not permutations of each other. A keep bit can so
be computed anywhere, in registers: per block, per thread, per rank of a sharded parameter, with no
generator state and no random buffer, and the keep probability is p to within 2^-32.

**Two implementations, one definition.** `csrc/kernels.cpp` computes the draw fused with what consumes
it (the bool mask, the masked gradient, or a whole AdamW update on the masked gradient, one pass over
memory), built on first use with `torch.utils.cpp_extension` (a C++ compiler and ninja; cached between
runs in `build_directory()`). Where it cannot be built, or for tensors it does not take (not
float32 on a CPU, not contiguous), the eager torch code below computes the same bits, block by block in
64-bit integers; `CHILDTUNE_KERNELS=eager` forces it. tests/test_kernels.py holds them equal.

**ID3's ranking** (`top_unchosen`): the k best not-yet-chosen weights of a tensor by |g| / (|w| + eps)^exp
in one streaming pass with a heap per thread, where scoring, masking and `torch.topk` were passes of
their own; exp 0 and 1 only (the two presets), where its float32 arithmetic is torch's exactly.

**Child-only weight gradients** (`child_dot_`): a Linear weight's gradient at its child elements only,
out[k] += sum_t rows[index[k] // width, t] * cols[index[k] % width, t] with rows = dY^T and cols = X^T,
float32 sums over float32 or bfloat16 inputs, threaded over the elements (optim/child_grad.py holds the
torch-ops reference and says why).

**The masked scale** (`scale_where_`): strict AdamW's weight decay restricted to the child network, done
on cache-sized blocks so the where/multiply passes read what the previous one left in cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
import warnings
import zlib
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import NamedTuple, Protocol

import torch

BLOCK = 1 << 17  # elements: a block of float32 weights, its mask and a temporary fit in a 1-2 MiB cache
MASK32 = 0xFFFFFFFF
SOURCE = Path(__file__).parent / "csrc" / "kernels.cpp"
_CODE = SOURCE.read_bytes()  # read at import: a process builds the kernels its Python was written for, even
# when the file changes under a long run (the new source would hash to a folder of its own)
POSITIONS = 1 << 32  # a parameter with more elements than this cannot be drawn: positions are 32-bit
_MULTIPLIERS = (0x21F0AAAD, 0x735A2D97)  # both < 2^31, so 64-bit products of 32-bit values never overflow


class Draw(NamedTuple):
    """Where one parameter's keep bits come from at one step: flat position of its first local element
    (non-zero for an FSDP2 shard's rows), the two key halves, and the keep threshold."""

    start: int
    k1: int
    k2: int
    threshold: int


class Compiled(Protocol):
    """The functions csrc/kernels.cpp binds (its PYBIND11_MODULE block), as Python calls them."""

    def keep(self, out: torch.Tensor, start: int, k1: int, k2: int, threshold: int) -> None: ...

    def mask_(self, grad: torch.Tensor, start: int, k1: int, k2: int, threshold: int, scale: float) -> None: ...

    def adamw_(self, param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               start: int, k1: int, k2: int, threshold: int, scale: float, lr: float, beta1: float, beta2: float,
               eps: float, weight_decay: float, step: float, masked: bool) -> None: ...

    def top_unchosen(self, grad: torch.Tensor, weight: torch.Tensor, chosen: torch.Tensor, k: int, eps: float,
                     exponent: float) -> tuple[torch.Tensor, torch.Tensor]: ...

    def child_dot_(self, out: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, index: torch.Tensor,
                   width: int) -> None: ...


def splitmix64(x: int) -> int:
    """Steele, Lea & Flood's SplitMix64 finaliser: spreads any 64-bit input over all 64 bits."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def step_base(seed: int, step: int) -> int:
    """The 64-bit base key of step `step` of a run seeded `seed`."""
    return splitmix64(splitmix64(seed & 0xFFFFFFFFFFFFFFFF) ^ step)


def draw_key(base: int, name: str) -> tuple[int, int]:
    """(k1, k2) of parameter `name` under a step's base key: a parameter's mask depends on its own name,
    not on which other parameters are drawn."""
    z = splitmix64(base ^ zlib.crc32(name.encode()))
    return z & MASK32, z >> 32


def keep_bits(positions: torch.Tensor, k1: int, k2: int) -> torch.Tensor:
    """The draw's 32-bit value at each of `positions` (int64 in [0, 2^32)): the reference definition."""
    x = positions ^ k1
    x = x ^ (x >> 16)
    x = (x * _MULTIPLIERS[0]) & MASK32
    x = x ^ k2
    x = x ^ (x >> 15)
    x = (x * _MULTIPLIERS[1]) & MASK32
    return x ^ (x >> 15)


def _keep_blocks(flat: torch.Tensor, draw: Draw) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(block of `flat`, its keep mask) for cache-sized blocks: the compiled keep mask on a CPU where it was
    built, `keep_bits` otherwise."""
    ext = extension() if flat.device.type == "cpu" else None
    keep = torch.empty(min(BLOCK, flat.numel()), dtype=torch.bool, device=flat.device)
    for begin in range(0, flat.numel(), BLOCK):
        block = flat[begin:begin + BLOCK]
        start = draw.start + begin
        if ext is not None:
            ext.keep(keep[:block.numel()], start, draw.k1, draw.k2, draw.threshold)
            yield block, keep[:block.numel()]
        else:
            positions = torch.arange(start, start + block.numel(), device=flat.device)
            yield block, keep_bits(positions, draw.k1, draw.k2) < draw.threshold


def keep_mask_(out: torch.Tensor, draw: Draw) -> None:
    """In place, `out` (bool) <- the draw's keep mask, element i at position `draw.start + i`."""
    ext = _for(out, torch.bool)
    if ext is not None:
        ext.keep(out, *draw)
        return
    contiguous = out.contiguous()
    for block, keep in _keep_blocks(contiguous.view(-1), draw):
        block.copy_(keep)
    if contiguous is not out:
        out.copy_(contiguous)


def mask_grad_(grad: torch.Tensor, draw: Draw, scale: float) -> None:
    """In place, `grad <- grad * keep * scale`: Child-Tuning_F's masked, rescaled gradient (same bits as
    torch's `grad * mask * scale`, NaN * 0 included). float32 on a CPU in one compiled loop; other dtypes
    (bf16) multiply by the keep mask block by block."""
    ext = _for(grad, torch.float32)
    if ext is not None:
        ext.mask_(grad, *draw, scale)
        return
    contiguous = grad.contiguous()
    for block, keep in _keep_blocks(contiguous.view(-1), draw):
        block.mul_(keep).mul_(scale)
    if contiguous is not grad:
        grad.copy_(contiguous)


def adamw_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
           draw: Draw | None, scale: float, *, lr: float, betas: tuple[float, float], eps: float,
           weight_decay: float, step: float) -> None:
    """One AdamW step of `param` on the gradient masked by `draw` (unmasked if None) in one pass, torch's
    fused AdamW formula; `grad` is read, not written. For callers that found `one_pass_ready` true."""
    masked = draw is not None
    start, k1, k2, threshold = (0, 0, 0, 0) if draw is None else draw
    ext = _build()
    if ext is None:
        raise RuntimeError("kernels.adamw_ needs the compiled kernels: call it only where one_pass_ready() is true")
    ext.adamw_(param, grad, exp_avg, exp_avg_sq, start, k1, k2, threshold, scale if masked else 1.0, lr,
               betas[0], betas[1], eps, weight_decay, step, masked)


def ranks_unchosen(grad: torch.Tensor, weight: torch.Tensor, exp: float) -> bool:
    """Whether `top_unchosen` takes these gradients and weights (its bool `chosen` is then worth making)."""
    return exp in (0.0, 1.0) and _for(grad, torch.float32) is not None and _for(weight, torch.float32) is not None


def top_unchosen(grad: torch.Tensor, weight: torch.Tensor, chosen: torch.Tensor, k: int, eps: float,
                 exp: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scores, flat indices) of the `k` best elements not in `chosen` by |g| / (|w| + eps)^exp, ties to the
    lower index; None where the compiled kernel does not apply (the caller ranks with torch ops)."""
    if not ranks_unchosen(grad, weight, exp):
        return None
    ext = _for(chosen, torch.bool)
    return None if ext is None else ext.top_unchosen(grad, weight, chosen, k, eps, exp)


def child_dot_(out: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, index: torch.Tensor, width: int) -> bool:
    """In place, float32 `out[k] += sum_t rows[index[k] // width, t] * cols[index[k] % width, t]` (sorted flat
    int32 or int64 `index`; rows and cols in any layout, copied contiguous here); False, with `out`
    untouched, where the compiled kernel does not take these tensors (the caller uses torch ops): all on a
    CPU, rows and cols both float32 or both bfloat16."""
    if rows.dtype not in (torch.float32, torch.bfloat16) or cols.dtype != rows.dtype or rows.device != cols.device:
        return False
    if index.dtype not in (torch.int32, torch.int64) or _for(index, index.dtype) is None or rows.device.type != "cpu":
        return False
    ext = _for(out, torch.float32)
    if ext is None:
        return False
    ext.child_dot_(out, rows.contiguous(), cols.contiguous(), index, width)
    return True


def one_pass_ready(*tensors: torch.Tensor) -> bool:
    """Whether `adamw_` can take these tensors: the compiled kernel is available, all float32 on a CPU."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors) and extension() is not None


def _for(t: torch.Tensor, dtype: torch.dtype) -> Compiled | None:
    """The compiled kernels when they take `t` (contiguous, `dtype`, on a CPU), else None."""
    if t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
        return None
    return extension()


def extension() -> Compiled | None:
    """The compiled kernels of csrc/kernels.cpp, built on first use, or None (`CHILDTUNE_KERNELS=eager`, or
    they could not be built here: a warning says why, once)."""
    if os.environ.get("CHILDTUNE_KERNELS", "").lower() == "eager":
        return None
    return _build()


FLAGS = ["-O3", "-fno-math-errno", "-fopenmp"]  # -fopenmp: at::parallel_for is OpenMP pragmas in ATen's headers
BUILD_WAIT_SECONDS = 600.0  # how long a process waits for another one's build of the same kernels before going eager


def build_directory() -> Path:
    """Where the kernels are built and cached: one folder per (source, torch, Python, flags), under
    `CHILDTUNE_KERNEL_CACHE` or ~/.cache/childtune/kernels.

    Not torch's shared extension folder: torch guards a build there with a lock *file* that a killed build
    leaves behind, and every later process then waits on it forever (one test run killed mid-build hung the
    next CI run for its whole 90 minutes). Here the lock is an flock, which dies with its holder, and the
    folder's name is the hash of what is built, so checkouts at different paths share one build."""
    digest = hashlib.sha256(_CODE)
    digest.update(f"{torch.__version__} {sys.version} {FLAGS}".encode())
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = os.environ.get("CHILDTUNE_KERNEL_CACHE") or cache_home / "childtune" / "kernels"
    return Path(root) / digest.hexdigest()[:16]


@cache
def _build() -> Compiled | None:
    started = time.perf_counter()
    path = os.environ.get("PATH", "")
    try:
        import fcntl

        from torch.utils.cpp_extension import load

        if shutil.which("ninja") is None:  # the ninja wheel's binary, when the venv's bin is not on PATH
            import ninja

            os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path])
        directory = build_directory()
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / "build.flock", "w") as held:
            while True:
                try:
                    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.perf_counter() - started > BUILD_WAIT_SECONDS:
                        raise TimeoutError(f"another process held {directory} for {BUILD_WAIT_SECONDS:.0f} s") from None
                    time.sleep(0.2)
            (directory / "lock").unlink(missing_ok=True)  # torch's lock file, left by a killed build: we hold the flock
            copy = directory / SOURCE.name  # compiled from here, so the build does not depend on the checkout's path
            if not copy.exists() or copy.read_bytes() != _CODE:
                copy.write_bytes(_CODE)
            module: Compiled = load(name="childtune_kernels", sources=[str(copy)], build_directory=str(directory),
                                    verbose=False, extra_cflags=FLAGS, extra_ldflags=["-fopenmp"])
    except Exception as error:  # no compiler, no ninja, no flock, a stuck build: the eager code is correct
        warnings.warn(f"childtune: the compiled kernels (csrc/kernels.cpp) could not be built ({error}); the eager "
                      "ones compute the same bits, slower", RuntimeWarning, stacklevel=3)
        return None
    finally:
        os.environ["PATH"] = path
    build_seconds[0] = time.perf_counter() - started
    if build_seconds[0] > 5:
        print(f"childtune: built its compiled kernels in {build_seconds[0]:.0f} s (cached in {directory})",
              file=sys.stderr)
    return module


build_seconds = [0.0]  # how long the first `extension()` call took in this process (build, or load from cache)


def _blocks(*tensors: torch.Tensor) -> Iterable[tuple[torch.Tensor, ...]]:
    """Matching flat blocks of equally sized tensors (whole tensors where one is not contiguous)."""
    if not all(t.is_contiguous() for t in tensors):
        return [tensors]
    return zip(*(t.view(-1).split(BLOCK) for t in tensors), strict=True)


def scale_where_(values: torch.Tensor, mask: torch.Tensor, factor: float) -> None:
    """In place, `values <- mask ? values * factor : values` (the same bits as `values[mask] *= factor`)."""
    for v, m in _blocks(values, mask):
        v.copy_(torch.where(m, v * factor, v))
