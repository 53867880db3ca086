"""Scoring a model during and after training, and counting what a run touched and what it cost."""

from __future__ import annotations

import contextlib
import resource
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from childtune.data.metrics import compute_metrics
from childtune.training.config import TrainConfig
from childtune.training.inputs import loader


class DivergedError(ValueError):
    """The model's outputs are not finite numbers: its weights diverged, and any score would be made up."""


@torch.no_grad()
def evaluate(model, examples, spec, collate, config: TrainConfig, desc: str) -> dict[str, float]:
    """Metrics of the model on `examples` (dropout off), batched with dynamic padding."""
    model.eval()
    outputs, labels = [], []
    batches = loader(examples, batch_size=config.eval_batch_size, collate_fn=collate)
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False, disable=not config.progress):
        labels.append(batch.pop("labels"))
        logits = model(**batch).logits.float()
        if not bool(torch.isfinite(logits).all()):
            raise DivergedError(f"{desc}: the model's outputs are not finite (NaN or inf): the run diverged, so no "
                                "score is reported. Lower --lr")
        outputs.append(logits)
    return compute_metrics(spec, torch.cat(outputs), torch.cat(labels), config.metric_extra)


def count_elements(pretrained: dict[str, torch.Tensor], model: torch.nn.Module, params: dict[str, torch.Tensor],
                   masks: dict[str, torch.Tensor] | None) -> dict[str, int | None]:
    """Sizes that say what a run touched: elements it may change, did change, and changed outside its child."""
    changed = outside = 0
    for name, tensor in model.state_dict().items():
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
