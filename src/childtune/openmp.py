"""How torch's CPU threads wait: asleep, so that training stays usable on a CPU other jobs share.

torch's CPU kernels split every op evenly over a team of OpenMP threads and join them at a barrier, so an
op takes as long as its slowest thread. When another process keeps a core busy, the OS shares that core
between it and one of the team, and under GNU OpenMP's default wait policy the threads already done spin
at the barrier meanwhile, taking the CPU time the late one needs. On the 2-core machine of
benchmarks/RESULTS.md ("Training on a shared CPU") a MiniLM training step ran about 10x slower that way;
with a passive policy (waiting threads sleep at once) the same two threads kept most of their speed, and
ran faster than one thread did. OpenMP reads the policy once, when torch loads it, so the CLI sets it on
import, before anything loads torch; a library user's process is theirs to configure.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

WAIT_POLICY = "OMP_WAIT_POLICY"


def prefer_passive_wait(env: MutableMapping[str, str] = os.environ) -> None:
    """Make OpenMP's waiting threads sleep instead of spin, unless the user chose a policy."""
    env.setdefault(WAIT_POLICY, "passive")
