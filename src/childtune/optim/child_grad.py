"""Child-only weight gradients: a Linear layer's backward that never forms the dense weight gradient.

A strict child network changes a fraction p of a weight, yet autograd's Linear backward computes the
whole dW = dY^T X (out x in: as large as the weight, and out * in * tokens multiply-adds) only for the
optimizer to gather p of it. For a fixed or growing child network the elements are known before
backward, so here backward computes dX densely as usual and the weight gradient at the child elements
only, a sampled dense-dense product (SDDMM):

    g[k] = sum_t dY[t, i_k] * X[t, j_k],        (i_k, j_k) = divmod(index[k], in_features)

over all tokens t (every leading dimension of X and dY flattened), for `index` the sorted flat indices of
the weight's child elements (int32; int64 only where the weight has 2^31 elements or more). The cost is
p * out * in * tokens multiply-adds and memory of p * out * in, in float32 for bfloat16 inputs (float32
sums of exact bfloat16 products: more accurate than autograd's bfloat16 dW, which is rounded). Bias
gradients stay dense through autograd (out_features values: cheap).

Two implementations: the compiled kernel `childtune.kernels.child_dot_` (CPU, float32 or bfloat16 inputs,
threaded over the elements, fixed summation order) and torch ops for any device or dtype
(`_child_dot_torch`: torch.sparse.sampled_addmm on the child elements as a CSR pattern, as RoSA uses spops'
`sddmm`). Both go through the tokens in blocks of bounded size (`BLOCK`). They agree to float32 rounding
(they sum in different orders); `CHILDTUNE_KERNELS=eager` forces the torch ops.

`ChildGrads(model, indices)` installs this on every nn.Linear whose weight has an index (a weight shared
by several Linear modules, or one module called twice, is one entry): autograd gets no gradient for the
weight from them, and `ChildGrads.grad(name)` holds the child gradient vector, summed over backwards
(gradient accumulation) and over the weight's uses in one graph (tied weights), until taken. The
weight's post-accumulate-grad hooks still run once per backward, after all its uses have delivered
(autograd runs a leaf's accumulation node once every path to it is done, a None gradient included), so
an optimizer steps there from the vector as it would from a dense `.grad`; tests/test_child_grad.py pins
that order. Uses outside nn.Linear modules (an embedding tied to the LM head) still accumulate a dense
`.grad` through autograd, which the consumer adds. `set_index` moves a weight to a grown index set,
carrying over what was accumulated, and `set_dense(True)` gives the following passes autograd's own dense
dW in `.grad` (a step that ranks whole gradients, such as ID3's growth steps) until `set_dense(False)`.
Install once the model is on its device (the indices are put on the weights' device then).

FSDP2 shards (DTensor weights, `childtune.shards`): the index given is of the rank's own rows, as its
masks and optimizer state are. Forward and backward see the whole weight, gathered by FSDP2, so the
site also keeps every rank's child elements as whole-weight indices (`shards.whole_index`, gathered at
install and at `set_index`: collective; so each rank holds every rank's child indices, 4 bytes per child
element of the model, where its masks and moments are its rows' alone). Backward computes the gradient
at all of them from this rank's batch, averages the vector over the ranks (one all-reduce of p of the
weight: what FSDP2's reduce-scatter does to a dense gradient, on p of its size) and keeps this rank's
part, aligned with its index. FSDP2 reduce-scatters and runs a sharded parameter's post-accumulate-grad
hooks (an optimizer stepping in backward) only for weights that got a dense gradient, so for these the
site runs those hooks itself from a post-accumulate-grad hook on the gathered weight, which autograd
runs once all its uses are done.
Not DDP, whose reducer waits for a dense gradient of every weight.

Read before writing this (nothing copied): SpIEL (Ansell et al. 2024, github.com/AlanAnsell/peft,
src/peft/tuners/sft/layer.py) keeps the same gather-and-dot backward for its sparse delta values
(`LinearWithSparseDelta`, rows of dY^T and columns of X picked by index) commented out, and trains
through a dense merged weight, so dense dW; RoSA (Nikdan et al. 2024, github.com/IST-DASLab/peft-rosa,
src/peft/tuners/rosa/spa_functions.py) takes its sparse adapter's gradient with spops' CUDA `sddmm` on CSR
indices inside a custom autograd Function.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.hooks import RemovableHandle

from childtune import kernels
from childtune.masks import check_index, index_dtype
from childtune.overlay import OverlayWeight, is_overlay
from childtune.shards import is_sharded, local, whole_index

BLOCK = 1 << 20
"""Values per token block: the block's dY^T and X^T together (as the kernel's contiguous copies or the
torch path's float32 casts) hold at most this many (4 MiB in float32), so the extra memory of a child-only
weight gradient is bounded whatever the number of tokens, where copying all of dY and X would exceed
dense dW's own out x in once tokens > out * in / (out + in)."""


def child_weight_grad(dy: torch.Tensor, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """g[k] = sum_t dY[t, i_k] * X[t, j_k], (i_k, j_k) = divmod(index[k], in_features): the gradient of
    `y = x @ W.T` at W's flat `index`, float32 (float64 for float64 inputs), summed block of tokens by
    block of tokens (`BLOCK`), each block by the compiled kernel where it takes the tensors, else by torch ops."""
    width = x.shape[-1]
    dy, x = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, width)
    out = torch.zeros(len(index), dtype=torch.promote_types(dy.dtype, torch.float32), device=dy.device)
    tokens = max(1, BLOCK // (dy.shape[1] + width))
    pattern = None
    for begin in range(0, dy.shape[0], tokens):
        rows, cols = dy[begin:begin + tokens].t(), x[begin:begin + tokens].t()
        if not kernels.child_dot_(out, rows, cols, index, width):
            pattern = _csr_pattern(index, dy.shape[1], width) if pattern is None else pattern
            _child_dot_torch(out, rows, cols, pattern)
    return out


def _csr_pattern(index: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The child elements as a CSR pattern of the (height x width) weight: row offsets and column indices."""
    crow = torch.zeros(height + 1, dtype=index.dtype, device=index.device)
    crow[1:] = torch.bincount(index // width, minlength=height).cumsum(0)
    return crow, index % width


def _child_dot_torch(out: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                     pattern: tuple[torch.Tensor, torch.Tensor]) -> None:
    """`out[k] += sum_t rows[i_k, t] * cols[j_k, t]` in torch ops, any device: torch.sparse.sampled_addmm,
    torch's own SDDMM (cuSPARSE on CUDA), with `out` as the values of the sampled matrix it adds to, the
    inputs cast to `out`'s dtype (it takes no bfloat16 on a CPU). Measured about 30x faster on a CPU
    (2048 x 2048, 512 tokens, 1%) than gathering the rows of dY^T and X^T for a batched dot product."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta", once per process: not the user's concern
        warnings.simplefilter("ignore", UserWarning)
        sampled = torch.sparse_csr_tensor(*pattern, out, (rows.shape[0], cols.shape[0]), check_invariants=False)
    out.copy_(torch.sparse.sampled_addmm(sampled, rows.to(out.dtype), cols.to(out.dtype).t()).values())


@dataclass(eq=False)
class _Site:
    """One weight under child-only gradients: its child index and the gradient accumulated at it. For an
    FSDP2 shard, `index` is of this rank's rows and `whole` of every rank's elements in the whole weight,
    this rank's at `part` of it (module docstring); unsharded, `whole` is `index`."""

    name: str
    param: nn.Parameter
    index: torch.Tensor
    whole: torch.Tensor
    part: slice
    grad: torch.Tensor | None = None
    dense: bool = False  # forward as plain nn.Linear: autograd's dense dW in `.grad` (`ChildGrads.set_dense`)
    hooked: weakref.ref[torch.Tensor] | None = None  # the gathered FSDP2 weight that runs `param`'s hooks
    handle: RemovableHandle | None = None

    def add(self, values: torch.Tensor, whole: torch.Tensor) -> None:
        """Backward's part: add one use's child gradient, computed at `whole` (the index of its forward);
        sharded, averaged over the ranks first, keeping this rank's part."""
        if whole is not self.whole:
            raise RuntimeError(f"the child index of {self.name!r} changed between forward and backward")
        if is_sharded(self.param):
            group = self.param.device_mesh.get_group()
            dist.all_reduce(values, group=group)
            values = values[self.part].div_(dist.get_world_size(group)).clone()
        self.grad = values if self.grad is None else self.grad.add_(values)

    def watch(self, gathered: torch.Tensor) -> None:
        """Sharded: run `param`'s post-accumulate-grad hooks once backward is done with `gathered`, the
        whole weight FSDP2 gave this forward (autograd runs a leaf's hooks with its gradient None too)."""
        if self.hooked is not None and self.hooked() is gathered:
            return
        if self.handle is not None:
            self.handle.remove()
        param = self.param
        self.handle = gathered.register_post_accumulate_grad_hook(lambda _: _run_hooks(param))
        self.hooked = weakref.ref(gathered)


def _run_hooks(param: torch.Tensor) -> None:
    """`param`'s post-accumulate-grad hooks, as FSDP2 runs them after its reduce-scatter (torch keeps them
    in `_post_accumulate_grad_hooks`; FSDP2's `foreach_reduce` calls them the same way)."""
    for hook in list((getattr(param, "_post_accumulate_grad_hooks", None) or {}).values()):
        hook(param)


class _ChildLinear(torch.autograd.Function):
    """y = x @ W.T + b, whose backward gives dX and db densely and W's gradient at its child index only
    (to its `_Site`, not to autograd: W.grad stays None). `dtype`: the autocast dtype x, W and b are cast
    to (None outside autocast), as autocast's own linear would. An `OverlayWeight` (a quantized base plus
    its child) is made dense for the product in forward and again in backward, never kept between them;
    with `site` None (an overlay weight outside child-only gradients) backward gives its dense dW."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, site: _Site | None,
                dtype: torch.dtype | None) -> torch.Tensor:  # ctx: Any, as torch types it (attributes set freely)
        w, b = _dense(weight, dtype), bias
        if dtype is not None:
            x = x.to(dtype)
            b = None if b is None else b.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(x, w, b)
        # x only where a weight gradient will be taken (a frozen quantized layer passes dX alone, as bitsandbytes'
        # own 4-bit product keeps no input for a frozen weight)
        taken = site is not None or ctx.needs_input_grad[1]
        ctx.save_for_backward(x if taken else None, None if is_overlay(weight) else weight)
        ctx.weight = weight if is_overlay(weight) else None  # (its base is no tensor autograd could save)
        ctx.site, ctx.whole, ctx.dtype = site, None if site is None else site.whole, dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None,
                                                      torch.Tensor | None, None, None]:
        x, weight = ctx.saved_tensors
        weight = ctx.weight if weight is None else weight
        dx = dy @ _dense(weight, ctx.dtype) if ctx.needs_input_grad[0] else None
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        dw = None
        if ctx.site is not None:
            ctx.site.add(child_weight_grad(dy, x, ctx.whole), ctx.whole)
        elif ctx.needs_input_grad[1]:  # an overlay weight's dense gradient (Fisher, a growth step)
            dw = (dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(dy.dtype)).to(weight.dtype)
        return dx, dw, db, None, None


def _dense(weight: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The weight for a product in `dtype` (None: its own): an overlay weight's dense form, else the weight."""
    if isinstance(weight, OverlayWeight):
        return weight.dense(dtype)
    return weight if dtype is None else weight.to(dtype)


def overlay_linear(x: torch.Tensor, weight: OverlayWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """The forward of a Linear layer whose weight is an `OverlayWeight` (`models/quantized.py`): without a
    gradient to take, a plain product with its dense form; else through `_ChildLinear`, which keeps no
    dense weight for backward, and takes the weight's gradient at its child elements where child-only
    gradients are installed (`weight.site`)."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    wanted = weight.requires_grad or x.requires_grad or (bias is not None and bias.requires_grad)
    if not (torch.is_grad_enabled() and wanted):
        w = weight.dense(dtype or x.dtype)
        return F.linear(x.to(w.dtype), w, None if bias is None else bias.to(w.dtype))
    site = weight.site if isinstance(weight.site, _Site) and not weight.site.dense and weight.requires_grad else None
    y: torch.Tensor = _ChildLinear.apply(x, weight, bias, site, dtype)  # type: ignore[no-untyped-call]
    return y


class ChildGrads:
    """Child-only weight gradients for a model's Linear weights named in `indices` (name -> sorted flat
    index tensor, or a bool mask). See the module docstring; `remove()` restores the plain forwards."""

    def __init__(self, model: nn.Module, indices: Mapping[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        unknown = set(indices) - set(params)
        if unknown:
            raise ValueError(f"no parameters named {sorted(unknown)} in the model")
        self.sites = {n: _Site(n, params[n], *_checked(n, params[n], i)) for n, i in indices.items()}
        by_param: dict[torch.Tensor, _Site] = {s.param: s for s in self.sites.values()}
        self._patched = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight in by_param]
        seen = {m.weight for m in self._patched} | {p for p in by_param if is_overlay(p)}
        if len(seen) < len(by_param):
            raise ValueError("child-only gradients are for nn.Linear weights; "
                             f"{sorted(s.name for p, s in by_param.items() if p not in seen)} are not")
        for module in self._patched:
            # an instance attribute over nn.Linear.forward (as `module.forward = ...` sets; `remove()` deletes it)
            vars(module)["forward"] = partial(_forward, module, by_param[module.weight])
        for param, site in by_param.items():
            if isinstance(param, OverlayWeight):  # its layer's forward (`overlay_linear`) reads the site there
                param.site = site

    def grad(self, name: str) -> torch.Tensor | None:
        """The child gradient of `name` accumulated so far (None before any backward reached it)."""
        return self.sites[name].grad

    def pop(self, name: str) -> torch.Tensor | None:
        """Take (and forget) the accumulated child gradient of `name`."""
        site = self.sites[name]
        grad, site.grad = site.grad, None
        return grad

    def zero_grad(self) -> None:
        """Forget every accumulated child gradient."""
        for site in self.sites.values():
            site.grad = None

    def set_index(self, name: str, index: torch.Tensor) -> None:
        """Move `name` to a new (grown) child index; a gradient accumulated at the old elements is kept
        at their positions in the new one, zero at the elements that joined."""
        site = self.sites[name]
        index, whole, part = _checked(name, site.param, index)
        if site.grad is not None:
            if not bool(torch.isin(site.index, index).all()):
                raise ValueError(f"the new child index of {name!r} drops elements holding an accumulated gradient")
            grad = site.grad.new_zeros(len(index))
            grad[torch.searchsorted(index, site.index)] = site.grad
            site.grad = grad
        site.index, site.whole, site.part = index, whole, part

    def set_dense(self, dense: bool) -> None:
        """From the next forward on, dense weight gradients in `.grad` (True) or child-only ones (False)."""
        for site in self.sites.values():
            site.dense = dense

    def remove(self) -> None:
        """Give the Linear modules back their own forward (weight gradients dense again)."""
        for module in self._patched:
            del module.forward
        self._patched = []
        for site in self.sites.values():
            if isinstance(site.param, OverlayWeight):
                site.param.site = None
            if site.handle is not None:
                site.handle.remove()


def _forward(module: nn.Linear, site: _Site, x: torch.Tensor) -> torch.Tensor:
    """The patched nn.Linear forward: the child-only Function where a gradient will be taken."""
    if site.dense or not (torch.is_grad_enabled() and site.param.requires_grad):
        return F.linear(x, module.weight, module.bias)
    if module.weight is not site.param:  # FSDP2's gathered whole weight, in forward and backward
        site.watch(module.weight)
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    # torch leaves Function.apply unannotated; it returns what forward returns
    y: torch.Tensor = _ChildLinear.apply(x, module.weight, module.bias, site, dtype)  # type: ignore[no-untyped-call]
    return y


def _checked(name: str, param: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, slice]:
    """`index` (or a bool mask's) as sorted, distinct flat indices into `param` (`masks.check_index`; into
    this rank's rows of an FSDP2 shard), every rank's as indices into the whole weight, and where this
    rank's sit among those (`_Site`; collective for a shard)."""
    index = check_index(name, local(param), index)
    whole, part = whole_index(index, param)
    return index, whole.to(index_dtype(param.numel())), part
