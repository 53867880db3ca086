"""Scoring a model during and after training, and counting what a run touched and what it cost."""

from __future__ import annotations

import contextlib
import resource
import sys
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


def count_elements(pretrained: dict[str, torch.Tensor], model: torch.nn.Module, params: dict[str, torch.Tensor],
                   masks: dict[str, torch.Tensor] | None) -> dict[str, int | None]:
    """Sizes that say what a run touched: elements it may change, did change, and changed outside its child.

    Tied weights (a causal LM's embeddings and LM head) are one tensor under two names: counted once."""
    changed = outside = 0
    seen = set()
    for name, tensor in model.state_dict().items():
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
    return {
        "total_params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in params.values()),
        "child_params": child,
        "changed_params": changed,
        "changed_outside_child": outside if masks is not None else None,
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


@torch.no_grad()
def evaluate_generation(model, examples, collate, config: TrainConfig, desc: str) -> dict[str, float]:
    """Exact match of greedy answers, and the mean per-token loss of the targets (teacher forced)."""
    model.eval()
    total = tokens = 0.0
    for batch in tqdm(loader(examples, batch_size=config.eval_batch_size, collate_fn=collate), desc=f"{desc} loss",
                      unit="batch", leave=False, disable=not config.progress):
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
    with _plain_greedy(model):
        for start in tqdm(range(0, len(prompts), config.eval_batch_size), desc=desc, unit="batch", leave=False,
                          disable=not config.progress):
            batch = to_device(collate.for_generation(prompts[start:start + config.eval_batch_size]), model)
            generated = model.generate(**batch, max_new_tokens=config.max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            out += tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:].cpu(), skip_special_tokens=True)
    return out


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
