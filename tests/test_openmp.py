"""The CLI's OpenMP wait policy (childtune/openmp.py): from faked CPU counters and load, never timed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import childtune
from childtune import openmp

SPY = """
import os, sys
from childtune import openmp
openmp.busy_cpus = lambda cpus: {busy}
class Spy:  # prints OMP_WAIT_POLICY as torch is first imported, which is when OpenMP reads it
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print(os.environ.get("OMP_WAIT_POLICY"))
            sys.meta_path.remove(self)
sys.meta_path.insert(0, Spy())
import childtune.cli
"""


def stat(*cpus: tuple[int, int, int, int]) -> str:
    """A /proc/stat with a line per CPU from its (user, idle, iowait, steal) ticks, the rest 0."""
    lines = ["cpu  1 2 3 4 5 6 7 8 0 0"]
    lines += [f"cpu{i} {u} 0 0 {idle} {iowait} 0 0 {steal} 0 0" for i, (u, idle, iowait, steal) in enumerate(cpus)]
    return "\n".join([*lines, "intr 12345 0 0", "", "ctxt 999"]) + "\n"


def reader(*texts: str | None):
    it = iter(texts)
    return lambda: next(it)


@pytest.fixture(autouse=True)
def idle_load_average(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))


def test_busy_cpus_counts_only_our_cpus_over_the_window():
    # over the window cpu0 was busy throughout, cpu1 idle or waiting on I/O, cpu2 (not ours) busy
    before = stat((100, 50, 0, 0), (10, 500, 0, 0), (0, 0, 0, 0))
    after = stat((200, 50, 0, 0), (10, 590, 10, 0), (100, 0, 0, 0))
    assert openmp.busy_cpus([0, 1], seconds=0, read=reader(before, after)) == pytest.approx(1.0)
    assert openmp.busy_cpus([1], seconds=0, read=reader(before, after)) == pytest.approx(0.0)


def test_busy_cpus_counts_steal_as_busy():
    before, after = stat((0, 0, 0, 0)), stat((0, 50, 0, 50))  # half the window taken by the VM's host
    assert openmp.busy_cpus([0], seconds=0, read=reader(before, after)) == pytest.approx(0.5)


def test_busy_cpus_takes_the_load_average_when_it_is_higher(monkeypatch):
    before = after = stat((0, 0, 0, 0), (0, 0, 0, 0))  # nothing ran in the window (a burst just ended)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 0.0, 0.0))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert openmp.busy_cpus([0, 1], seconds=0, read=reader(before, after)) == pytest.approx(1.5)


def test_busy_cpus_without_proc_stat_uses_the_load_average(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 0.0, 0.0))
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert openmp.busy_cpus([0, 1], read=reader(None)) == pytest.approx(0.75)  # our share of the load
    monkeypatch.setattr(os, "getloadavg", lambda: (40.0, 0.0, 0.0))
    assert openmp.busy_cpus([0, 1], read=reader(None)) == 2  # at most all of ours


def test_allowed_cpus_follow_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 1}, raising=False)
    assert openmp.allowed_cpus() == [1, 3]
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert openmp.allowed_cpus() == [0, 1, 2, 3]


@pytest.mark.parametrize(("busy", "policy"), [(0.0, None), (0.4, None), (0.5, "passive"), (6.0, "passive")])
def test_passive_waits_only_where_other_jobs_keep_a_cpu_busy(busy, policy):
    env: dict[str, str] = {}
    openmp.choose_wait_policy(env, lambda: busy)
    assert env.get("OMP_WAIT_POLICY") == policy


def test_a_users_wait_policy_is_kept_and_the_load_not_measured():
    env = {"OMP_WAIT_POLICY": "active"}
    openmp.choose_wait_policy(env, lambda: pytest.fail("measured the load anyway"))
    assert env == {"OMP_WAIT_POLICY": "active"}


@pytest.mark.parametrize(("busy", "seen"), [(1.0, "passive"), (0.0, "None")])
def test_the_cli_chooses_the_wait_policy_before_torch_loads(busy, seen):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", SPY.format(busy=busy)], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == [seen]


def test_the_package_exports_its_classes_on_first_use():
    from childtune import ID3, ChildOptimizer
    from childtune.optim.masked import ChildOptimizer as defined
    from childtune.strategies import ID3 as id3

    assert ChildOptimizer is defined and ID3 is id3
    assert all(getattr(childtune, name) for name in childtune.__all__)
    with pytest.raises(AttributeError, match="no_such_name"):
        childtune.no_such_name  # noqa: B018
