"""`fisher_information`: one pass over a task's data, the scores Child-Tuning_D ranks (see the package)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sized

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from childtune import shards
from childtune.fisher.likelihood import log_likelihood, rows, split
from childtune.fisher.per_example import Ways, add_per_example
from childtune.fisher.squares import add_squares, clipped, grads
from childtune.layers import in_layer


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
    ways = Ways()  # the per-example ways this model allows, learned as the pass goes
    distributed = dist.is_available() and dist.is_initialized()
    bar = tqdm(total=_expected(batches, num_samples), unit="ex", desc="Fisher information",
               disable=not progress or (distributed and dist.get_rank() != 0))
    modes = {m: m.training for m in model.modules()}
    model.train(train_mode)
    try:
        with torch.enable_grad():
            for batch in batches:
                inputs, labels = split(batch, device)
                if len(labels) == 0:
                    continue
                if num_samples is not None and len(labels) > num_samples - examples:
                    keep = num_samples - examples
                    inputs, labels = rows(inputs, len(labels), 0, keep), labels[:keep]
                if per_example:
                    add_per_example(model, params, inputs, labels, sums, ways, clip)
                else:
                    # the batch-mean loss, as the authors backpropagated it
                    loss = -log_likelihood(model(**inputs), labels).mean()
                    if group is None:
                        gradients = grads(loss, params)
                    else:
                        gradients = _sharded_grads(trainable, loss, params)
                        labelled += float(labels.float().sum())  # (a device sync: only where it is checked)
                    add_squares(sums, clipped(gradients, clip, group=group))
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


def _expected(batches, num_samples: int | None) -> int | None:
    """Examples the progress bar expects: num_samples, else the size of a batching DataLoader's sampler."""
    sampler = getattr(batches, "sampler", None) if getattr(batches, "batch_size", None) else None
    total = len(sampler) if isinstance(sampler, Sized) else None
    if num_samples is None or total is None:
        return num_samples if total is None else total
    return min(total, num_samples)
