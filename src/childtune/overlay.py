"""A weight held as a frozen base in another form (4- or 8-bit) plus its child elements in fp32.

childtune updates a child network in place: the optimizer writes the new values into the weight. A
quantized base cannot hold them (a 4-bit NF4 code has 16 values), so such a weight is an `OverlayWeight`:

- the frozen base, as whatever can rebuild it densely (`base()`: bitsandbytes' dequantisation, in
  `models/quantized.py`); nothing in childtune reads its packed form;
- the child elements' values in float32 (`child_index`, `child_values`: the sparse optimizer's own fp32 masters,
  shared, not copied, so an update is the write-back), added over the dequantised base in forward;
- elements that left a moving child network (`kept_index`, `kept_values`): a weight keeps the value an
  element reached when it leaves, as a dense weight would.

The Parameter itself has the weight's shape and dtype, so child networks (`name -> flat indices`),
strategies, optimizer groups, the per-layer analysis and dense gradients (Fisher, ID3's growth steps,
delivered to `.grad` in that shape) see an ordinary weight. Its storage is one NaN element expanded to
that shape: writing into it in place raises (torch refuses in-place arithmetic, `copy_` and `index_copy_`
on a tensor whose elements share one memory location; `index_put_` only warns), and reading it gives
NaN, so a caller that forgot the overlay fails loudly instead of training on garbage. Readers of values
call `dense()`, `at()` or `values_of()`; the optimizer writes through `overlay()`.

Read before writing this (nothing copied): SpIEL (github.com/AlanAnsell/peft, src/peft/tuners/sft/layer.py)
holds a sparse delta's fp32 values and indices beside a bitsandbytes `Params4bit` weight and adds them to the
dequantised weight in forward and backward; RoSA's QRoSA (github.com/IST-DASLab/peft-rosa) does the same
with a CSR sparse adapter. Both keep the delta apart from the base, as here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class OverlayWeight(nn.Parameter):
    """A weight of `shape` whose values are `base()` with `child_values` at flat `child_index` (module docstring).
    Its own names avoid Tensor's (`index`, `values`, `gather` are tensor methods torch may call).

    `site` is set by `optim.child_grad.ChildGrads` while backward delivers this weight's gradient at its
    child elements only; without it, backward gives a dense `.grad` of the weight's shape."""

    base: Callable[[], torch.Tensor]
    child_index: torch.Tensor
    child_values: torch.Tensor
    kept_index: torch.Tensor
    kept_values: torch.Tensor
    site: object | None

    def __new__(cls, shape: tuple[int, int], dtype: torch.dtype, base: Callable[[], torch.Tensor],
                device: torch.device | str = "cpu") -> OverlayWeight:
        data = torch.full((1,), float("nan"), dtype=dtype, device=device).expand(shape)
        weight = super().__new__(cls, data, requires_grad=True)
        weight.base = base
        empty = torch.zeros(0, dtype=torch.long, device=device)
        weight.child_index, weight.child_values = empty, torch.zeros(0, device=device)
        weight.kept_index, weight.kept_values = empty, weight.child_values
        weight.site = None
        return weight

    def __deepcopy__(self, memo: dict) -> OverlayWeight:
        raise TypeError("an OverlayWeight shares its base with a quantized module; copy the module's delta instead")

    def __reduce_ex__(self, protocol: object) -> tuple[object, ...]:  # torch.save: its base is no tensor
        raise TypeError("an OverlayWeight is not saved whole: save the run's delta (values against the unquantized "
                        "base) instead")

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a dense tensor (in `dtype`, default the weight's own): the dequantised base with the
        elements that left and the child elements written over it."""
        dtype = dtype or self.dtype
        weight = self.base().to(dtype)
        flat = weight.view(-1)
        for index, values in ((self.kept_index, self.kept_values), (self.child_index, self.child_values)):
            if len(index):
                flat.index_copy_(0, index.long(), values.to(dtype))
        return weight

    def at(self, index: torch.Tensor) -> torch.Tensor:
        """The weight's values at flat `index`, float32: a child element's own fp32 value, else the base's."""
        index = index.long()
        out = self.base().reshape(-1).index_select(0, index).float()
        for held, values in ((self.kept_index, self.kept_values), (self.child_index, self.child_values)):
            if len(held):
                order = torch.argsort(held)
                sorted_held = held.long()[order]
                pos = torch.searchsorted(sorted_held, index).clamp_(max=len(held) - 1)
                hit = sorted_held[pos] == index
                out[hit] = values[order[pos[hit]]].float()
        return out

    def overlay(self, index: torch.Tensor, values: torch.Tensor) -> None:
        """Make (`index`, `values`) the child elements (fp32, held by reference: the optimizer's masters). An
        element of the previous child network that is not in `index` keeps its last value (a moving network's
        leaver), so the weight is exactly what in-place updates would have left."""
        if self.child_index is not index and len(self.child_index):
            left = ~torch.isin(self.child_index, index)
            if left.any():
                keep = ~torch.isin(self.kept_index, self.child_index[left])
                self.kept_index = torch.cat([self.kept_index[keep], self.child_index[left].long()])
                self.kept_values = torch.cat([self.kept_values[keep], self.child_values[left].float()])
            # an element that came back is the child's again
            back = torch.isin(self.kept_index, index)
            if back.any():
                self.kept_index, self.kept_values = self.kept_index[~back], self.kept_values[~back]
        self.child_index, self.child_values = index, values

    def changed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every element whose value is its own rather than the base's (the child and the leavers), as sorted flat
        indices and their float32 values: what a delta against the base stores."""
        index = torch.cat([self.kept_index, self.child_index.long()])
        values = torch.cat([self.kept_values, self.child_values.float()])
        order = torch.argsort(index)
        return index[order], values[order]


def is_overlay(param: torch.Tensor) -> bool:
    return isinstance(param, OverlayWeight)


def values_of(param: torch.Tensor) -> torch.Tensor:
    """A parameter's values as a tensor of its shape: an overlay weight's dense form, else the parameter."""
    return param.dense() if isinstance(param, OverlayWeight) else param


def elements(param: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A parameter's values at flat `index`, float32 (an overlay weight's own where it has them)."""
    if isinstance(param, OverlayWeight):
        return param.at(index)
    return param.detach().reshape(-1).index_select(0, index.long()).float()
