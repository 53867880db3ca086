"""Scoring a model during and after training, and counting what a run touched and what it cost."""

from __future__ import annotations

import contextlib
import ctypes
import resource
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from tqdm.auto import tqdm

from childtune.data.metrics import compute_metrics, exact_match
from childtune.training.config import TrainConfig
from childtune.training.inputs import loader


def to_device(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The batch on the model's device (a no-op on the CPU)."""
    device = next(model.parameters()).device
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class DivergedError(ValueError):
    """The model's outputs are not finite numbers: its weights diverged, and any score would be made up."""


@torch.no_grad()
def evaluate(model, examples, spec, collate, config: TrainConfig, desc: str) -> dict[str, float]:
    """Metrics of the model on `examples` (dropout off), batched with dynamic padding.

    A generation task is scored by greedy decoding (`generate_answers`) and exact match, with the mean
    loss of the target tokens (`loss`) beside it."""
    if spec.kind == "generation":
        return evaluate_generation(model, examples, collate, config, desc)
    model.eval()
    outputs, labels = [], []
    batches = loader(examples, batch_size=config.eval_batch_size, collate_fn=collate)
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False, disable=not config.progress):
        labels.append(batch.pop("labels"))
        logits = model(**to_device(batch, model)).logits.float().cpu()
        if not bool(torch.isfinite(logits).all()):
            raise DivergedError(f"{desc}: the model's outputs are not finite (NaN or inf): the run diverged, so no "
                                "score is reported. Lower --lr")
        outputs.append(logits)
    return compute_metrics(spec, torch.cat(outputs), torch.cat(labels), config.metric_extra)


def count_elements(pretrained: Mapping[str, torch.Tensor], model: torch.nn.Module, params: dict[str, torch.Tensor],
                   masks: dict[str, torch.Tensor] | None,
                   state: Mapping[str, torch.Tensor] | None = None) -> dict[str, int | None]:
    """Sizes that say what a run touched: elements it may change, did change, and changed outside its child.
    `state`: the model's tuned weights where its state dict does not hold them (a quantized base's view).

    Tied weights (a causal LM's embeddings and LM head) are one tensor under two names: counted once."""
    changed = outside = 0
    seen = set()
    for name, tensor in (model.state_dict() if state is None else state).items():
        alias = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if alias in seen and tensor.numel():
            continue
        seen.add(alias)
        if name in pretrained and tensor.is_floating_point():
            diff = tensor.detach().cpu() != pretrained[name]
            changed += int(diff.sum())
            if masks is not None and name in masks:
                outside += int((diff & ~masks[name].cpu()).sum())
    child = None
    if masks is not None:
        child = sum(int(masks[n].sum()) if n in masks else p.numel() for n, p in params.items())
    compared = bool(pretrained)  # (nothing to compare with: QLoRA keeps its adapter apart from the quantized base)
    return {
        "total_params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in params.values()),
        "child_params": child,
        "changed_params": changed if compared else None,
        "changed_outside_child": outside if masks is not None and compared else None,
    }


_STATUS = Path("/proc/self/status")


def reset_peak_rss() -> None:
    """Start a new peak-memory window for this process (Linux: writing 5 to clear_refs resets VmHWM), so
    a study that runs many cells in one process reports each cell's own peak. Elsewhere a no-op."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    """Peak resident memory of this process since `reset_peak_rss` (or its start), in MiB."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def release_freed_memory() -> None:
    """Hand the memory this process freed back to the system (glibc's `malloc_trim`). glibc keeps freed
    blocks for reuse, and once a large tensor is freed it serves blocks up to 32 MiB from that kept heap:
    SmolLM2's Fisher pass left 1.6 GB of freed gradients and sums resident, which the fragmented heap could
    not reuse for the steps' and evaluation's tensors, so they came on top of it (a 4.9 GB peak, 3.8 GB
    with the trim). Milliseconds; a no-op where the C library is not glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PhasePeaks:
    """Peak resident memory of each phase of a run (data, model, Fisher pass, steps, evaluation, saving),
    in MiB: whether a run fits is decided by its largest phase, and which phase that is says what to make
    leaner. `start(name)` closes the phase before it with the peak since that one began and opens a new
    window by resetting VmHWM (`reset_peak_rss`). The reset is Linux-only (/proc/self/clear_refs); elsewhere
    each phase reports the whole-process peak up to its end. `overall()` is the largest phase's peak."""

    def __init__(self) -> None:
        self.peaks: dict[str, float] = {}
        self._current: str | None = None

    def start(self, phase: str | None) -> None:
        """End the current phase (if any) and, unless `phase` is None, begin `phase` with the memory the
        phases before it freed handed back (`release_freed_memory`)."""
        if self._current is not None:
            self.peaks[self._current] = max(self.peaks.get(self._current, 0.0), peak_rss_mib())
        release_freed_memory()
        reset_peak_rss()
        self._current = phase

    def overall(self) -> float:
        return max([*self.peaks.values(), peak_rss_mib() if self._current is not None else 0.0])


@torch.no_grad()
def evaluate_generation(model, examples, collate, config: TrainConfig, desc: str) -> dict[str, float]:
    """Exact match of greedy answers, and the mean per-token loss of the targets (teacher forced).

    The loss pass runs in batches of the training batch size, not the evaluation's: its logits (rows x
    length x vocabulary, made float32 for the loss) are the largest thing evaluation holds (1.3 GB for 40
    rows of 64 tokens over SmolLM2's 49,152 tokens), and at the training batch no larger than a step's.
    The mean is over target tokens, so the batching leaves it as it was."""
    model.eval()
    total = tokens = 0.0
    for batch in tqdm(loader(examples, batch_size=min(config.batch_size, config.eval_batch_size), collate_fn=collate),
                      desc=f"{desc} loss", unit="batch", leave=False, disable=not config.progress):
        n = int((batch["labels"][:, 1:] != -100).sum())
        loss = model(**to_device(batch, model)).loss
        if not bool(torch.isfinite(loss)):
            raise DivergedError(f"{desc}: the model's loss is not finite: the run diverged. Lower --lr")
        total, tokens = total + float(loss) * n, tokens + n
    answers = generate_answers(model, [p for p, _ in examples], collate, config, desc)
    return {**exact_match(answers, [str(t) for _, t in examples]), "loss": total / max(tokens, 1)}


@torch.no_grad()
def generate_answers(model, prompts, collate, config: TrainConfig, desc: str = "generate") -> list[str]:
    """Greedy continuations of `prompts`, batched with left padding, cut at EOS or `max_new_tokens`: each
    the argmax token at every step, as the same prompt decoded alone would give."""
    model.eval()
    tokenizer, out = collate.tokenizer, []
    with _plain_greedy(model), _contiguous_head_input(model):
        for start in tqdm(range(0, len(prompts), config.eval_batch_size), desc=desc, unit="batch", leave=False,
                          disable=not config.progress):
            batch = to_device(collate.for_generation(prompts[start:start + config.eval_batch_size]), model)
            generated = model.generate(**batch, max_new_tokens=config.max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            out += tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:].cpu(), skip_special_tokens=True)
    return out


@contextlib.contextmanager
def _contiguous_head_input(model):
    """Hands the LM head a contiguous copy of its input while decoding. `generate` feeds it the last
    position only, `hidden[:, -1:, :]`, a view whose batch rows are not one stride apart; torch's matmul
    folds such an input into a matrix only when the weight requires grad, and otherwise runs a batched
    matmul over the head's weight expanded to the batch and made contiguous: [40, 576, 49152] in bf16 for
    SmolLM2, 2.2 GB, whenever the head is frozen (LoRA; child-d with tied embeddings left out). The copy
    is batch x hidden values (measured on that shape: 11 MiB extra instead of 2,171)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Module):
        yield
        return
    handle = head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _plain_greedy(model):
    """Sets aside the decoding defaults a model folder ships (`generation_config.json`: repetition
    penalties, banned n-grams, minimum lengths), which `generate` applies even to greedy decoding and
    even under an explicit `GenerationConfig` (it fills every unset field from the model's). Exact match
    then scores the model's own argmax answers, whatever folder it came from."""
    from transformers import GenerationConfig

    owner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft generates with its base
    saved = owner.generation_config
    owner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        owner.generation_config = saved
