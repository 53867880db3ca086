"""Child-only weight gradients (optim/child_grad.py) against dense autograd, compiled and torch-ops paths.

Tolerances: float32 inputs, the child gradient equals dense dW gathered at the index to float32 rounding
of a sum in another order (rtol 1e-5, atol 1e-6); bfloat16 inputs, it equals the float64 sum of the same
bfloat16 products to float32 rounding (rtol 1e-5), and autograd's bfloat16 dW to bfloat16 rounding
(rtol 2^-7). dX and the bias gradient are autograd's, bit for bit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from childtune import kernels
from childtune.masks import to_index
from childtune.optim import SparseChildAdamW
from childtune.optim.child_grad import ChildGrads, child_weight_grad
from childtune.strategies import ID3, GradualUnfreezing, RandomMasking, Strategy

FP32 = dict(rtol=1e-5, atol=1e-6)


def mlp(seed: int = 0, dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 4, bias=False)).to(dtype)


def masks_for(model: nn.Module, p: float = 0.4, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(w.shape, generator=g) < p for n, w in model.named_parameters() if n.endswith("weight")}


def twins(masks_p: float = 0.4, dtype=torch.float32):
    """(model with child-only gradients, its ChildGrads, an identical dense model, the masks)."""
    child, dense = mlp(dtype=dtype), mlp(dtype=dtype)
    masks = masks_for(child, masks_p)
    return child, ChildGrads(child, masks), dense, masks


def record_hooks(grads: ChildGrads) -> list[tuple[str, torch.Tensor | None, torch.Tensor | None]]:
    """Each weight's post-accumulate-grad hook calls, with `.grad` and a copy of the child gradient then."""
    calls = []
    for name, site in grads.sites.items():
        def hook(param, name=name):
            child = grads.grad(name)
            calls.append((name, param.grad, None if child is None else child.clone()))
        site.param.register_post_accumulate_grad_hook(hook)
    return calls


def backward_both(child, dense, x, loss=lambda y: (y * torch.arange(y.shape[-1], dtype=y.dtype)).sum()):
    """One backward of each model on the same input; returns the two inputs' gradients."""
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss(child(a)).backward()
    loss(dense(b)).backward()
    return a.grad, b.grad


def assert_matches_dense(child, grads, dense, masks, **tol):
    for name, mask in masks.items():
        assert child.get_parameter(name).grad is None  # never a dense dW
        torch.testing.assert_close(grads.grad(name), dense.get_parameter(name).grad[mask].float(), **tol)
    for name, param in child.named_parameters():
        if name not in masks:
            torch.testing.assert_close(param.grad, dense.get_parameter(name).grad, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(9, 7), (2, 5, 7)], ids=["tokens", "batch-seq"])
def test_child_gradient_is_dense_dw_at_the_index_and_dx_is_dense(backend, shape):
    child, grads, dense, masks = twins()
    dx, want = backward_both(child, dense, torch.randn(shape))
    torch.testing.assert_close(dx, want, rtol=0, atol=0)
    assert_matches_dense(child, grads, dense, masks, **FP32)
    assert grads.sites["0.weight"].index.dtype == torch.int32


def test_bf16_inputs_sum_in_fp32(backend):
    child, grads, dense, masks = twins(dtype=torch.bfloat16)
    x = torch.randn(3, 11, 7).bfloat16()
    dx, want = backward_both(child, dense, x)
    torch.testing.assert_close(dx, want, rtol=0, atol=0)
    assert_matches_dense(child, grads, dense, masks, rtol=2**-7, atol=1e-2)
    # against the float64 sum of the same bfloat16 products: float32 rounding only
    layer = child[2]
    with torch.no_grad():
        h = torch.tanh(child[0](x)).double()
    dy = torch.arange(4, dtype=torch.float64).expand(3, 11, 4)
    exact = (dy.reshape(-1, 4).t() @ h.reshape(-1, 6)).reshape(-1)[to_index(masks["2.weight"]).long()]
    assert layer.weight.grad is None
    torch.testing.assert_close(grads.grad("2.weight").double(), exact, rtol=1e-5, atol=1e-5)
    assert grads.grad("2.weight").dtype == torch.float32


def test_gradients_accumulate_over_backwards():
    child, grads, dense, masks = twins()
    for seed in range(2):
        backward_both(child, dense, torch.randn(4, 7, generator=torch.Generator().manual_seed(seed)))
    assert_matches_dense(child, grads, dense, masks, **FP32)
    assert grads.pop("0.weight") is not None and grads.grad("0.weight") is None


def test_a_growing_index_keeps_what_was_accumulated_and_matches_dense_after_growing():
    child, grads, dense, masks = twins(masks_p=0.2)
    backward_both(child, dense, torch.randn(4, 7))
    grown = {n: m | (torch.rand(m.shape, generator=torch.Generator().manual_seed(9)) < 0.3) for n, m in masks.items()}
    for name, mask in grown.items():
        grads.set_index(name, mask)
        kept = dense.get_parameter(name).grad * masks[name]  # the joiners' accumulated gradient is zero
        torch.testing.assert_close(grads.grad(name), kept[mask], **FP32)
    with pytest.raises(ValueError, match="drops elements"):
        grads.set_index("0.weight", masks["0.weight"])
    grads.zero_grad()
    child.zero_grad()
    dense.zero_grad()
    backward_both(child, dense, torch.randn(4, 7))
    assert_matches_dense(child, grads, dense, grown, **FP32)


def test_a_weight_used_twice_sums_both_uses_and_its_hook_runs_once_after_both():
    torch.manual_seed(0)
    child = nn.Linear(5, 5)
    dense = copy.deepcopy(child)
    mask = torch.rand(5, 5) < 0.5
    grads = ChildGrads(child, {"weight": mask})
    calls = record_hooks(grads)
    twice = lambda m: (lambda x: m(torch.tanh(m(x))))  # noqa: E731
    dx, want = backward_both(twice(child), twice(dense), torch.randn(3, 5))
    torch.testing.assert_close(dx, want, **FP32)
    [(name, grad, at_hook)] = calls  # once, with no dense gradient, both uses already in
    assert name == "weight" and grad is None
    torch.testing.assert_close(at_hook, dense.weight.grad[mask], **FP32)
    torch.testing.assert_close(grads.grad("weight"), dense.weight.grad[mask], **FP32)


def test_a_weight_shared_by_two_modules_is_one_entry():
    torch.manual_seed(0)
    child = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    child[2].weight = child[0].weight  # tied: named_parameters lists it once
    dense = copy.deepcopy(child)
    mask = torch.rand(4, 4) < 0.5
    grads = ChildGrads(child, {"0.weight": mask})
    calls = record_hooks(grads)
    backward_both(child, dense, torch.randn(6, 4))
    torch.testing.assert_close(grads.grad("0.weight"), dense[0].weight.grad[mask], **FP32)
    [(_, grad, at_hook)] = calls
    assert grad is None and child[0].weight.grad is None
    torch.testing.assert_close(at_hook, dense[0].weight.grad[mask], **FP32)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_delivers_each_use_once(reentrant):
    from torch.utils.checkpoint import checkpoint

    child, grads, dense, masks = twins()
    wrapped = lambda m: (lambda x: checkpoint(m, x, use_reentrant=reentrant))  # noqa: E731
    dx, want = backward_both(wrapped(child), wrapped(dense), torch.randn(4, 7))
    torch.testing.assert_close(dx, want, rtol=0, atol=0)
    assert_matches_dense(child, grads, dense, masks, **FP32)


def test_bf16_cpu_autocast_casts_as_autocast_does(backend):
    child, grads, dense, masks = twins()
    x = torch.randn(2, 6, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dx, want = backward_both(child, dense, x, loss=lambda y: y.float().square().sum())
    torch.testing.assert_close(dx, want, rtol=0, atol=0)
    assert_matches_dense(child, grads, dense, masks, rtol=2**-7, atol=1e-2)


def test_an_empty_index_gives_an_empty_gradient_and_dense_dx(backend):
    child, dense = mlp(), mlp()
    empty = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in child.named_parameters() if n.endswith("weight")}
    grads = ChildGrads(child, empty)
    calls = record_hooks(grads)
    dx, want = backward_both(child, dense, torch.randn(4, 7))
    torch.testing.assert_close(dx, want, rtol=0, atol=0)
    assert all(grads.grad(n).shape == (0,) for n in empty)
    assert sorted(name for name, _, at_hook in calls if at_hook is not None) == sorted(empty)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_the_compiled_kernel_and_the_torch_ops_agree(monkeypatch, dtype, index_dtype):
    g = torch.Generator().manual_seed(3)
    dy, x = torch.randn(37, 19, generator=g).to(dtype), torch.randn(37, 23, generator=g).to(dtype)
    index = (torch.rand(19 * 23, generator=g) < 0.3).nonzero().squeeze(1).to(index_dtype)
    monkeypatch.delenv("CHILDTUNE_KERNELS", raising=False)
    assert kernels.child_dot_(torch.zeros(len(index)), dy.t(), x.t(), index, 23)
    compiled = child_weight_grad(dy, x, index)
    monkeypatch.setenv("CHILDTUNE_KERNELS", "eager")
    eager = child_weight_grad(dy, x, index)
    exact = (dy.double().t() @ x.double()).reshape(-1)[index.long()]
    torch.testing.assert_close(compiled, eager, **FP32)
    torch.testing.assert_close(compiled.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_dtypes_the_kernel_does_not_take_go_through_torch_ops(dtype):
    g = torch.Generator().manual_seed(4)
    dy, x = torch.randn(6, 3, 9, generator=g).to(dtype), torch.randn(6, 3, 5, generator=g).to(dtype)
    index = torch.tensor([0, 4, 5, 17, 44], dtype=torch.int32)
    exact = (dy.double().reshape(-1, 9).t() @ x.double().reshape(-1, 5)).reshape(-1)[index.long()]
    got = child_weight_grad(dy, x, index)
    assert got.dtype == torch.promote_types(dtype, torch.float32)
    torch.testing.assert_close(got.double(), exact, rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=1e-6)


@pytest.mark.parametrize("block", [16, 66], ids=["one-token-blocks", "three-token-blocks"])
def test_blocks_of_tokens_give_the_same_result(backend, monkeypatch, block):
    from childtune.optim import child_grad

    dy, x = torch.randn(8, 10), torch.randn(8, 12)
    index = torch.arange(0, 120, 7, dtype=torch.int32)
    whole = child_weight_grad(dy, x, index)
    monkeypatch.setattr(child_grad, "BLOCK", block)  # (10 + 12) values a token: blocks of 1, or 3, 3, 2 tokens
    torch.testing.assert_close(child_weight_grad(dy, x, index), whole, **FP32)


def test_bad_indices_and_non_linear_weights_are_refused():
    model = mlp()
    with pytest.raises(ValueError, match="sorted, distinct"):
        ChildGrads(model, {"0.weight": torch.tensor([3, 1])})
    with pytest.raises(ValueError, match="sorted, distinct"):
        ChildGrads(model, {"0.weight": torch.tensor([0, 42])})
    with pytest.raises(ValueError, match=r"nn\.Linear weights"):
        ChildGrads(model, {"0.bias": torch.tensor([0])})


def test_an_index_changed_between_forward_and_backward_is_refused():
    child, grads, _, masks = twins()
    y = child(torch.randn(3, 7)).sum()
    grads.set_index("2.weight", torch.ones_like(masks["2.weight"]))
    with pytest.raises(RuntimeError, match="changed between forward and backward"):
        y.backward()


def test_remove_restores_dense_weight_gradients():
    child, grads, dense, masks = twins()
    grads.remove()
    backward_both(child, dense, torch.randn(4, 7))
    for name in masks:
        torch.testing.assert_close(child.get_parameter(name).grad, dense.get_parameter(name).grad, rtol=0, atol=0)


class TiedLM(nn.Module):
    """Token embedding tied to the output Linear: the weight is used in and outside nn.Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.mid, self.out = nn.Embedding(11, 6), nn.Linear(6, 6), nn.Linear(6, 11, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mid(self.embed(tokens))))


def mlp3() -> nn.Module:
    return nn.Sequential(nn.Linear(7, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))


MODELS = {  # name: (model, its child-only weights, a batch for step t)
    "mlp": (mlp3, ["0.weight", "2.weight", "4.weight"],
            lambda t: torch.randn(5, 7, generator=torch.Generator().manual_seed(t))),
    "tied-embedding": (TiedLM, ["embed.weight", "mid.weight"],
                       lambda t: torch.randint(11, (2, 4), generator=torch.Generator().manual_seed(t))),
}


def trained(model_name: str, child_only: bool, *, in_backward: bool = False, micro: int = 1,
            steps: int = 4, dtype: torch.dtype = torch.float32,
            strategy: Callable[[], Strategy] = lambda: RandomMasking(0.3, seed=2, always=())) -> nn.Module:
    """A model after `steps` updates of SparseChildAdamW under `strategy`'s child network (by default a
    fixed random one), with `micro` micro-batches per update; dense weight gradients, or child-only ones
    (`child_only_grads`; dense on an ID3 growth step)."""
    make, names, batch = MODELS[model_name]
    torch.manual_seed(0)
    model = make().to(dtype)
    opt = SparseChildAdamW(model.named_parameters(), strategy(), lr=1e-2, weight_decay=0.1, in_backward=in_backward)
    if child_only:
        assert sorted(opt.child_only_grads(model).sites) == names
    for step in range(steps):
        for m in range(micro):
            opt.accumulating = in_backward and m < micro - 1
            inputs = batch(10 * step + m)
            model(inputs.to(dtype) if inputs.is_floating_point() else inputs).float().square().mean().backward()
        grows = isinstance(opt.strategy, ID3) and opt.strategy.dense_gradients_at(step)
        if child_only and model_name == "mlp" and not grows:
            assert all(model.get_parameter(n).grad is None for n in names)
        opt.step()
        opt.zero_grad()
    return model


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("in_backward", [False, True], ids=["step", "in-backward"])
@pytest.mark.parametrize("micro", [1, 2], ids=["one-batch", "accumulated"])
def test_sparse_adamw_steps_from_child_only_gradients_as_from_dense_ones(backend, model_name, in_backward, micro):
    dense = trained(model_name, False, in_backward=in_backward, micro=micro)
    child = trained(model_name, True, in_backward=in_backward, micro=micro)
    for (name, a), b in zip(dense.named_parameters(), child.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    before = trained(model_name, False, steps=0)
    assert all(not torch.equal(a, b) for a, b in zip(dense.parameters(), before.parameters(), strict=True))


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize(("in_backward", "micro"), [(False, 1), (False, 2), (True, 1)],
                         ids=["step", "step-accumulated", "in-backward"])
@pytest.mark.parametrize("every", [3, 1])
def test_id3_growing_every_k_steps_trains_from_child_only_gradients_as_from_dense_ones(
        backend, model_name, in_backward, micro, every):
    """ID3 grows at steps 0, 3 and 6 of 7 (every=3): those steps run with dense gradients, the others with
    child-only ones at the grown index, read in the state's join order; the same growth and the same
    updates as the run with dense gradients on every step, to float32 rounding (every=1: dense throughout)."""
    def id3() -> ID3:
        return ID3(30, total_steps=7, every=every)
    dense = trained(model_name, False, in_backward=in_backward, micro=micro, steps=7, strategy=id3)
    child = trained(model_name, True, in_backward=in_backward, micro=micro, steps=7, strategy=id3)
    before = trained(model_name, False, steps=0)
    for (name, a), b, c in zip(dense.named_parameters(), child.parameters(), before.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(a != c, b != c), name  # the same elements moved: the same growth


def test_bf16_weights_step_their_fp32_masters_from_fp32_child_gradients(backend):
    """The child-only gradient is the float32 sum (the dense path's is rounded to bfloat16 first), so the
    two agree to a bfloat16 step's rounding, not bit for bit."""
    dense = trained("mlp", False, dtype=torch.bfloat16)
    child = trained("mlp", True, dtype=torch.bfloat16)
    for a, b in zip(dense.parameters(), child.parameters(), strict=True):
        assert b.dtype == torch.bfloat16
        torch.testing.assert_close(b, a, rtol=2**-7, atol=2e-3)


def test_child_only_gradients_need_a_fixed_child_network():
    model = mlp()
    opt = SparseChildAdamW(model.named_parameters(), GradualUnfreezing(2))
    with pytest.raises(ValueError, match="fixed or dynamic child network or ID3"):
        opt.child_only_grads(model)
