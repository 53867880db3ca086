"""`bench.py --only-shared-cpu`: how fast `childtune train` trains on a CPU other jobs share, with OpenMP's
default wait policy (the CLI before issue 28), with the one the CLI now chooses from the load at start
(childtune/openmp.py), and with the alternatives it was chosen over.

OpenMP reads its wait policy once, when torch loads it, so every measurement is its own process: a
Child-Tuning_F run on `mr` configured as the CLI configures it (`TrainConfig`'s defaults), timed from the
end of its first training step to the end of its last by a callback, so start-up, data loading and the
first step's allocations are not counted. Conditions: the machine as found (whatever else runs on it,
reported as its load average) and the same with one more process spinning (`while True: pass`, not
pinned). Within each repeat every policy runs in both conditions, in an order rotated every repeat, so
background load falls on all of them alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from timing import Row, Section

from childtune import openmp

TITLE = "Training on a shared CPU: OpenMP's wait policy"
TRAIN_SIZE = 64  # 4 steps of 16: 3 timed
POLICIES = {  # label: (environment for the process, whether it chooses the policy as the CLI does)
    "before: OpenMP's default wait": ({}, False),
    "after: passive wait if other jobs keep >= 0.5 CPU busy at start (the CLI now)": ({}, True),
    "passive wait always": ({openmp.WAIT_POLICY: "passive"}, False),
    "1 thread, default wait (what bench.py --threads auto picks under load)": ({"OMP_NUM_THREADS": "1"}, False),
}
AS_FOUND, BUSY = "as found", "one core busy"


def child(policy: str) -> dict[str, float]:
    """One timed run in this process, which nothing has yet loaded torch into."""
    if POLICIES[policy][1]:
        openmp.choose_wait_policy()  # what `import childtune.cli` does, before anything loads torch
    import torch

    from childtune.training.config import TrainConfig
    from childtune.training.loop import Callback, train

    class Clock(Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step(self, state) -> None:
            self.ends.append(time.perf_counter())

    clock = Clock()
    train(TrainConfig(task="mr", method="child-f", train_size=TRAIN_SIZE, epochs=1, eval_size=16, save="none",
                      progress=False), [clock])
    ends = clock.ends
    return {"steps_per_s": (len(ends) - 1) / (ends[-1] - ends[0]), "threads": torch.get_num_threads(),
            "passive": os.environ.get(openmp.WAIT_POLICY) == "passive"}


@contextlib.contextmanager
def busy_core():
    """One more process that keeps a core busy while inside."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def run(policy: str) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", openmp.WAIT_POLICY)}
    out = subprocess.run([sys.executable, str(Path(__file__)), policy], env={**env, **POLICIES[policy][0]},
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"shared-CPU run {policy!r} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(repeats: int) -> tuple[dict[tuple[str, str], list[dict[str, float]]], list[float]]:
    """Every policy in both conditions, `repeats` times, interleaved; and the load averages seen."""
    results: dict[tuple[str, str], list[dict[str, float]]] = {(c, p): [] for c in (AS_FOUND, BUSY) for p in POLICIES}
    loads = []
    names = list(POLICIES)
    for r in range(repeats):
        for condition in (AS_FOUND, BUSY) if r % 2 == 0 else (BUSY, AS_FOUND):
            with busy_core() if condition == BUSY else contextlib.nullcontext():
                for policy in names[r % len(names):] + names[: r % len(names)]:
                    loads.append(os.getloadavg()[0])
                    results[condition, policy].append(run(policy))
                    print(f"{condition} | {policy}: {results[condition, policy][-1]}", file=sys.stderr)
    return results, loads


def shared_cpu_section(repeats: int) -> Section:
    results, loads = measure(repeats)
    before = next(iter(POLICIES))

    def speed(condition: str, policy: str) -> list[float]:
        return [r["steps_per_s"] for r in results[condition, policy]]

    def vs_before(condition: str, policy: str) -> float:  # median of same-repeat ratios
        return statistics.median(a / b for a, b in zip(speed(condition, policy), speed(condition, before),
                                                       strict=True))

    section = Section(
        TITLE,
        f"`childtune train --task mr --method child-f` as the CLI runs it ({TRAIN_SIZE} examples, batches of 16, "
        f"steps 2-4 timed, torch's default threads unless the row says otherwise), each run its own process on "
        f"this machine's {os.cpu_count()} CPUs, {repeats} repeats "
        "interleaved (benchmarks/shared_cpu.py says how). Steps/s: median over repeats; vs before: median of "
        "same-repeat ratios to the first row.",
        ["policy", f"{AS_FOUND}: steps/s", f"{BUSY}: steps/s", f"{AS_FOUND}: vs before", f"{BUSY}: vs before",
         "threads", "passive waits (as found, busy)"])
    for policy in POLICIES:
        cells = [f"{statistics.median(speed(c, policy)):.3f}" for c in (AS_FOUND, BUSY)]
        cells += [f"{vs_before(c, policy):.2f}" for c in (AS_FOUND, BUSY)]
        cells.append(str(results[AS_FOUND, policy][0]["threads"]))
        cells.append(", ".join(f"{sum(r['passive'] for r in results[c, policy])}/{repeats}" for c in (AS_FOUND, BUSY)))
        section.rows.append(Row(policy, cells))
    section.notes.append(
        f"Load average (1 min) before each run: {min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} CPUs: "
        f"'{AS_FOUND}' is whatever else ran at the time, not an idle machine, and '{BUSY}' that plus the spinner. "
        "Each run's steps/s, in repeat order: " + "; ".join(
            f"{policy.split(':')[0]}: " + ", ".join(f"{c} " + " ".join(f"{v:.2f}" for v in speed(c, policy))
                                                    for c in (AS_FOUND, BUSY)) for policy in POLICIES) + ".")
    return section


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1])))
