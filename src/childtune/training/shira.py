"""A sparse delta as a peft SHiRA adapter: the child network, loadable where peft is all users have.

SHiRA (Sparse High Rank Adapters, peft's `tuners/shira/`) keeps, per adapted `nn.Linear`, a value vector
and its (row, column) indices, and adds the sparse matrix they make to the frozen weight in forward: a
Child-Tuning delta restricted to Linear weights is exactly that. Two rules of peft 0.21's SHiRA shape
the export (read in `peft/tuners/shira/{layer,model,config}.py`):

* Every adapted layer holds exactly `r * (in + out)` values, one `r` for the whole adapter, and at most
  `in * out`. A child network picks different counts per layer, so `r` is the smallest that holds the
  densest layer, and each layer's vector is padded with zero-valued entries at weights outside its child
  network: the adapter's output is unchanged, its file grows by the padding (reported). A layer too
  dense for that `r` to fit (`r * (in + out) > in * out`) is saved whole instead, as below.
* Only Linear weights are adapted. Everything else the delta changes (norms, biases, embeddings, Conv1D,
  the task head) is saved whole through peft's `modules_to_save`. A module whose weight is tied to
  another (SmolLM2's embeddings and LM head) cannot be: peft would copy it and cut the tie, so such a
  delta is refused with the tensor named; `childtune apply` serves it exactly instead.

On loading, peft builds each layer from the config's random mask of the same size and then replaces its
indices with the saved ones, so `PeftModel.from_pretrained(base, folder)` reproduces apply's outputs
(equal up to float rounding of `base + (tuned - base)`; apply is bit-exact).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from childtune.delta import DeltaError, SparseDelta, fingerprint
from childtune.models import quantized
from childtune.training.models import quiet_transformers


@dataclass(frozen=True)
class ShiraPlan:
    """Which module goes where: SHiRA targets (name -> changed flat indices) at rank `r`, the rest whole."""

    r: int
    targets: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, int]]  # (in_features, out_features) of each target
    whole: tuple[str, ...]

    @property
    def stored(self) -> int:
        """Values the adapter holds for its SHiRA layers: their changed weights plus the zero padding."""
        return sum(self.r * sum(shape) for shape in self.shapes.values())

    @property
    def changed(self) -> int:
        return sum(idx.numel() for idx in self.targets.values())


def _module_of(name: str) -> tuple[str, str]:
    module, _, leaf = name.rpartition(".")
    return module, leaf


def plan(delta: SparseDelta, model: nn.Module) -> ShiraPlan:
    """Split what `delta` changes into SHiRA layers and whole modules, choosing `r` (module docstring)."""
    modules = dict(model.named_modules())
    tied = _tied_names(model)
    linear: dict[str, torch.Tensor] = {}
    whole: set[str] = set()
    for name, entry in delta.entries.items():
        module, leaf = _module_of(name)
        if isinstance(modules.get(module), nn.Linear) and leaf == "weight" and name not in tied:
            linear[module] = entry.indices
        else:
            whole.add(module)
    whole |= {_module_of(name)[0] for name in delta.dense}
    biased = sorted(whole & linear.keys())
    for module in biased:  # a Linear whose bias changed too is saved whole: SHiRA adapts weights only
        del linear[module]
    shapes = {m: (modules[m].in_features, modules[m].out_features) for m in linear}
    while linear:
        need = {m: math.ceil(idx.numel() / sum(shapes[m])) for m, idx in linear.items()}
        r = max(need.values())
        too_dense = [m for m in linear if r * sum(shapes[m]) > math.prod(shapes[m])]
        if not too_dense:
            break
        worst = max(too_dense, key=lambda m: need[m])
        whole.add(worst)
        del linear[worst], shapes[worst]
    else:
        why = f" ({len(biased)} of them changed their bias too, which SHiRA cannot adapt)" if biased else ""
        raise DeltaError(f"the delta changes no Linear weight that SHiRA can hold sparsely{why}: it would save "
                         "every changed module whole. Use the sparse delta and `childtune apply`, or train a child "
                         "network of Linear weights only (e.g. --method random --random-targets qv)")
    bad = sorted(m for m in whole if any(f"{m}.{leaf}" in tied for leaf in ("weight", "bias")))
    if bad:
        raise DeltaError(f"the delta changes {bad[0]}, whose weight is tied to another module; peft's "
                         "modules_to_save would cut the tie. Export the sparse delta and use `childtune apply`, or "
                         "train with that module frozen")
    return ShiraPlan(r=r, targets=linear, shapes=shapes, whole=tuple(sorted(whole)))


def _tied_names(model: nn.Module) -> set[str]:
    """Parameter names that share their storage with another parameter."""
    by_storage: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_storage.setdefault(p.untyped_storage().data_ptr(), []).append(name)
    return {n for names in by_storage.values() if len(names) > 1 for n in names}


def _padded(indices: torch.Tensor, shape: tuple[int, int], size: int) -> torch.Tensor:
    """A 0/1 mask of `shape` (out x in) holding `indices` plus the first free weights, `size` ones in all."""
    mask = torch.zeros(math.prod(shape), dtype=torch.bool)
    mask[indices] = True
    free = (~mask).nonzero().squeeze(1)[: size - indices.numel()]
    mask[free] = True
    return mask.view(shape)


def write_shira(delta: SparseDelta, base: nn.Module, work: str | os.PathLike[str], base_path: str) -> ShiraPlan:
    """Write `delta` as a peft SHiRA adapter for `base` (an untouched base model) into `work`.

    `base` is consumed: its whole-saved modules are set to their tuned values before peft copies them.
    """
    with quantized.offline_bitsandbytes():  # peft imports bitsandbytes wherever it is installed
        from peft import ShiraConfig, get_peft_model

    shira_plan = plan(delta, base)
    state = base.state_dict()
    if fingerprint(state, delta.config.dense_patterns) != delta.config.base_fingerprint:
        raise DeltaError(f"wrong base model: {base_path} is not the model this delta was made on "
                         f"({delta.config.base_model or 'unnamed'})")
    wanted = [n for n in state if _module_of(n)[0] in shira_plan.whole]
    scratch = {n: state[n].clone() for n in {*delta.entries, *delta.dense}}
    delta.apply(scratch, check_base=False)  # the base was checked above, on the whole model
    with torch.no_grad():
        for name in wanted:
            state[name].copy_(scratch[name])
    masks: dict[str, torch.Tensor] = {}
    values: dict[str, torch.Tensor] = {}
    for module, indices in shira_plan.targets.items():
        in_f, out_f = shira_plan.shapes[module]
        masks[module] = _padded(indices, (out_f, in_f), shira_plan.r * (in_f + out_f))
        flat = masks[module].view(-1).nonzero().squeeze(1)  # peft's order: row-major, as torch.where gives it
        values[module] = torch.zeros(flat.numel())
        values[module][torch.searchsorted(flat, indices)] = delta.entries[f"{module}.weight"].values.float()
    by_layer = {id(base.get_submodule(m)): mask for m, mask in masks.items()}

    def mask_fn(layer: nn.Module, r: int, **_kwargs: Any) -> torch.Tensor:
        weight = layer.weight
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"SHiRA masks a module's weight tensor; {type(layer).__name__} has none")
        return by_layer[id(layer)].to(device=weight.device, dtype=weight.dtype)

    config = ShiraConfig(r=shira_plan.r, target_modules=sorted(shira_plan.targets),
                         modules_to_save=list(shira_plan.whole) or None, base_model_name_or_path=base_path)
    config.mask_fn = mask_fn
    with quiet_transformers():
        model = get_peft_model(base, config)
    with torch.no_grad():
        for module, vector in values.items():
            shira_weight = model.get_submodule(f"base_model.model.{module}").shira_weight
            if not isinstance(shira_weight, nn.ParameterDict):  # peft's ShiraLayer holds one per adapter
                raise TypeError(f"peft did not make {module!r} a SHiRA layer")
            weight = shira_weight["default"]
            weight.copy_(vector.to(weight.dtype))
        model.save_pretrained(os.fspath(work))
    return shira_plan
