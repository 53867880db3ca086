"""Backward of one Llama-sized Linear with dense dW against child-only weight gradients (optim/child_grad.py).

One process per dtype builds nn.Linear(2048, 2048) four times (a frozen weight: dX alone, the floor; dense
dW; child-only gradients at a fixed random 1% of the weight through the compiled kernel; the same through
torch ops, `CHILDTUNE_KERNELS=eager`) and a (512 tokens x 2048) input that needs its gradient (a hidden
state). Each repeat runs the four backwards in turn (forwards untimed), so load on a shared machine hits
them alike; reported: the median backward time, its excess over the floor (the weight gradient's cost
inside backward), the weight gradient alone (dY^T X by torch.mm, or `child_weight_grad`) and the
backward's peak resident memory above what was resident before it (VmHWM reset through
/proc/self/clear_refs, Linux; glibc's mmap threshold fixed at 64 KiB, so every large buffer is mapped
when allocated and unmapped when freed instead of reused from the heap unseen). One thread, so the
numbers compare work rather than how well each path threads.

    .venv/bin/python benchmarks/child_grad.py
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

SIZE, TOKENS, P, REPEATS = 2048, 512, 0.01, 9
MODES = {  # label: (weight gradient, CHILDTUNE_KERNELS)
    "dX only, frozen weight (floor)": ("none", ""),
    "dense dW": ("dense", ""),
    "child-only, compiled kernel": ("child", ""),
    "child-only, torch ops": ("child", "eager"),
}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))


def _backward(layer, grads, x, dy) -> tuple[float, float]:
    """(seconds, peak MiB above resident before) of one backward through `layer`."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    if grads is not None:
        grads.zero_grad()
    y = layer(x)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # VmHWM <- VmRSS
    start = time.perf_counter()
    y.backward(dy)
    return time.perf_counter() - start, (_status_kib("VmHWM") - before) / 1024


def _alone(weight_grad: str, grads, dy, x) -> float:
    """Seconds of the weight gradient by itself: dense dY^T X, or the child-only vector."""
    import torch

    from childtune.optim.child_grad import child_weight_grad

    start = time.perf_counter()
    if weight_grad == "dense":
        torch.mm(dy.t(), x)
    elif weight_grad == "child":
        child_weight_grad(dy, x, grads.sites["weight"].index)
    return time.perf_counter() - start


def measure(dtype_name: str) -> dict[str, dict[str, float]]:
    """Per mode: the median backward and weight-gradient-alone seconds, and the median peak MiB (the first
    repeat, a warm-up, left out)."""
    import torch

    from childtune.optim.child_grad import ChildGrads

    torch.set_num_threads(1)
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    runs = {}
    for label, (weight_grad, kernels) in MODES.items():
        layer = torch.nn.Linear(SIZE, SIZE).to(dtype)
        layer.weight.requires_grad_(weight_grad != "none")
        grads = ChildGrads(layer, {"weight": torch.rand(SIZE, SIZE) < P}) if weight_grad == "child" else None
        runs[label] = (layer, grads, kernels, weight_grad)
    x = torch.randn(TOKENS, SIZE, dtype=dtype, requires_grad=True)
    dy = torch.randn(TOKENS, SIZE, dtype=dtype)
    samples = {label: [] for label in MODES}
    for _ in range(REPEATS + 1):
        for label, (layer, grads, kernels, weight_grad) in runs.items():
            os.environ["CHILDTUNE_KERNELS"] = kernels
            alone = _alone(weight_grad, grads, dy, x.detach())
            samples[label].append((*_backward(layer, grads, x, dy), alone))
    return {label: {"seconds": statistics.median(r[0] for r in rows[1:]),
                    "peak_mib": statistics.median(r[1] for r in rows[1:]),
                    "alone": statistics.median(r[2] for r in rows[1:])}
            for label, rows in samples.items()}


def main() -> None:
    print(f"nn.Linear({SIZE}, {SIZE}), {TOKENS} tokens, child {P:.0%} of the weight, 1 thread; backward only")
    print(f"{'dtype':6s} {'setting':32s} {'backward ms':>12s} {'over floor':>11s} {'dW alone':>9s} {'peak MiB':>9s}")
    for dtype, short in (("float32", "fp32"), ("bfloat16", "bf16")):
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        code = f"import json, child_grad; print(json.dumps(child_grad.measure({dtype!r})))"
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=os.path.dirname(os.path.abspath(__file__)),
                             check=True, capture_output=True, text=True).stdout
        rows = json.loads(out.strip().splitlines()[-1])
        floor = next(iter(rows.values()))["seconds"]
        for label, row in rows.items():
            print(f"{short:6s} {label:32s} {row['seconds'] * 1e3:12.1f} {(row['seconds'] - floor) * 1e3:11.1f} "
                  f"{row['alone'] * 1e3:9.1f} {row['peak_mib']:9.1f}")


if __name__ == "__main__":
    main()
