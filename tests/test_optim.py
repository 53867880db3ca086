"""ChildTuningAdamW and ChildOptimizer against hand-written references."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import M64, mlp_names, py_keep_bits, step_side_by_side, twin_mlps

from childtune import ID3, ChildOptimizer, ChildTuningAdamW, ChildTuningF, FullFineTuning, RandomMasking

LR, BETAS, EPS, WD = 1e-2, (0.9, 0.999), 1e-6, 0.1


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in [(5, 7), (7,), (3, 2, 4)]]


def grads_for(step: int, params) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


def run(opt, params, steps: int = 2) -> None:
    for t in range(steps):
        for p, g in zip(params, grads_for(t, params), strict=True):
            p.grad = g.clone()
        opt.step()


def reference(params, masks_per_step, scale=1.0, strict=False, wd=WD, steps=2):
    """The authors' update written out for one tensor at a time, straight from their AdamW."""
    out = [p.detach().clone().double() for p in params]
    m = [torch.zeros_like(p) for p in out]
    v = [torch.zeros_like(p) for p in out]
    for t in range(steps):
        for i, g in enumerate(grads_for(t, params)):
            mask = masks_per_step[t][i]
            g = g.double() * (mask.double() * scale if mask is not None else 1.0)
            m[i] = BETAS[0] * m[i] + (1 - BETAS[0]) * g
            v[i] = BETAS[1] * v[i] + (1 - BETAS[1]) * g * g
            size = LR * math.sqrt(1 - BETAS[1] ** (t + 1)) / (1 - BETAS[0] ** (t + 1))
            update = size * m[i] / (v[i].sqrt() + EPS)
            keep = mask.double() if (strict and mask is not None) else 1.0
            out[i] = out[i] - update * keep
            out[i] = out[i] - LR * wd * out[i] * keep
    return out


def f_masks(seed: int, p: float, shapes, steps: int = 2):
    """Child-Tuning_F's documented draw keyed by a caller's generator: per step one 64-bit base from it,
    then each parameter's keyed hash (named by its index, as the drop-in names them), kept below p."""
    g = torch.Generator().manual_seed(seed)
    threshold = round(p * 2**32)
    out = []
    for _ in range(steps):
        base = int(torch.empty((), dtype=torch.int64).random_(generator=g)) & M64
        out.append([torch.tensor([py_keep_bits(j, base, str(i)) < threshold for j in range(math.prod(s))]).view(s)
                    for i, s in enumerate(shapes)])
    return out


@pytest.mark.parametrize("strict", [False, True])
def test_child_tuning_f_matches_reference_with_known_generator(strict):
    params, p = make_params(), 0.4
    opt = ChildTuningAdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, reserve_p=p,
                           mode="ChildTuning-F", generator=torch.Generator().manual_seed(7), strict=strict)
    expected = reference(params, f_masks(7, p, [q.shape for q in params]), scale=1 / p, strict=strict)
    run(opt, params)
    for got, want in zip(params, expected, strict=True):
        torch.testing.assert_close(got.detach().double(), want, rtol=1e-5, atol=1e-6)


def test_child_tuning_d_matches_reference_and_leaves_unmasked_params_full():
    params = make_params()
    g = torch.Generator().manual_seed(3)
    masks = {params[0]: torch.rand(params[0].shape, generator=g) < 0.3,
             params[2]: torch.rand(params[2].shape, generator=g) < 0.3}
    opt = ChildTuningAdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, mode="ChildTuning-D")
    opt.set_gradient_mask(masks)
    per_step = [[masks[params[0]], None, masks[params[2]]]] * 2
    expected = reference(params, per_step)
    start = params[0].detach().clone()
    run(opt, params)
    for got, want in zip(params, expected, strict=True):
        torch.testing.assert_close(got.detach().double(), want, rtol=1e-5, atol=1e-6)
    # the authors' decoupled decay still shrinks non-child weights: exactly (1 - lr*wd) per step
    outside = ~masks[params[0]]
    torch.testing.assert_close(params[0].detach()[outside], start[outside] * (1 - LR * WD) ** 2)


def test_child_tuning_d_strict_leaves_non_child_bit_identical():
    params = make_params()
    masks = {p: torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) < 0.5 for i, p in enumerate(params)}
    before = [p.detach().clone() for p in params]
    opt = ChildTuningAdamW(params, lr=LR, weight_decay=WD, mode="ChildTuning-D", strict=True)
    opt.set_gradient_mask(masks)
    run(opt, params, steps=3)
    for p, b in zip(params, before, strict=True):
        m = masks[p]
        assert torch.equal(p.detach()[~m], b[~m])
        assert (p.detach()[m] != b[m]).all()


@pytest.mark.parametrize(("lr", "wd", "eps"), [(1e-2, 0.0, 1e-8), (1e-4, 0.01, EPS), (2e-5, 0.1, EPS)])
def test_mode_none_equals_torch_adamw(lr, wd, eps):
    """Equal to float tolerance. Two documented differences stay below it at fine-tuning settings: the
    authors decay after the step and torch before it (lr^2 * wd per step), and they add eps to sqrt(v)
    before bias correction (an eps / sqrt(1 - beta2^t) term, which matters only at large lr * eps)."""
    ours, theirs = make_params(), make_params()
    run(ChildTuningAdamW(ours, lr=lr, eps=eps, weight_decay=wd, reserve_p=1.0), ours, steps=5)
    run(torch.optim.AdamW(theirs, lr=lr, eps=eps, weight_decay=wd), theirs, steps=5)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1.3e-6, atol=1e-7)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.7])
def test_f_masks_keep_fraction_and_rescale(p):
    param = torch.nn.Parameter(torch.zeros(400_000))
    opt = ChildTuningAdamW([param], lr=0.0, reserve_p=p, mode="ChildTuning-F", seed=1)
    param.grad = torch.ones_like(param)
    opt.step()
    grad = param.grad
    kept = grad != 0
    n = grad.numel()
    assert abs(kept.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    torch.testing.assert_close(grad[kept], torch.full_like(grad[kept], 1 / p))
    # unbiased: the masked gradient's mean is the original mean, within sampling error
    assert abs(grad.mean().item() - 1.0) < 5 * math.sqrt((1 - p) / (p * n))


def test_f_masks_reproducible_by_seed_and_step():
    def masks(seed, steps=3):
        param = torch.nn.Parameter(torch.zeros(1000))
        opt = ChildTuningAdamW([param], lr=0.0, reserve_p=0.5, mode="ChildTuning-F", seed=seed)
        out = []
        for _ in range(steps):
            param.grad = torch.ones_like(param)
            opt.step()
            out.append(param.grad != 0)
        return out

    a, b, c = masks(1), masks(1), masks(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_reserve_p_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="reserve_p"):
        ChildTuningAdamW(make_params(), reserve_p=bad, mode="ChildTuning-F")


def test_bad_masks_are_refused():
    params = make_params()
    opt = ChildTuningAdamW(params, mode="ChildTuning-D")
    with pytest.raises(ValueError, match="shape"):
        opt.set_gradient_mask({params[0]: torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(TypeError, match="dtype"):
        opt.set_gradient_mask({params[0]: torch.ones(params[0].shape)})
    with pytest.raises(ValueError, match="not in the optimizer"):
        opt.set_gradient_mask({torch.nn.Parameter(torch.zeros(2)): torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="mode"):
        ChildTuningAdamW(params, mode="ChildTuning-X")
    params[0].grad = torch.ones_like(params[0])
    with pytest.raises(RuntimeError, match="set_gradient_mask"):
        opt.step()


def test_child_optimizer_full_is_plain_adamw_bit_for_bit():
    """The inner AdamW defaults to torch's fused kernel (the fastest on CPU and CUDA); asked for, foreach."""
    for implementation, kwargs in (({"fused": True}, {}), ({"foreach": True}, {"foreach": True})):
        ours, theirs = make_params(), make_params()
        opt = ChildOptimizer({str(i): p for i, p in enumerate(ours)}, FullFineTuning(), lr=LR, weight_decay=WD,
                             **kwargs)
        assert all(opt.optimizer.defaults[k] for k in implementation)
        run(opt, ours, steps=3)
        run(torch.optim.AdamW(theirs, lr=LR, weight_decay=WD, **implementation), theirs, steps=3)
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("implementation", [{"fused": True}, {"foreach": True}, {"foreach": False}])
def test_strict_adamw_without_copies_leaves_non_child_weights_bit_for_bit(implementation):
    """Under a fixed child network, strict AdamW copies nothing: non-child weights (signed zeros included)
    keep their bits through steps with decay, and child weights follow the copy-and-restore path."""
    def params_with_zeros():
        params = make_params()
        with torch.no_grad():
            params[0][0, :3] = torch.tensor([0.0, -0.0, 0.0])
            params[2].view(-1)[:4] = -0.0
        return params

    fast, slow = params_with_zeros(), params_with_zeros()
    before = [p.detach().clone() for p in fast]
    opts = []
    for params in (fast, slow):
        strategy = RandomMasking(0.3, seed=4, always=())
        opts.append(ChildOptimizer({f"w{i}": p for i, p in enumerate(params)}, strategy, torch.optim.AdamW,
                                   strict=True, lr=LR, weight_decay=WD, **implementation))
    assert opts[0]._no_copy
    opts[1]._no_copy = False  # the general path: copy, step, restore
    run(opts[0], fast, steps=4)
    run(opts[1], slow, steps=4)
    chosen = opts[0].strategy.masks(0)
    for i, (a, b, start) in enumerate(zip(fast, slow, before, strict=True)):
        outside = ~chosen[f"w{i}"]
        assert torch.equal(a.detach()[outside].view(torch.int32), start[outside].view(torch.int32))
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
    assert (~chosen["w2"].view(-1)[:4]).any() and (~chosen["w0"][0, :3]).any()  # signed zeros outside, checked
    assert opts[0].param_groups[0]["weight_decay"] == WD  # restored after every step


def test_strict_with_per_step_masks_or_maximize_keeps_the_copy():
    params = make_params()
    named = {f"w{i}": p for i, p in enumerate(params)}
    assert not ChildOptimizer(named, ChildTuningF(0.5), strict=True, lr=LR)._no_copy
    assert not ChildOptimizer(named, RandomMasking(0.5, always=()), strict=True, lr=LR, maximize=True)._no_copy
    assert not ChildOptimizer(named, RandomMasking(0.5, always=()), torch.optim.Adam, strict=True, lr=LR,
                              weight_decay=0.1)._no_copy  # L2 decay puts gradient outside the child network


def test_child_optimizer_strict_random_mask_with_any_optimizer():
    params = make_params()
    named = {f"w{i}": p for i, p in enumerate(params)}
    before = {n: p.detach().clone() for n, p in named.items()}
    strategy = RandomMasking(0.25, seed=3, always=())
    opt = ChildOptimizer(named, strategy, torch.optim.SGD, strict=True, lr=0.1, momentum=0.9, weight_decay=0.1)
    run(opt, params, steps=3)
    chosen = strategy.masks(0)
    assert sum(int(m.sum()) for m in chosen.values()) == round(0.25 * sum(p.numel() for p in params))
    for n, p in named.items():
        assert torch.equal(p.detach()[~chosen[n]], before[n][~chosen[n]])
        assert (p.detach()[chosen[n]] != before[n][chosen[n]]).all()


def test_child_optimizer_is_an_optimizer_for_schedulers_and_round_trips_state():
    params = make_params()
    opt = ChildOptimizer({str(i): p for i, p in enumerate(params)}, RandomMasking(0.5, always=()), lr=LR)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=4)
    run(opt, params, steps=2)
    sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(LR * 0.625)
    state = opt.state_dict()
    fresh = ChildOptimizer({str(i): p for i, p in enumerate(params)}, RandomMasking(0.5, seed=9, always=()), lr=LR)
    fresh.load_state_dict(state)
    assert fresh.steps == 2
    assert all(torch.equal(fresh.strategy.chosen[n], opt.strategy.chosen[n]) for n in opt.strategy.chosen)
    torch.testing.assert_close(fresh.state[params[0]]["exp_avg"], opt.state[params[0]]["exp_avg"])


def test_f_with_a_callers_generator_resumes_its_stream():
    def opt_for(params):
        return ChildOptimizer({str(i): p for i, p in enumerate(params)},
                              ChildTuningF(0.5, generator=torch.Generator().manual_seed(5)), lr=LR)

    straight, resumed = make_params(), make_params()
    first = opt_for(straight)
    run(first, straight, steps=3)
    second = opt_for(resumed)
    run(second, resumed, steps=1)
    again = opt_for(resumed)
    again.load_state_dict(second.state_dict())
    for t in (1, 2):
        for p, g in zip(resumed, grads_for(t, resumed), strict=True):
            p.grad = g.clone()
        again.step()
    for a, b in zip(straight, resumed, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("block", [1 << 17, 5])
def test_f_applies_its_mask_in_one_pass_exactly_as_the_bool_mask(monkeypatch, block):
    """`mask_gradients_` reads the random lanes directly, block by block: the same draw as `masks(step)`,
    kept gradients scaled by exactly 1/p, dropped ones zero."""
    from childtune import kernels

    monkeypatch.setattr(kernels, "BLOCK", block)
    params = make_params()
    named = {f"w{i}": p for i, p in enumerate(params)}
    strategy = ChildTuningF(0.3, seed=5)
    strategy.bind(named)
    for step in (0, 7):
        grads = {n: g for n, g in zip(named, grads_for(step, params), strict=True)}
        expected = {n: g * m * strategy.scale for (n, g), m in zip(grads.items(), strategy.masks(step).values(),
                                                                   strict=True)}
        strategy.mask_gradients_(step, grads)
        for n, g in grads.items():
            assert torch.equal(g.view(torch.int32), expected[n].view(torch.int32)), n


@pytest.mark.parametrize("block", [1 << 17, 4])
def test_scale_where_equals_scaling_the_masked_elements(monkeypatch, block):
    from childtune import kernels

    monkeypatch.setattr(kernels, "BLOCK", block)
    g = torch.Generator().manual_seed(3)
    for shape, dtype in (((5, 7), torch.float32), ((11,), torch.bfloat16)):
        values = torch.randn(shape, generator=g).to(dtype)
        values.view(-1)[:3] = torch.tensor([0.0, -0.0, 0.0])
        mask = torch.rand(shape, generator=g) < 0.4
        expected = values.clone()
        expected[mask] = expected[mask] * (1 - 1e-3 * 0.01)
        kernels.scale_where_(values, mask, 1 - 1e-3 * 0.01)
        bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
        assert torch.equal(values.view(bits), expected.view(bits))
        kernels.scale_where_(values.t() if values.dim() == 2 else values, mask.t() if mask.dim() == 2 else mask, 1.0)
        assert torch.equal(values.view(bits), expected.view(bits))  # non-contiguous: whole tensors, same rule


@pytest.mark.parametrize("strategy", [lambda: ChildTuningF(0.4, seed=2), lambda: RandomMasking(0.3, seed=1, always=())])
def test_child_optimizer_in_backward_equals_the_ordinary_step(strategy):
    """Per-parameter updates inside backward: F's one draw per step read parameter by parameter, a fixed
    mask with the child-only decay; same weights as the whole-model step, every gradient freed at once."""
    model, twin = twin_mlps()
    strict = not isinstance(strategy(), ChildTuningF)
    ordinary = ChildOptimizer(mlp_names(model), strategy(), strict=strict, lr=LR, weight_decay=WD)
    hooked = ChildOptimizer(mlp_names(twin), strategy(), strict=strict, lr=LR, weight_decay=WD, in_backward=True)

    def same():
        for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
            assert torch.equal(a, b), name

    step_side_by_side(model, twin, ordinary, hooked, 4, same)
    with pytest.raises(ValueError, match="SparseChildAdamW"):
        ChildOptimizer(dict(twin.named_parameters()), ID3(3, total_steps=2), in_backward=True)
