"""Using a finished run: its sparse delta against the base (`export_delta`), and base + delta as a
Hugging Face model folder (`apply_delta`)."""

from __future__ import annotations

import os
from pathlib import Path

from childtune.delta import DeltaError, SparseDelta
from childtune.fileio import write_json
from childtune.training.config import TrainConfig
from childtune.training.models import model_folder, quiet_transformers
from childtune.training.runfolder import RunFolder


def export_delta(run: str | os.PathLike, output: str | os.PathLike, *, overwrite: bool = False):
    """The sparse delta of a finished run against its base model, written to `output`.

    A strict run saved one already (`delta/`); for a run that kept its whole model, the delta is
    extracted here against the base named in its config.json (dense for full fine-tuning, but exact).
    """
    import transformers

    run = Path(run)
    if not (run / "config.json").is_file():
        raise FileNotFoundError(f"{run} is not a run folder (no config.json)")
    folder = RunFolder(output, overwrite)
    if (run / "delta").is_dir():
        delta = SparseDelta.load(run / "delta")
    elif (run / "model").is_dir():
        config = TrainConfig.load_json(run / "config.json")
        with quiet_transformers():
            tuned = transformers.AutoModelForSequenceClassification.from_pretrained(run / "model",
                                                                                    local_files_only=True)
            base = transformers.AutoModelForSequenceClassification.from_pretrained(
                model_folder(config.model), num_labels=tuned.config.num_labels, local_files_only=True)
        head = {"num_labels": tuned.config.num_labels, "kind": "regression" if tuned.config.num_labels == 1
                else "classification", "label_names": [tuned.config.id2label[i] for i in
                                                        range(tuned.config.num_labels)]}
        delta = SparseDelta.from_training(base.state_dict(), tuned, method=config.method,
                                          hparams={**config.to_dict(), **head}, base_model=config.model)
    else:
        raise FileNotFoundError(f"{run} holds no saved weights (neither delta/ nor model/); was it run with "
                                "--save none?")
    with folder as work:
        delta.save(work)
    return delta


def apply_delta(delta_dir: str | os.PathLike, output: str | os.PathLike, *, model: str | None = None,
                overwrite: bool = False) -> Path:
    """Base model + delta, saved as a Hugging Face model folder (with the base's tokenizer) in `output`."""
    import transformers

    delta_dir = Path(delta_dir)
    if (delta_dir / "delta").is_dir():
        delta_dir = delta_dir / "delta"
    folder = RunFolder(output, overwrite)
    delta = SparseDelta.load(delta_dir)
    name = model or delta.config.base_model
    if not name:
        raise DeltaError("the delta names no base model; pass --model")
    hparams = delta.config.hparams
    num_labels = hparams.get("num_labels") or next(iter(delta.dense.values())).shape[0]
    labels = {"num_labels": num_labels}
    if hparams.get("label_names"):
        labels["id2label"] = dict(enumerate(hparams["label_names"]))
        labels["label2id"] = {n: i for i, n in enumerate(hparams["label_names"])}
    if hparams.get("kind") == "regression":
        labels["problem_type"] = "regression"
    path = model_folder(name)
    with quiet_transformers():
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        tuned = transformers.AutoModelForSequenceClassification.from_pretrained(path, **labels, local_files_only=True)
    delta.apply(tuned)
    with folder as work, quiet_transformers():
        tuned.save_pretrained(work)
        tokenizer.save_pretrained(work)
        write_json(work / "childtune.json", {"delta": str(delta_dir), "base_model": name,
                                             "method": delta.config.method,
                                             "changed_params": delta.config.num_changed})
    return Path(output)
