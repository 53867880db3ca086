"""Child-Tuning_F's counter-based draw: the definition, the compiled kernels against the eager ones, the
one-pass AdamW against a hand-written update, and the statistics a Bernoulli(p) mask must have."""

from __future__ import annotations

import fcntl
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import py_keep_bits, py_step_base

from childtune import ChildOptimizer, ChildTuningF, kernels
from childtune.kernels import Draw

BUILD_WAIT_SECONDS_IN_TESTS = 120.0  # a probe that finds the build done needs none of it


def test_the_draw_is_the_documented_function_of_seed_step_name_and_position(backend):
    strategy = ChildTuningF(0.3, seed=11)
    strategy.bind({"enc.w": torch.zeros(3, 50), "head": torch.zeros(7)})
    masks = strategy.masks(4)
    for name, mask in masks.items():
        want = [py_keep_bits(i, py_step_base(11, 4), name) < strategy._threshold for i in range(mask.numel())]
        assert mask.view(-1).tolist() == want, name
    assert strategy.keep_probability == round(0.3 * 2**32) / 2**32
    # pinned: a change to the draw changes every documented mask, and must be deliberate
    assert [py_keep_bits(i, py_step_base(0, 0), "w") for i in range(3)] == [3441385446, 930542554, 1789765756]


@pytest.mark.parametrize("n,start", [(1, 0), (1000, 0), (kernels.BLOCK + 17, 5), (300, 2**32 - 300)])
def test_compiled_kernels_equal_the_eager_reference_bit_for_bit(monkeypatch, n, start):
    monkeypatch.delenv("CHILDTUNE_KERNELS", raising=False)
    assert kernels.extension() is not None
    draw = Draw(start, *kernels.draw_key(kernels.step_base(3, 9), "x"), round(0.4 * 2**32))
    g = torch.Generator().manual_seed(n)
    grad = torch.randn(n, generator=g)
    grad[: min(n, 4)] = torch.tensor([float("nan"), float("inf"), -0.0, -1.0])[: min(n, 4)]
    compiled_mask, compiled_grad = torch.empty(n, dtype=torch.bool), grad.clone()
    kernels.keep_mask_(compiled_mask, draw)
    kernels.mask_grad_(compiled_grad, draw, 2.5)
    monkeypatch.setenv("CHILDTUNE_KERNELS", "eager")
    eager_mask, eager_grad = torch.empty(n, dtype=torch.bool), grad.clone()
    kernels.keep_mask_(eager_mask, draw)
    kernels.mask_grad_(eager_grad, draw, 2.5)
    assert torch.equal(compiled_mask, eager_mask)
    assert torch.equal(compiled_grad.view(torch.int32), eager_grad.view(torch.int32))  # NaN, -0.0 included
    assert torch.equal(eager_grad.view(torch.int32), (grad * eager_mask * 2.5).view(torch.int32))


def test_bf16_gradients_are_masked_with_the_same_keep_bits(monkeypatch):
    draw = Draw(3, 77, 88, round(0.3 * 2**32))
    grad = torch.randn(kernels.BLOCK + 5).to(torch.bfloat16)
    keep = torch.empty(grad.shape, dtype=torch.bool)
    kernels.keep_mask_(keep, draw)
    compiled = grad.clone()
    kernels.mask_grad_(compiled, draw, 1 / 0.3)
    monkeypatch.setenv("CHILDTUNE_KERNELS", "eager")
    eager = grad.clone()
    kernels.mask_grad_(eager, draw, 1 / 0.3)
    expected = grad * keep * (1 / 0.3)
    assert torch.equal(compiled.view(torch.int16), expected.view(torch.int16))
    assert torch.equal(eager.view(torch.int16), expected.view(torch.int16))


def test_non_contiguous_gradients_take_the_eager_path_with_the_same_bits():
    draw = Draw(0, 123, 456, round(0.5 * 2**32))
    grad = torch.randn(40, 30)
    transposed = grad.t()
    expected = transposed.contiguous()
    kernels.mask_grad_(expected, draw, 2.0)
    kernels.mask_grad_(transposed, draw, 2.0)
    assert torch.equal(transposed, expected)


@pytest.mark.parametrize("masked", [True, False])
def test_one_pass_adamw_is_torchs_adamw_on_the_masked_gradient(masked):
    """Against AdamW written out in float64: decay first, then moments, bias-corrected step."""
    assert kernels.extension() is not None
    lr, (b1, b2), eps, wd = 1e-2, (0.9, 0.99), 1e-6, 0.1
    g = torch.Generator().manual_seed(0)
    p = torch.randn(5000, generator=g)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    ref_p, ref_m, ref_v = p.double(), m.double(), v.double()
    for step in range(1, 4):
        grad = torch.randn(5000, generator=g)
        before = grad.clone()
        draw = Draw(7, *kernels.draw_key(kernels.step_base(1, step), "w"), round(0.3 * 2**32)) if masked else None
        kernels.adamw_(p, grad, m, v, draw, 1 / 0.3, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, step=step)
        assert torch.equal(grad, before)  # read, never written
        used = grad.double()
        if masked:
            keep = torch.empty(5000, dtype=torch.bool)
            kernels.keep_mask_(keep, draw)
            used = used * keep / 0.3
        ref_p = ref_p * (1 - lr * wd)
        ref_m = b1 * ref_m + (1 - b1) * used
        ref_v = b2 * ref_v + (1 - b2) * used * used
        denom = ref_v.sqrt() / math.sqrt(1 - b2**step) + eps
        ref_p = ref_p - lr / (1 - b1**step) * ref_m / denom
    torch.testing.assert_close(p.double(), ref_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.double(), ref_m, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(v.double(), ref_v, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("p", [0.01, 0.3, 0.9])
def test_masks_have_bernoulli_statistics(backend, p):
    """Keep fraction within 5 sigma; neighbours, consecutive steps and two parameters uncorrelated."""
    n = 200_000
    strategy = ChildTuningF(p, seed=2)
    strategy.bind({"a": torch.zeros(n), "b": torch.zeros(n)})
    first = {k: v.clone().double() for k, v in strategy.masks(0).items()}
    second = {k: v.double() for k, v in strategy.masks(1).items()}
    sigma = math.sqrt(p * (1 - p) / n)
    for mask in (*first.values(), *second.values()):
        assert abs(mask.mean().item() - p) < 5 * sigma

    def corr(x, y):
        x, y = x - x.mean(), y - y.mean()
        return (x @ y / (x.norm() * y.norm())).item()

    bound = 5 / math.sqrt(n)
    a = first["a"]
    assert abs(corr(a[:-1], a[1:])) < bound  # neighbouring positions
    assert abs(corr(a, second["a"])) < bound  # the same position at the next step
    assert abs(corr(a, first["b"])) < bound  # the same position in another parameter


def test_child_optimizer_steps_f_in_one_pass_and_matches_the_eager_path(monkeypatch):
    """Same update to float tolerance, torch-compatible state (the eager path resumes from it)."""
    assert kernels.extension() is not None
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())

    def optimizer(model):
        return ChildOptimizer(dict(model.named_parameters()), ChildTuningF(0.4, seed=3, always=("2.",)),
                              lr=1e-2, weight_decay=0.1)

    one_pass = optimizer(models[0])
    monkeypatch.setenv("CHILDTUNE_KERNELS", "eager")
    eager = optimizer(models[1])
    assert one_pass._one_pass and not eager._one_pass
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 2, generator=g)
        for model, opt in zip(models, (one_pass, eager), strict=True):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    for a, b in zip(*(m.parameters() for m in models), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    resumed = optimizer(models[0])
    resumed.load_state_dict(one_pass.state_dict())
    assert resumed.steps == 4
    assert all(torch.equal(resumed.state[p]["exp_avg"], one_pass.state[p]["exp_avg"]) for p in models[0].parameters())


def test_parameters_beyond_32_bit_positions_are_refused():
    huge = torch.empty(1).expand(2**32 + 1)  # one element of storage, 2^32 + 1 positions
    with pytest.raises(ValueError, match="2\\^32"):
        ChildTuningF(0.3).bind({"huge": huge})


@pytest.mark.parametrize("exp", [0.0, 1.0])
def test_top_unchosen_is_torchs_ranking_with_ties_to_the_lower_index(exp):
    g = torch.Generator().manual_seed(4)
    n = 3 * kernels.BLOCK + 11  # several threads' parts when there are threads
    grad, weight = torch.randn(n, generator=g), torch.randn(n, generator=g)
    grad[100:200] = 7.0  # a run of tied scores
    weight[100:200] = 1.0
    chosen = torch.rand(n, generator=g) < 0.4
    chosen[100] = False
    score = (grad.abs() / (weight.abs() + 1e-3) ** exp).masked_fill(chosen, -math.inf)
    tied = score[100]
    k = int((score > tied).sum()) + int((score == tied).sum()) // 2  # the cut falls inside the tied run
    values, indices = kernels.top_unchosen(grad, weight, chosen, k, 1e-3, exp)
    order = sorted(range(n), key=lambda i: (-score[i].item(), i))[:k]  # best first, ties by position
    assert sorted(indices.tolist()) == sorted(order)
    assert torch.equal(values, score[indices])
    assert kernels.top_unchosen(grad, weight, chosen, k, 1e-3, 0.5) is None  # torch's pow: not reproduced


def test_id3_grows_the_same_child_network_compiled_and_eager(tiny_bert, monkeypatch):
    from childtune import ID3

    def grown():
        torch.manual_seed(0)
        strategy = ID3(200, total_steps=4)
        ChildOptimizer(tiny_bert.named_parameters(), strategy)
        g = torch.Generator().manual_seed(3)
        for step in range(4):
            for p in strategy.params.values():
                p.grad = torch.randn(p.shape, generator=g)
            masks = strategy.masks(step)
        return {n: m.clone() for n, m in masks.items()}

    compiled = grown()
    monkeypatch.setenv("CHILDTUNE_KERNELS", "eager")
    eager = grown()
    assert all(torch.equal(compiled[n], eager[n]) for n in eager)
    assert sum(int(m.sum()) for m in compiled.values()) == 200


FAKE_CLOCK = """
import os, types
now = [0.0]
def sleep(seconds):
    now[0] += seconds
    if now[0] > 600:  # a wait that never gives up ends here, at once, not at the subprocess's timeout
        print("still-waiting", flush=True)
        os._exit(3)
kernels.time = types.SimpleNamespace(sleep=sleep, perf_counter=lambda: now[0], monotonic=lambda: now[0],
                                     time=lambda: now[0])
"""
"""The kernels' clock in a probe: time passes only when they sleep, so how long they waited is exact
however loaded the machine is."""


def _probe(wait_seconds: float, fake_clock: bool = False) -> subprocess.CompletedProcess:
    """`kernels.extension()` in a fresh process (nothing cached in memory), allowed `wait_seconds` for a lock;
    with `fake_clock` it also prints the seconds it waited by `FAKE_CLOCK`."""
    code = (f"from childtune import kernels\nkernels.BUILD_WAIT_SECONDS = {wait_seconds}\n"
            + (FAKE_CLOCK if fake_clock else "")
            + "print('compiled' if kernels.extension() is not None else 'eager')\n"
            + ("print(now[0])\n" if fake_clock else ""))
    env = {k: v for k, v in os.environ.items() if k != "CHILDTUNE_KERNELS"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_a_lock_file_left_by_a_killed_build_does_not_block_the_next_process(monkeypatch):
    # torch's own guard is a lock file that a killed build leaves behind; a later load waited on it forever
    monkeypatch.delenv("CHILDTUNE_KERNELS", raising=False)
    assert kernels.extension() is not None
    stale = kernels.build_directory() / "lock"
    stale.touch()
    done = _probe(BUILD_WAIT_SECONDS_IN_TESTS)
    assert done.stdout.split() == ["compiled"], done.stderr
    with open(kernels.build_directory() / "build.flock", "w") as held:
        # under the build flock: another process loading the kernels (tests of another checkout sharing this
        # cache) creates torch's lock file for a moment, but only while it holds the flock itself
        fcntl.flock(held, fcntl.LOCK_EX)
        assert not stale.exists()


def test_a_build_held_by_a_live_process_is_waited_for_then_the_eager_kernels_answer(monkeypatch):
    monkeypatch.delenv("CHILDTUNE_KERNELS", raising=False)
    assert kernels.extension() is not None
    with open(kernels.build_directory() / "build.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        done = _probe(1.0, fake_clock=True)
    assert done.returncode == 0, (done.stdout, done.stderr[-2000:])  # 3 and still-waiting: it never gave up
    answer, waited = done.stdout.split()
    assert answer == "eager" and "could not be built" in done.stderr and "held" in done.stderr, done.stdout
    assert 1.0 <= float(waited) <= 2.0  # its BUILD_WAIT_SECONDS (and a poll), not forever and not at once
