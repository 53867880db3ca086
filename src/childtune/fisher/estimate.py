"""`fisher_information`: one pass over a task's data, the scores Child-Tuning_D ranks (see the package)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from childtune import shards
from childtune.fisher.likelihood import log_likelihood, rows, split
from childtune.fisher.per_example import Ways, add_per_example
from childtune.fisher.squares import add_squares, add_squares_in_backward, clipped
from childtune.layers import in_layer, layer_index


def fisher_information(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
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

    Memory: the weights, the float32 scores, the activations of one batch, and the gradient of one tensor
    at a time (each is squared and freed as backward accumulates it, `squares.add_squares_in_backward`).
    Where the scores themselves are too many, `fisher_in_passes` holds a group of blocks' at a time.

    Sharded by FSDP2 (`childtune.shards`), each rank returns the scores of its rows, and every rank must
    be given the *same* batches: FSDP averages the ranks' gradients as it shards them, so only identical
    batches make a rank's gradient shard the batch's own gradient, whose square is the score (checked at
    the end). The pass then costs every rank the whole pass, in sharded memory. Per-example scoring needs
    whole gradients of each example and is refused there.
    """
    (scores,) = fisher_in_passes(model, batches, 1, scored=scored, num_samples=num_samples,
                                 per_example=per_example, train_mode=train_mode, clip=clip, progress=progress)
    return scores


def fisher_in_passes(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    passes: int,
    *,
    scored: Callable[[str], bool] | Iterable[str] | None = None,
    num_samples: int | None = None,
    per_example: bool = False,
    train_mode: bool = False,
    clip: float | None = None,
    progress: bool = True,
) -> Iterator[dict[str, torch.Tensor]]:
    """`fisher_information`'s scores a group of whole blocks at a time, each group from its own pass over
    `batches`: the scored blocks (`layers.layer_index`; everything outside them is one more) are split
    into `passes` groups of about equal size, and one group's float32 sums exist at a time. Memory falls
    with `passes`, time grows with it; every score is the one a single pass gives.

    Each pass starts from the random state the first started from, so dropout (`train_mode`) and a
    DataLoader that shuffles from torch's generator draw alike, and the passes are checked to have read
    the same batches in the same order. `batches` must be re-iterable (a DataLoader, a list) when
    passes > 1. Yields each group's scores (names in model order), groups in model order.

    Per example in train mode, dropout is drawn as the way taken draws it (`per_example`): the batch's
    draw by layer, each example's own in the slower ways. A group that must leave the by-layer way
    (PerExampleFallbackWarning) therefore draws other dropout than a single pass that need not, and the
    reverse; every other setting scores exactly as one pass does.
    """
    if clip is not None and not (isinstance(clip, int | float) and clip > 0 and clip < float("inf")):
        raise ValueError(f"clip must be a positive finite norm or None, got {clip!r}")
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 1):
        raise ValueError(f"num_samples must be a positive int or None, got {num_samples!r}")
    params = _scored_parameters(model, scored)
    groups = _blocks_in_groups(params, passes)
    if passes > 1 and isinstance(batches, Iterator):  # (iter() would start a DataLoader, drawing its seed)
        raise ValueError("several Fisher passes read the batches once each: give a DataLoader or a list, "
                         "not a one-shot iterator")
    sharded = shards.group_of(params.values())
    if sharded is not None and per_example:
        raise ValueError("per-example Fisher needs each example's whole gradient, which FSDP2 never forms on "
                         "one rank; score per batch (per_example=False) when the model is sharded")
    device = next(model.parameters()).device
    how = _Pass(num_samples, per_example, train_mode, clip, watch=sharded is not None or passes > 1)
    expected = _expected(batches, num_samples)
    distributed = dist.is_available() and dist.is_initialized()
    bar = tqdm(total=None if expected is None else expected * passes, unit="ex", desc="Fisher information",
               disable=not progress or (distributed and dist.get_rank() != 0))
    start = _random_state(device)
    first = None
    try:
        for i, group in enumerate(groups):
            if i:
                _set_random_state(device, start)
            scores, read = _one_pass(model, batches, group, how, bar)
            if first is None:
                first = read
            elif not torch.equal(read, first):
                raise ValueError("the Fisher passes read different batches (another order, or a DataLoader "
                                 "shuffling from its own generator): give batches that repeat, or passes=1")
            yield scores
            del scores  # the caller keeps what it needs of them: the next pass must not hold them too
    finally:
        bar.close()


@dataclass(frozen=True)
class _Pass:
    """How a pass scores (see `fisher_information`); `watch`: fingerprint the batches read, which sharded
    ranks and repeated passes compare."""

    num_samples: int | None
    per_example: bool
    train_mode: bool
    clip: float | None
    watch: bool


def _one_pass(model: nn.Module, batches: Iterable[Mapping[str, Any]], params: dict[str, nn.Parameter], how: _Pass,
              bar: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One pass over `batches`: the scores of `params`, and what was read (examples, steps, fingerprint)."""
    group = shards.group_of(params.values())
    # FSDP2 registers its unsharded parameters on the modules between a forward and its backward, so the
    # sharded ones (whose .grad backward fills) are taken now, before any forward
    trainable = [p for p in model.parameters() if p.requires_grad] if group is not None else []
    device = next(model.parameters()).device
    sums = {n: torch.zeros(shards.local(p).shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    fingerprint = torch.zeros((), dtype=torch.float64)
    examples = steps = 0
    ways = Ways()  # the per-example ways this model allows, learned as the pass goes
    modes = {m: m.training for m in model.modules()}
    model.train(how.train_mode)
    try:
        with torch.enable_grad():
            for batch in batches:
                inputs, labels = split(batch, device)
                if len(labels) == 0:
                    continue
                if how.num_samples is not None and len(labels) > how.num_samples - examples:
                    keep = how.num_samples - examples
                    inputs, labels = rows(inputs, len(labels), 0, keep), labels[:keep]
                if how.watch:
                    fingerprint += (steps + 1) * _fingerprint([labels, *inputs.values()])
                if how.per_example:
                    add_per_example(model, params, inputs, labels, sums, ways, how.clip)
                else:
                    # the batch-mean loss, as the authors backpropagated it
                    loss = -log_likelihood(model(**inputs), labels).mean()
                    if group is None:
                        add_squares_in_backward(loss, params, sums, how.clip)
                    else:
                        add_squares(sums, clipped(_sharded_grads(trainable, loss, params), how.clip, group=group))
                examples, steps = examples + len(labels), steps + 1
                bar.update(len(labels))
                if how.num_samples is not None and examples >= how.num_samples:
                    break
    finally:
        for module, training in modes.items():
            module.training = training
    read = torch.tensor([examples, steps, float(fingerprint)], dtype=torch.float64)
    # Per example the mean is over examples; the authors average squared batch gradients over batches.
    counts = torch.tensor([examples, examples if how.per_example else steps], dtype=torch.float64, device=device)
    if group is not None:
        seen = shards.gather_values(read, group)
        if any(not torch.equal(s, seen[0]) for s in seen):
            raise ValueError("ranks of a sharded (FSDP2) Fisher pass read different batches: give every rank the "
                             "same ones (see fisher_information)")
    elif dist.is_available() and dist.is_initialized():
        for s in sums.values():
            dist.all_reduce(s)
        dist.all_reduce(counts)
    if counts[0] == 0:
        raise ValueError("the data loader yielded no examples; Fisher information needs at least one")
    for s in sums.values():
        s.div_(float(counts[1]))  # in place: a second copy of every score would double the pass's peak
    return sums, read


def _blocks_in_groups(params: dict[str, nn.Parameter], passes: int) -> list[dict[str, nn.Parameter]]:
    """`params` as `passes` groups of whole blocks of about equal size (largest block first into the
    emptiest group), each in model order, the groups in model order. Whole blocks, so that a cut within
    each block (`per_layer`) is made within one group."""
    blocks: dict[int | None, list[str]] = {}
    for name in params:
        blocks.setdefault(layer_index(name), []).append(name)
    if isinstance(passes, bool) or not isinstance(passes, int) or not 1 <= passes <= len(blocks):
        raise ValueError(f"passes must be an int from 1 to the {len(blocks)} blocks scored, got {passes!r}")
    size = {b: sum(params[n].numel() for n in names) for b, names in blocks.items()}
    members: list[list[int | None]] = [[] for _ in range(passes)]
    load = [0] * passes
    for b in sorted(blocks, key=size.__getitem__, reverse=True):
        emptiest = min(range(passes), key=lambda i: (load[i], len(members[i])))
        members[emptiest].append(b)
        load[emptiest] += size[b]
    groups = [{n: p for n, p in params.items() if layer_index(n) in chosen} for chosen in members]
    order = list(params)
    return sorted(groups, key=lambda g: order.index(next(iter(g))))


def _fingerprint(tensors: list[Any]) -> torch.Tensor:
    """A number that moves when a batch's contents, their order or the batch's place in the pass change:
    each tensor's values weighted by their positions, in float64 on the CPU."""
    total = torch.zeros((), dtype=torch.float64)
    for t in tensors:
        if isinstance(t, torch.Tensor):
            flat = t.detach().reshape(-1).to("cpu", torch.float64)
            total += flat @ torch.arange(1, len(flat) + 1, dtype=torch.float64)
    return total


def _random_state(device: torch.device) -> list[torch.Tensor]:
    """torch's generator states that dropout and samplers draw from: the CPU's, and the device's if CUDA."""
    state = [torch.get_rng_state()]
    if device.type == "cuda":
        state.append(torch.cuda.get_rng_state(device))
    return state


def _set_random_state(device: torch.device, state: list[torch.Tensor]) -> None:
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)


def _scored_parameters(model: nn.Module,
                       scored: Callable[[str], bool] | Iterable[str] | None) -> dict[str, nn.Parameter]:
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


def _sharded_grads(trainable: list[nn.Parameter], loss: torch.Tensor,
                   params: dict[str, nn.Parameter]) -> list[torch.Tensor | None]:
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


def _expected(batches: Iterable[Mapping[str, Any]], num_samples: int | None) -> int | None:
    """Examples the progress bar expects: num_samples, else the size of a batching DataLoader's sampler."""
    sampler = getattr(batches, "sampler", None) if getattr(batches, "batch_size", None) else None
    total = len(sampler) if isinstance(sampler, Sized) else None
    if num_samples is None or total is None:
        return num_samples if total is None else total
    return min(total, num_samples)
