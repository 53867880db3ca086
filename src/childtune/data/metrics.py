"""Scoring predictions against gold labels, the same way for training, studies and reports.

Checkpoint selection, the final test numbers, transfer runs and the study tables all read the scores
computed here, so one task's numbers are comparable wherever they appear.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from childtune.data.types import TaskSpec

RANGES: dict[str, tuple[float, float]] = {
    "accuracy": (0.0, 1.0), "f1": (0.0, 1.0), "macro_f1": (0.0, 1.0), "exact_match": (0.0, 1.0),
    "mcc": (-1.0, 1.0), "pearson": (-1.0, 1.0), "spearman": (-1.0, 1.0), "loss": (0.0, math.inf),
}
"""The values each score computed here can take, so a stored score outside them is known to be damaged
(the study ledger checks every record against them). Any other metric must be a finite number."""


def _numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def compute_metrics(
    spec: TaskSpec, predictions: Any, labels: Any, extra: Sequence[str] = ()
) -> dict[str, float]:
    """Scores of predictions (class ids or logits; regression values) against gold labels.

    Classification: accuracy, macro F1 and, for binary tasks, F1 of class 1; `extra=("mcc",)` adds
    Matthews correlation. Regression: Pearson and Spearman correlation, 0.0 where either side is constant
    (scipy's NaN): a model that predicts one value tells nothing about the label, which is how sklearn's
    `matthews_corrcoef` scores a constant classifier too, and a NaN score is a run the ledger cannot record.
    """
    from scipy.stats import ConstantInputWarning, pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    preds, gold = _numpy(predictions), _numpy(labels)
    if spec.kind == "classification" and preds.ndim == 2:
        preds = preds.argmax(axis=-1)
    if spec.kind == "regression" and preds.ndim == 2 and preds.shape[1] == 1:
        preds = preds[:, 0]
    if preds.ndim != 1 or preds.shape != gold.shape:
        raise ValueError(f"predictions of shape {preds.shape} do not match labels of shape {gold.shape}")
    if len(gold) == 0:
        raise ValueError("cannot score zero examples")
    unknown = set(extra) - {"mcc"}
    if unknown or (extra and spec.kind == "regression"):
        raise ValueError(
            f"extra metrics {sorted(set(extra))} not available for {spec.kind}; only 'mcc' for classification"
        )
    if spec.kind == "regression":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConstantInputWarning)
            scores = {"pearson": float(pearsonr(preds, gold).statistic),
                      "spearman": float(spearmanr(preds, gold).statistic)}
        return {name: 0.0 if math.isnan(value) else value for name, value in scores.items()}
    classes = list(range(spec.num_labels))
    out = {
        "accuracy": float(accuracy_score(gold, preds)),
        "macro_f1": float(f1_score(gold, preds, labels=classes, average="macro", zero_division=0)),
    }
    if spec.num_labels == 2:
        out["f1"] = float(f1_score(gold, preds, pos_label=1, average="binary", zero_division=0))
    if "mcc" in extra:
        out["mcc"] = float(matthews_corrcoef(gold, preds))
    return out


def normalise_answer(text: str) -> str:
    """An answer as exact match compares it: stripped, lower-cased, inner whitespace collapsed, and a
    trailing full stop dropped ("Paris." and " paris" are the same answer)."""
    text = " ".join(text.strip().lower().split())
    return text[:-1].rstrip() if text.endswith(".") else text


def exact_match(predictions: Sequence[str], targets: Sequence[str]) -> dict[str, float]:
    """Share of generated answers equal to their target after `normalise_answer`."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    if not targets:
        raise ValueError("cannot score zero examples")
    hits = sum(normalise_answer(p) == normalise_answer(t) for p, t in zip(predictions, targets, strict=True))
    return {"exact_match": hits / len(targets)}
