"""How torch's CPU threads wait, chosen from the load when the CLI starts, so that training stays usable
on a CPU other jobs share without slowing it where the CPU is free.

torch's CPU kernels split every op evenly over a team of OpenMP threads and join them at a barrier, so an
op takes as long as its slowest thread. When another process keeps a core busy, the OS shares that core
between it and one of the team, and under GNU OpenMP's default wait policy the threads already done spin
at the barrier meanwhile, holding the cores the late one could move to. On the 2-core machine of
benchmarks/RESULTS.md ("Training on a shared CPU") a MiniLM training step then ran several times slower;
with the passive policy (waiting threads sleep at once) the same two threads kept most of their speed. On
a free CPU, though, a passive wait costs a sleep and a wake-up per op, which the default's short spin
saves. So the CLI measures, before anything loads torch (OpenMP reads the policy once, when
torch loads it), how busy other jobs keep the CPUs it may use, and asks for passive waits only when
they are busy. Jobs that start later still slow a run that found the CPU free: where that is likely,
set OMP_WAIT_POLICY=passive yourself. A library user's process is theirs to configure.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, MutableMapping, Sequence
from pathlib import Path

WAIT_POLICY = "OMP_WAIT_POLICY"
SAMPLE_SECONDS = 0.2  # 20 scheduler ticks per CPU: enough to see a busy core, short next to torch's import
BUSY = 0.5  # CPUs' worth of other jobs from which a team of threads would keep waiting for one of its own


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity: taskset, cgroup cpusets), not all the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _read_stat() -> str | None:
    try:
        return Path("/proc/stat").read_text(encoding="ascii")
    except OSError:
        return None


def _ticks(stat: str, cpus: Sequence[int]) -> tuple[int, int]:
    """(busy, total) clock ticks of `cpus` in a /proc/stat text. Only idle and iowait are idle: steal
    (a VM's host running something else) is time this process could not have had either."""
    busy = total = 0
    wanted = {f"cpu{c}" for c in cpus}
    for line in stat.splitlines():
        name, *ticks = line.split() or [""]
        if name in wanted:
            values = [int(t) for t in ticks[:8]]  # user nice system idle iowait irq softirq steal
            total += sum(values)
            busy += sum(values) - values[3] - values[4]
    return busy, total


def load_share(cpus: Sequence[int]) -> float:
    """The 1-minute load average over our share of the machine's CPUs (0 where there is none)."""
    if not hasattr(os, "getloadavg"):
        return 0.0
    return min(float(len(cpus)), os.getloadavg()[0] * len(cpus) / (os.cpu_count() or len(cpus)))


def busy_cpus(cpus: Sequence[int], seconds: float = SAMPLE_SECONDS,
              read: Callable[[], str | None] = _read_stat) -> float:
    """How many of `cpus` other jobs keep busy: the larger of their busy share over `seconds` now, from
    /proc/stat (this process sleeps through it), which sees a job that has just started, and the 1-minute
    load average, which sees jobs that come and go in bursts; the short sample alone missed those in two
    of three runs on the shared machine of benchmarks/RESULTS.md."""
    before = read()
    if before is None:
        return load_share(cpus)
    time.sleep(seconds)
    (b0, t0), (b1, t1) = _ticks(before, cpus), _ticks(read() or before, cpus)
    return max(len(cpus) * (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0, load_share(cpus))


def choose_wait_policy(env: MutableMapping[str, str] = os.environ,
                       busy: Callable[[], float] = lambda: busy_cpus(allowed_cpus())) -> None:
    """Set OMP_WAIT_POLICY=passive in `env` when other jobs keep at least half a CPU busy, unless the user
    chose a policy; leave OpenMP's default otherwise. Effective only before torch is first imported."""
    if WAIT_POLICY not in env and busy() >= BUSY:
        env[WAIT_POLICY] = "passive"
