"""The CLI's OpenMP wait policy (childtune/openmp.py): set before torch loads, a user's choice kept."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import childtune
from childtune import openmp

SPY = """
import os, sys
class Spy:  # prints OMP_WAIT_POLICY as torch is first imported, when OpenMP reads it
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print(os.environ.get("OMP_WAIT_POLICY"))
            sys.meta_path.remove(self)
sys.meta_path.insert(0, Spy())
import childtune.cli
"""


def test_prefer_passive_wait_keeps_a_users_policy():
    env: dict[str, str] = {}
    openmp.prefer_passive_wait(env)
    assert env == {"OMP_WAIT_POLICY": "passive"}
    env = {"OMP_WAIT_POLICY": "active"}
    openmp.prefer_passive_wait(env)
    assert env == {"OMP_WAIT_POLICY": "active"}


@pytest.mark.parametrize(("given", "seen"), [(None, "passive"), ("active", "active")])
def test_the_cli_sets_the_wait_policy_before_torch_loads(given, seen):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    out = subprocess.run([sys.executable, "-c", SPY], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [seen]


def test_the_package_exports_its_classes_on_first_use():
    from childtune import ID3, ChildOptimizer
    from childtune.optim.masked import ChildOptimizer as defined
    from childtune.strategies import ID3 as id3

    assert ChildOptimizer is defined and ID3 is id3
    assert all(getattr(childtune, name) for name in childtune.__all__)
    with pytest.raises(AttributeError, match="no_such_name"):
        childtune.no_such_name  # noqa: B018
