"""Fisher information of each weight: the importance score behind Child-Tuning_D.

Child-Tuning_D updates the weights whose gradients say most about the labels,
F(w_i) = mean over examples of (d log p(y|x) / d w_i)^2, estimated on the task's training data before
fine-tuning. `masks.top_fraction` turns these scores into the child network; this module only scores.

Two estimates are offered because they rank weights differently:
- `per_example=False` (the authors'): one backward pass per batch, squaring the gradient of the
  *batch-mean* loss. Cheap, but cross terms between examples survive the squaring: the per-example
  part shrinks as 1/batch size while the squared mean gradient does not, so batch size moves the ranking.
- `per_example=True` (the definition): the squared gradient of every example's own log-likelihood.
  torch.func (vmap over grad) gives all of a batch's per-example gradients in one call when the model
  can be vectorised. Hugging Face models cannot be, as called: turning the 2D padding mask into the
  attention mask checks `mask.all()`, data-dependent control flow that vmap refuses. They accept an
  already prepared 4D additive mask as it is, though, so the vmapped function builds that itself from the
  example's padding (bidirectional for encoders, causal for decoders): which of the two a model needs is
  found once per pass by comparing the model's own log-likelihood of the most padded example with each
  (`_probe_mask`). Models that match neither, or have control flow of their own, fall back to one
  backward pass per example.

The authors' pass (alibaba/AliceMind `ChildTuning/ChildTuningD.py`, `calculate_fisher`, read at commit
a6d5afe) differs from the textbook estimate in two more ways, both available here: the model is in
train mode, so dropout is on (`train_mode=True`), and each scored tensor's gradient is clipped to norm
`max_grad_norm` (1.0) with `clip_grad_norm_` *before* it is squared (`clip=1.0`). Both move the global
top-p ranking: clipping caps the contribution of batches with large gradients tensor by tensor.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sized
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from childtune import shards
from childtune.layers import in_layer

# One vmap call materialises chunk x (scored parameters) gradients at once; chunks are sized to keep
# that under this many bytes, so per-example scoring of a full BERT does not need batch x 340 MB.
_VMAP_BYTES = 1 << 30


class VmapFallbackWarning(UserWarning):
    """torch.func could not vectorise the model; per-example gradients are computed one at a time."""


@dataclass
class _Vectorising:
    """What a Fisher pass learned about vectorising its model: whether vmap works, and the 4D mask form
    (None: pass the 2D mask through; False: bidirectional; True: causal), probed on the first padded chunk."""

    ok: bool = True
    causal: bool | None = None
    probed: bool = False


def fisher_information(
    model: nn.Module,
    batches: Iterable[Mapping],
    *,
    scored: Callable[[str], bool] | Iterable[str] | None = None,
    num_samples: int | None = None,
    per_example: bool = False,
    train_mode: bool = False,
    clip: float | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Fisher information of every scored parameter, as float32 tensors shaped like the parameters.

    `batches` yields HF-style dicts with `labels` (integer classes, or floats with a single output for
    regression, scored as a unit-variance Gaussian). `scored` is a name predicate or a list of names
    (default: parameters inside the transformer blocks, as the authors scored). `num_samples` caps the
    examples read on this rank. Under torch.distributed, sums and counts are all-reduced, so every rank
    returns the same scores from its own shard. The model runs in eval mode (no dropout) unless
    `train_mode`; `clip` scales each tensor's gradient (each example's, with `per_example`) to at most that
    L2 norm before squaring, as `torch.nn.utils.clip_grad_norm_` on that tensor alone would. The model's
    modes and its parameters' `.grad` are left as they were.

    Sharded by FSDP2 (`childtune.shards`), each rank returns the scores of its rows, and every rank must
    be given the *same* batches: FSDP averages the ranks' gradients as it shards them, so only identical
    batches make a rank's gradient shard the batch's own gradient, whose square is the score (checked at
    the end). The pass then costs every rank the whole pass, in sharded memory. Per-example scoring needs
    whole gradients of each example and is refused there.
    """
    if clip is not None and not (isinstance(clip, int | float) and clip > 0 and clip < float("inf")):
        raise ValueError(f"clip must be a positive finite norm or None, got {clip!r}")
    params = _scored_parameters(model, scored)
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 1):
        raise ValueError(f"num_samples must be a positive int or None, got {num_samples!r}")
    group = shards.group_of(params.values())
    if group is not None and per_example:
        raise ValueError("per-example Fisher needs each example's whole gradient, which FSDP2 never forms on "
                         "one rank; score per batch (per_example=False) when the model is sharded")
    # FSDP2 registers its unsharded parameters on the modules between a forward and its backward, so the
    # sharded ones (whose .grad backward fills) are taken now, before any forward
    trainable = [p for p in model.parameters() if p.requires_grad] if group is not None else []
    device = next(model.parameters()).device
    sums = {n: torch.zeros(shards.local(p).shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    labelled = 0.0  # a checksum of the labels read: ranks of a sharded pass must all read the same ones
    examples = steps = 0
    vectorising = _Vectorising()  # until the model proves it cannot be vectorised
    distributed = dist.is_available() and dist.is_initialized()
    bar = tqdm(total=_expected(batches, num_samples), unit="ex", desc="Fisher information",
               disable=not progress or (distributed and dist.get_rank() != 0))
    modes = {m: m.training for m in model.modules()}
    model.train(train_mode)
    try:
        with torch.enable_grad():
            for batch in batches:
                inputs, labels = _split(batch, device)
                if len(labels) == 0:
                    continue
                if num_samples is not None and len(labels) > num_samples - examples:
                    keep = num_samples - examples
                    inputs, labels = _rows(inputs, len(labels), 0, keep), labels[:keep]
                if per_example:
                    _add_per_example(model, params, inputs, labels, sums, vectorising, clip)
                else:
                    # the batch-mean loss, as the authors backpropagated it
                    loss = -_log_likelihood(model(**inputs), labels).mean()
                    if group is None:
                        grads = _grads(loss, params)
                    else:
                        grads = _sharded_grads(trainable, loss, params)
                        labelled += float(labels.float().sum())  # (a device sync: only where it is checked)
                    _add_squares(sums, _clipped(grads, clip, group=group))
                examples, steps = examples + len(labels), steps + 1
                bar.update(len(labels))
                if num_samples is not None and examples >= num_samples:
                    break
    finally:
        for module, training in modes.items():
            module.training = training
        bar.close()
    # Per example the mean is over examples; the authors average squared batch gradients over batches.
    counts = torch.tensor([examples, examples if per_example else steps], dtype=torch.float64, device=device)
    if group is not None:
        seen = shards.gather_values(torch.tensor([examples, steps, labelled], dtype=torch.float64), group)
        if any(not torch.equal(s, seen[0]) for s in seen):
            raise ValueError("ranks of a sharded (FSDP2) Fisher pass read different batches: give every rank the "
                             "same ones (see fisher_information)")
    elif distributed:
        for s in sums.values():
            dist.all_reduce(s)
        dist.all_reduce(counts)
    if counts[0] == 0:
        raise ValueError("the data loader yielded no examples; Fisher information needs at least one")
    return {n: s / float(counts[1]) for n, s in sums.items()}


def _scored_parameters(model: nn.Module, scored) -> dict[str, nn.Parameter]:
    """Resolve `scored` to trainable parameters in model order, refusing a choice that scores nothing."""
    named = dict(model.named_parameters())
    if scored is None or callable(scored):
        keep = scored or in_layer
        chosen = {n: p for n, p in named.items() if p.requires_grad and keep(n)}
    else:
        if isinstance(scored, str):
            raise TypeError("scored must be a predicate or an iterable of names, not a single string")
        wanted = set(scored)
        unknown = sorted(wanted - named.keys())
        if unknown:
            raise ValueError(f"scored names are not parameters of the model: {unknown[:5]}")
        frozen = sorted(n for n in wanted if not named[n].requires_grad)
        if frozen:
            raise ValueError(f"scored parameters do not require grad, so have no gradient: {frozen[:5]}")
        chosen = {n: p for n, p in named.items() if n in wanted}
    if sum(p.numel() for p in chosen.values()) == 0:
        raise ValueError("no parameter elements to score: `scored` selects no trainable parameter")
    return chosen


def _split(batch: Mapping, device: torch.device) -> tuple[dict, torch.Tensor]:
    """Model inputs (moved to the model's device) and labels; Fisher needs the labels' log-likelihood."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"batches must yield dicts of model inputs, got {type(batch).__name__}")
    if batch.get("labels") is None:
        raise ValueError("the data loader yields no labels; Fisher information needs them")
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    del inputs["labels"]
    labels = torch.as_tensor(batch["labels"], device=device)
    if labels.dim() == 0:
        raise ValueError("labels must hold one entry per example, got a scalar")
    return inputs, labels


def _batched(inputs: dict, n: int) -> list[str]:
    """Keys whose tensors carry one row per example (everything else is shared by the batch)."""
    return [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n]


def _rows(inputs: dict, n: int, start: int, stop: int) -> dict:
    """Examples start..stop-1 with their own padding and attention mask, so their logits match the batch's."""
    keys = _batched(inputs, n)
    return {k: v[start:stop] if k in keys else v for k, v in inputs.items()}


def _log_likelihood(output, labels: torch.Tensor) -> torch.Tensor:
    """log p(y|x) per example, from the logits rather than the model's loss (whose scale varies by model).

    One output means regression: a unit-variance Gaussian, -(y - f)^2 / 2 up to a constant, which is
    what HF's `num_labels=1` models fit. Otherwise the log-softmax at the label. For a causal LM (logits
    per position, labels per position) it is the sum of the target tokens' log-probabilities, each
    predicted from the positions before it; prompt and padding positions (-100) add nothing.
    """
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = output if isinstance(output, torch.Tensor) else output[0]
    if logits.dim() == 3 and labels.dim() == 2:  # a causal LM: labels are the inputs' ids, -100 where ignored
        targets = labels[:, 1:]
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        picked = logp.gather(2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (picked * (targets != -100)).sum(1)  # log p(target | prompt): the target tokens only
    if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"expected logits of shape (batch, outputs) for {labels.shape[0]} labels, got "
                         f"{tuple(logits.shape)}: Fisher scoring covers one prediction per example")
    logits = logits.float()
    if logits.shape[1] == 1:
        return -0.5 * (labels.reshape(-1).float() - logits[:, 0]) ** 2
    if labels.is_floating_point():
        raise ValueError("float labels with several outputs (multi-label or soft targets) are not supported")
    return torch.log_softmax(logits, dim=-1).gather(1, labels.reshape(-1, 1).long())[:, 0]


def _add_squares(sums: dict[str, torch.Tensor], grads, stacked: bool = False) -> None:
    """Accumulate squared gradients in float32, where half-precision squares would underflow.

    `stacked` gradients carry one row per example (from vmap), each squared before summing.
    """
    for s, g in zip(sums.values(), grads, strict=True):
        if g is not None:  # a parameter the output does not depend on scores zero
            s += g.float().pow(2).sum(0) if stacked else g.float().pow(2)


def _clipped(grads, clip: float | None, stacked: bool = False, group=None):
    """Each gradient scaled to L2 norm at most `clip` (per example row when `stacked`), with
    `clip_grad_norm_`'s own factor min(1, clip / (norm + 1e-6)), so the authors' scores are reproduced.
    Row shards (`group`): a tensor's norm is summed over its ranks' rows first."""
    if clip is None:
        return grads
    whole = None
    if group is not None:
        whole = torch.stack([torch.zeros(()) if g is None else g.float().pow(2).sum() for g in grads])
        dist.all_reduce(whole, group=group)
        whole = whole.sqrt()
    out = []
    for i, g in enumerate(grads):
        if g is None:
            out.append(g)
            continue
        g = g.float()
        norms = whole[i] if whole is not None else g.flatten(1).norm(dim=1) if stacked else g.norm()
        factor = (clip / (norms + 1e-6)).clamp(max=1.0)
        out.append(g * factor.view(-1, *([1] * (g.dim() - 1))) if stacked else g * factor)
    return out


def _grads(loss: torch.Tensor, params: dict[str, nn.Parameter]):
    """Gradients without touching `.grad`: the caller's accumulated gradients must survive scoring."""
    return torch.autograd.grad(loss, list(params.values()), allow_unused=True)


def _sharded_grads(trainable: list[nn.Parameter], loss: torch.Tensor, params: dict[str, nn.Parameter]) -> list:
    """This rank's rows of the gradients, for FSDP2: its parameters sit outside the autograd graph (FSDP
    all-gathers them into fresh leaves), so `autograd.grad` cannot reach them and only backward's
    reduce-scatter into `.grad` gives the shards. The `.grad` of `trainable` (the model's sharded
    parameters) are put back afterwards."""
    saved = [p.grad for p in trainable]
    for p in trainable:
        p.grad = None
    try:
        with shards.reading_gradients():  # an optimizer stepping in backward must not step here
            loss.backward()
        return [None if p.grad is None else shards.local(p.grad) for p in params.values()]
    finally:
        for p, g in zip(trainable, saved, strict=True):
            p.grad = g


def _add_per_example(model, params, inputs, labels, sums, vec: _Vectorising, clip: float | None = None) -> None:
    """Add every example's squared gradient, vectorised in chunks while the model allows it (`vec`, updated:
    a model that failed once fails on every batch)."""
    n = len(labels)
    chunk = max(1, _VMAP_BYTES // (4 * sum(p.numel() for p in params.values())))
    for start in range(0, n, chunk):
        rows, ys = _rows(inputs, n, start, start + chunk), labels[start : start + chunk]
        if vec.ok:
            if not vec.probed and "attention_mask" in rows:
                vec.causal, vec.probed = _probe_mask(model, rows, ys), True
            try:
                grads = _vmap_grads(model, params, rows, ys, vec.causal)
                _add_squares(sums, _clipped(grads, clip, stacked=True), stacked=True)
                continue
            except Exception as err:
                vec.ok = False
                warnings.warn(f"torch.func.vmap cannot run {type(model).__name__} ({str(err)[:120]}...); "
                              "computing per-example gradients one example at a time",
                              VmapFallbackWarning, stacklevel=3)
        for i in range(len(ys)):
            ll = _log_likelihood(model(**_rows(rows, len(ys), i, i + 1)), ys[i : i + 1])
            _add_squares(sums, _clipped(_grads(-ll[0], params), clip))


def _additive_mask(mask: torch.Tensor, causal: bool, dtype: torch.dtype) -> torch.Tensor:
    """(1, L) padding mask -> (1, 1, L, L) additive attention mask: 0 where a query may attend, dtype min not."""
    length = mask.shape[-1]
    allowed = mask[:, None, None, :].bool().expand(-1, 1, length, length)
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=mask.device),
                       torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device))


def _probe_mask(model, rows: dict, labels: torch.Tensor) -> bool | None:
    """Which 4D mask gives the model's own log-likelihood of the chunk's most padded example: False
    (bidirectional), True (causal), or None (neither, or the model refuses a 4D mask: pass 2D through)."""
    i = int(rows["attention_mask"].sum(-1).argmin())
    one, y = _rows(rows, len(labels), i, i + 1), labels[i : i + 1]
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        own = _log_likelihood(model(**one), y)
        for causal in (False, True):
            try:
                ll = _log_likelihood(model(**{**one, "attention_mask": _additive_mask(
                    one["attention_mask"], causal, dtype)}), y)
            except Exception:  # a model that reads the 2D mask itself
                return None
            if ll.shape == own.shape and torch.allclose(ll, own, rtol=1e-4, atol=1e-5):
                return causal
    return None


def _vmap_grads(model, params, inputs, labels, causal: bool | None = None) -> list[torch.Tensor]:
    """Per-example gradients, stacked on dim 0: each example is run alone as a batch of one, its padding
    mask made a 4D attention mask (`causal`) when the probe found one that the model reads as its own."""
    keys = _batched(inputs, len(labels))
    shared = {k: v for k, v in inputs.items() if k not in keys}
    others = {n: p.detach() for n, p in model.named_parameters() if n not in params}
    dtype = next(model.parameters()).dtype

    def loss(trainable, rows, label):
        one = {k: v.unsqueeze(0) for k, v in rows.items()}
        if causal is not None and "attention_mask" in one:
            one["attention_mask"] = _additive_mask(one["attention_mask"], causal, dtype)
        output = functional_call(model, {**others, **trainable}, (), {**shared, **one})
        return -_log_likelihood(output, label.unsqueeze(0))[0]

    with warnings.catch_warnings():  # torch notes kernels without a batching rule: slow, still correct
        warnings.filterwarnings("ignore", message="There is a performance drop")
        grads = vmap(grad(loss), in_dims=(None, 0, 0))(
            {n: p.detach() for n, p in params.items()}, {k: inputs[k] for k in keys}, labels
        )
    return [grads[n] for n in params]


def _expected(batches, num_samples: int | None) -> int | None:
    """Examples the progress bar expects: num_samples, else the size of a batching DataLoader's sampler."""
    sampler = getattr(batches, "sampler", None) if getattr(batches, "batch_size", None) else None
    total = len(sampler) if isinstance(sampler, Sized) else None
    if num_samples is None or total is None:
        return num_samples if total is None else total
    return min(total, num_samples)
