"""Per-example squared gradients (the definition of Fisher information), three ways, fastest first.

1. **By layer** (`"layers"`): one forward and one backward of the whole batch, as for the per-batch
   estimate, with the weight gradients taken apart by example. A forward hook keeps the input x of every
   module that holds scored parameters; one `autograd.grad` gives the gradient g of the summed
   log-likelihood at each such module's output, which for example i is the gradient of its own
   log-likelihood (examples do not mix in a transformer's forward). A Linear weight's gradient for
   example i is then g_i^T x_i over i's positions: one small matrix product per example into a reused
   buffer, squared into the score at once, so a batch's per-example gradients never exist together
   (torch.func's batched product writes them all, which costs more than the products). Any other module
   (LayerNorm, RMSNorm, ...) gets its parameters' per-example gradients from torch.func on that module
   alone (vmap of a vjp), which small modules allow where a whole Hugging Face model does not. Backward
   never forms the batch's weight gradients, which this way replaces. Once per pass, the scores of two
   examples of the first batch (its most and least padded) are checked against each example run alone
   (`_layers_disagree`); a model that fails (a weight used outside its module, examples that interact, a
   module called with several tensors) takes the next way, with a warning. Memory: the gradients at all
   scored modules' outputs at once (activation-sized), where vmap holds a chunk of whole gradients.
2. **vmap** (`"vmap"`): torch.func's vmap over grad of the whole model, one example per lane, in chunks.
   Hugging Face models cannot be vectorised as called: turning the 2D padding mask into the attention
   mask checks `mask.all()`, data-dependent control flow that vmap refuses. They accept an already
   prepared 4D additive mask as it is, though, so the vmapped function builds that itself from the
   example's padding (bidirectional for encoders, causal for decoders): which of the two a model needs is
   found once per pass by comparing the model's own log-likelihood of the most padded example with each
   (`_probe_mask`).
3. **One at a time** (`"loop"`): a forward and backward pass per example, for what neither can run.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import torch
from torch import nn
from torch.func import functional_call, grad, vjp, vmap

from childtune.fisher.likelihood import batched, log_likelihood, rows
from childtune.fisher.squares import add_squares, add_squares_in_backward, clip_factor, clipped

ORDER = ("layers", "vmap", "loop")
"""The ways tried, fastest first; a way that fails once is not tried again in that pass."""

# One vmap call materialises chunk x (scored parameters) gradients at once; chunks are sized to keep
# that under this many bytes, so per-example scoring of a full BERT does not need batch x 340 MB.
_VMAP_BYTES = 1 << 30

Calls = list[tuple[torch.Tensor, torch.Tensor]]
"""A module's calls in one forward: (its input, its output or the gradient at it) per call."""
Buffers = dict[tuple[tuple[int, ...], torch.dtype, torch.device], torch.Tensor]
"""Per-example weight-gradient buffers by (shape, dtype, device), reused across batches."""

class PerExampleFallbackWarning(UserWarning):
    """Per-example gradients cannot be taken layer by layer for this model: a slower way computes them."""


class VmapFallbackWarning(PerExampleFallbackWarning):
    """torch.func could not vectorise the model either; per-example gradients are computed one at a time."""


class _Refused(Exception):
    """The by-layer way does not apply to this model (the message says why)."""


@dataclass
class Ways:
    """What a Fisher pass has learned about its model: the ways still open (`ORDER`, minus those that
    failed), each scored module's parameters once checked (`owners`), the 4D mask form for vmap (None:
    pass the 2D mask through; False: bidirectional; True: causal, probed on the first padded chunk), and
    the per-example gradient buffers the by-layer way reuses."""

    open: list[str] = field(default_factory=lambda: list(ORDER))
    owners: dict[nn.Module, dict[str, str]] | None = None
    causal: bool | None = None
    probed: bool = False
    buffers: Buffers = field(default_factory=dict)


def add_per_example(model: nn.Module, params: dict[str, nn.Parameter], inputs: Mapping[str, Any],
                    labels: torch.Tensor, sums: dict[str, torch.Tensor], ways: Ways, clip: float | None = None) -> None:
    """Add every example's squared gradient of its log-likelihood to `sums` (each example's gradient of each
    tensor clipped to norm `clip` first), by the fastest way still open in `ways` (updated)."""
    if ways.open[0] == "layers":
        try:
            if ways.owners is None:
                owners = _owners(model, params)
                problem = _layers_disagree(model, params, owners, inputs, labels, clip, sums)
                if problem:
                    raise _Refused(problem)
                ways.owners = owners
            _by_layers(model, ways.owners, inputs, labels, sums, clip, ways.buffers)
            return
        except Exception as err:
            ways.open.pop(0)
            warnings.warn(f"per-example gradients cannot be taken layer by layer in {type(model).__name__} "
                          f"({str(err)[:200]}); torch.func.vmap over the whole model computes them, slower",
                          PerExampleFallbackWarning, stacklevel=4)
    n = len(labels)
    chunk = max(1, _VMAP_BYTES // (4 * sum(p.numel() for p in params.values())))
    for start in range(0, n, chunk):
        part, ys = rows(inputs, n, start, start + chunk), labels[start : start + chunk]
        if ways.open[0] == "vmap":
            if not ways.probed and "attention_mask" in part:
                ways.causal, ways.probed = _probe_mask(model, part, ys), True
            try:
                stacked = _vmap_grads(model, params, part, ys, ways.causal)
                add_squares(sums, clipped(stacked, clip, stacked=True), stacked=True)
                continue
            except Exception as err:
                ways.open.pop(0)
                warnings.warn(f"torch.func.vmap cannot run {type(model).__name__} ({str(err)[:120]}...); "
                              "computing per-example gradients one example at a time",
                              VmapFallbackWarning, stacklevel=4)
        for i in range(len(ys)):
            ll = log_likelihood(model(**rows(part, len(ys), i, i + 1)), ys[i : i + 1])
            add_squares_in_backward(-ll[0], params, sums, clip)


# ------------------------------------------------------------------------------------------ by layer


def _owners(model: nn.Module, params: dict[str, nn.Parameter]) -> dict[nn.Module, dict[str, str]]:
    """Each module holding scored parameters itself: their names in it -> their names in the model."""
    wanted = {id(p): n for n, p in params.items()}
    owners: dict[nn.Module, dict[str, str]] = {}
    held: dict[str, nn.Module] = {}
    for module in model.modules():
        for own, p in module.named_parameters(recurse=False):
            name = wanted.get(id(p))
            if name is None:
                continue
            if name in held:  # tied: its per-example gradient sums over modules before it is squared
                raise _Refused(f"{name} is shared by a {type(held[name]).__name__} and a {type(module).__name__}")
            held[name] = module
            owners.setdefault(module, {})[own] = name
    return owners


def _by_layers(model: nn.Module, owners: dict[nn.Module, dict[str, str]], inputs: Mapping[str, Any],
               labels: torch.Tensor, sums: dict[str, torch.Tensor], clip: float | None, buffers: Buffers) -> None:
    """Add each example's squared gradient of each scored parameter to `sums` (module docstring, way 1).
    Everything that can refuse the model runs before the first addition."""
    n = len(labels)
    calls: dict[nn.Module, Calls] = defaultdict(list)

    def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor) or not isinstance(out, torch.Tensor):
            raise _Refused(f"a {type(module).__name__} is called with other than one tensor")
        if args[0].shape[:1] != (n,) or out.shape[:1] != (n,):
            raise _Refused(f"a {type(module).__name__}'s input or output is not one row per example")
        calls[module].append((args[0].detach(), out))

    handles = [m.register_forward_hook(record, with_kwargs=True) for m in owners]
    try:
        ll = log_likelihood(model(**inputs), labels)
    finally:
        for handle in handles:
            handle.remove()
    made = [(m, x, out) for m, cs in calls.items() for x, out in cs]
    outputs = torch.autograd.grad(-ll.sum(), [out for _, _, out in made], allow_unused=True)
    seen: dict[nn.Module, Calls] = defaultdict(list)  # (input, gradient at the output) of each call that matters
    for (m, x, _), g in zip(made, outputs, strict=True):
        if g is not None:
            seen[m].append((x, g))
    others = {m: _module_grads(m, cs) for m, cs in seen.items() if not _plain_linear(m)}
    for m, cs in seen.items():
        names = owners[m]
        if _plain_linear(m):  # not in `others`
            _add_linear(m, cs, names, sums, clip, buffers)
        else:
            mine = [(names[k], g) for k, g in others[m].items() if k in names]
            add_squares({k: sums[k] for k, _ in mine}, clipped([g for _, g in mine], clip, stacked=True), stacked=True)


def _plain_linear(module: nn.Module) -> TypeGuard[nn.Linear]:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _add_linear(module: nn.Linear, calls: Calls, names: dict[str, str], sums: dict[str, torch.Tensor],
                clip: float | None, buffers: Buffers) -> None:
    """A Linear's per-example squared gradients: weight g_i^T x_i over example i's positions (a module
    called more than once has its calls' positions side by side), bias the sum of g_i; the weight's one
    example at a time into a buffer reused across batches. With `clip`, each example's weight-gradient norm
    comes first from the positions' Gram matrices, ||g_i^T x_i||^2 = sum((g_i g_i^T) * (x_i x_i^T)), so
    its factor scales g_i before the product."""
    n = len(calls[0][0])
    xs = [x.reshape(n, -1, x.shape[-1]) for x, _ in calls]
    gs = [g.reshape(n, -1, g.shape[-1]) for _, g in calls]
    x, g = (xs[0], gs[0]) if len(calls) == 1 else (torch.cat(xs, dim=1), torch.cat(gs, dim=1))
    x = x.to(g.dtype)  # under autocast a Linear's input and output dtypes differ
    if "bias" in names:
        add_squares({names["bias"]: sums[names["bias"]]}, clipped([g.sum(1)], clip, stacked=True), stacked=True)
    if "weight" not in names:
        return
    if clip is not None:
        norms = (torch.bmm(g, g.mT).float() * torch.bmm(x, x.mT).float()).sum((1, 2)).clamp(min=0).sqrt()
        g = g * clip_factor(norms, clip).to(g.dtype).view(n, 1, 1)
    key = (tuple(module.weight.shape), g.dtype, g.device)
    if key not in buffers:
        buffers[key] = torch.empty(key[0], dtype=key[1], device=key[2])
    out, total = buffers[key], sums[names["weight"]]
    for i in range(n):
        torch.mm(g[i].T, x[i], out=out)
        one = out if out.dtype == torch.float32 else out.float()
        total.addcmul_(one, one)


def _module_grads(module: nn.Module, calls: Calls) -> dict[str, torch.Tensor]:
    """Per-example gradients (stacked on dim 0) of a module's own parameters, by torch.func on it alone."""
    own = {k: p.detach() for k, p in module.named_parameters(recurse=False)}

    def one(x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
        back = vjp(lambda p: functional_call(module, p, (x.unsqueeze(0),)), own)[1]  # (output, vjp_fn): no aux
        grads: dict[str, torch.Tensor] = back(g.unsqueeze(0))[0]
        return grads

    total: dict[str, torch.Tensor] = {}
    for x, g in calls:
        for k, v in vmap(one)(x, g).items():
            total[k] = total[k] + v if k in total else v
    return total


def _layers_disagree(model: nn.Module, params: dict[str, nn.Parameter], owners: dict[nn.Module, dict[str, str]],
                     inputs: Mapping[str, Any], labels: torch.Tensor, clip: float | None,
                     scratch: dict[str, torch.Tensor]) -> str | None:
    """None if the by-layer scores of two examples of the batch (the most and the least padded) equal
    those of each example run alone, in eval mode; else which tensor differs. Once per pass, before its
    first batch: the by-layer side is written into the pass's sums (`scratch`, zero until then, and zeroed
    again), so the check costs one more set of scores, not two."""
    n = len(labels)
    mask = inputs.get("attention_mask")
    order = mask.reshape(n, -1).sum(1).argsort() if isinstance(mask, torch.Tensor) else torch.arange(n)
    picked = sorted({int(order[0]), int(order[-1])})
    sub = {k: v[picked] if k in batched(inputs, n) else v for k, v in inputs.items()}
    ys = labels[picked]
    got, want = scratch, {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    modes = {m: m.training for m in model.modules()}
    model.eval()  # dropout would make the two runs differ
    try:
        _by_layers(model, owners, sub, ys, got, clip, {})
        for i in range(len(ys)):
            ll = log_likelihood(model(**rows(sub, len(ys), i, i + 1)), ys[i : i + 1])
            add_squares_in_backward(-ll[0], params, want, clip)
        scale = max(float(w.max()) for w in want.values())
        low = any(p.dtype in (torch.bfloat16, torch.float16) for p in params.values())
        rtol, atol = (6e-2, 1e-4 * scale) if low else (2e-3, 1e-8 * scale)
        for name, w in want.items():  # |got - want| <= atol + rtol |want|, in two passes over each tensor
            if float(torch.sub(got[name], w).abs_().sub_(w.mul(rtol)).max()) > atol:
                return f"{name}'s score from a batch of two differs from its examples' own"
        return None
    finally:
        for module, training in modes.items():
            module.training = training
        for s in got.values():
            s.zero_()


# ------------------------------------------------------------------------------------------ vmap


def _additive_mask(mask: torch.Tensor, causal: bool, dtype: torch.dtype) -> torch.Tensor:
    """(1, L) padding mask -> (1, 1, L, L) additive attention mask: 0 where a query may attend, dtype min not."""
    length = mask.shape[-1]
    allowed = mask[:, None, None, :].bool().expand(-1, 1, length, length)
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=mask.device),
                       torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device))


def _probe_mask(model: nn.Module, part: dict[str, Any], labels: torch.Tensor) -> bool | None:
    """Which 4D mask gives the model's own log-likelihood of the chunk's most padded example: False
    (bidirectional), True (causal), or None (neither, or the model refuses a 4D mask: pass 2D through)."""
    i = int(part["attention_mask"].sum(-1).argmin())
    one, y = rows(part, len(labels), i, i + 1), labels[i : i + 1]
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        own = log_likelihood(model(**one), y)
        for causal in (False, True):
            try:
                ll = log_likelihood(model(**{**one, "attention_mask": _additive_mask(
                    one["attention_mask"], causal, dtype)}), y)
            except Exception:  # a model that reads the 2D mask itself
                return None
            if ll.shape == own.shape and torch.allclose(ll, own, rtol=1e-4, atol=1e-5):
                return causal
    return None


def _vmap_grads(model: nn.Module, params: dict[str, nn.Parameter], inputs: Mapping[str, Any], labels: torch.Tensor,
                causal: bool | None = None) -> list[torch.Tensor]:
    """Per-example gradients, stacked on dim 0: each example is run alone as a batch of one, its padding
    mask made a 4D attention mask (`causal`) when the probe found one that the model reads as its own."""
    keys = batched(inputs, len(labels))
    shared = {k: v for k, v in inputs.items() if k not in keys}
    others = {n: p.detach() for n, p in model.named_parameters() if n not in params}
    dtype = next(model.parameters()).dtype

    def loss(trainable: dict[str, torch.Tensor], one_row: dict[str, torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        one = {k: v.unsqueeze(0) for k, v in one_row.items()}
        if causal is not None and "attention_mask" in one:
            one["attention_mask"] = _additive_mask(one["attention_mask"], causal, dtype)
        output = functional_call(model, {**others, **trainable}, (), {**shared, **one})
        return -log_likelihood(output, label.unsqueeze(0))[0]

    with warnings.catch_warnings():  # torch notes kernels without a batching rule: slow, still correct
        warnings.filterwarnings("ignore", message="There is a performance drop")
        stacked = vmap(grad(loss), in_dims=(None, 0, 0))(
            {n: p.detach() for n, p in params.items()}, {k: inputs[k] for k in keys}, labels
        )
    return [stacked[n] for n in params]
