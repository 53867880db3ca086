"""Using a tuned causal LM: completions of prompts from a run folder (its model, or base + delta) or a model.

`childtune generate RUN_OR_MODEL --prompt TEXT` is the one-line way to see what a run learned: a run
folder brings its own settings (chat template, max_length), a plain model folder or pinned name is used
as it is. `--image FILE` asks a vision-language run (`models.vlm`) about images instead (`answer_images`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import transformers

from childtune.data.batching import LMCollate
from childtune.data.types import TaskSpec
from childtune.delta import SparseDelta
from childtune.models import quantized
from childtune.training.config import TrainConfig
from childtune.training.evaluate import generate_answers
from childtune.training.export import base_for, check_base_files, run_kind
from childtune.training.models import ModelError, load_model, model_folder, quiet_transformers


def load_generator(source: str, config: TrainConfig) -> tuple[LMCollate, transformers.PreTrainedModel,
                                                              TrainConfig]:
    """The collate and causal LM `source` names, and the settings to generate with.

    A run folder (config.json + model/, delta/, or a QLoRA run's adapter/) supplies its own chat template and
    max_length; any other `source` is a model folder or pinned model name, used with `config`'s settings.
    """
    run = Path(source)
    kept = [part for part in ("model", "delta", "adapter") if (run / part).is_dir()]
    if (run / "config.json").is_file() and kept:
        if run_kind(run) != "generation":
            raise ModelError(f"{run} is a {run_kind(run)} run: only a causal LM (a generation run) generates text")
        saved = TrainConfig.load_json(run / "config.json")
        config = replace(config, chat_template=saved.chat_template or config.chat_template,
                         max_length=saved.max_length)
        if (run / "model").is_dir():
            with quiet_transformers():
                tokenizer = transformers.AutoTokenizer.from_pretrained(run / "model", local_files_only=True)
                model = transformers.AutoModelForCausalLM.from_pretrained(run / "model", local_files_only=True)
        elif saved.base_bits is not None:  # the base quantized as it trained, the run's change held over it
            delta = SparseDelta.load(run / "delta") if (run / "delta").is_dir() else None  # (QLoRA: its adapter)
            if delta is not None:
                check_base_files(delta, model_folder(saved.model))
            spec = TaskSpec(saved.task or run.name, "generation", 0, (), "exact_match")
            tokenizer, loaded = load_model(replace(saved, device=config.device), spec)
            model = cast(Any, loaded)  # a causal LM (a generation task's model), as from_pretrained's above
            if delta is not None:
                quantized.apply_delta(model, delta, model_folder(saved.model))
            else:
                with quantized.offline_bitsandbytes():
                    from peft import PeftModel
                with quiet_transformers():
                    model = cast(Any, PeftModel.from_pretrained(model, run / "adapter"))
        else:
            delta = SparseDelta.load(run / "delta")
            tokenizer, model = base_for(delta, model_folder(saved.model))
            delta.apply(model)
    else:
        path = model_folder(source)
        with quiet_transformers():
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            try:
                model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
            except (OSError, ValueError, KeyError) as err:
                raise ModelError(f"{path} is not a causal LM: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LMCollate(tokenizer, config.max_length, config.chat_template), model, config


def answer_images(source: str, images: Sequence[Path], question: str | None, config: TrainConfig) -> list[str]:
    """Greedy answers of a vision-language run (base + its delta) to `question` about each image (default:
    the question its task asked, `data.images.question`)."""
    from childtune.data.images import open_image
    from childtune.models import vlm
    from childtune.models.folders import is_vision_language

    run = Path(source)
    if not (run / "config.json").is_file() or not (run / "delta").is_dir():
        raise ModelError(f"{source} is not a run folder with a delta: --image asks a vision-language run")
    saved = TrainConfig.load_json(run / "config.json")
    if not is_vision_language(saved.model):
        raise ModelError(f"{run} was trained on {saved.model}, which reads no images: --image asks a "
                         "vision-language run (--model crnn-smollm2)")
    delta = SparseDelta.load(run / "delta")
    check_base_files(delta, model_folder(saved.model))
    spec = TaskSpec(saved.task or run.name, "generation", 0, (), "exact_match", inputs="image")
    processor, model = load_model(saved, spec)
    delta.apply(model)
    asked = question or (processor.question if saved.task else None)
    if not asked:
        raise ValueError(f"{run} was trained on your own images: give the question to ask with --prompt")
    collate = vlm.VLMCollate(processor.images, LMCollate(processor.tokenizer, saved.max_length, saved.chat_template),
                             asked)
    pictures = [open_image(Path(p)) for p in images]
    return generate_answers(model, pictures, collate, replace(config, max_length=saved.max_length), "generate")


def complete(source: str, prompts: Sequence[str], config: TrainConfig) -> list[str]:
    """Greedy completions of `prompts` by the model `source` names (see `load_generator`)."""
    if not prompts:
        raise ValueError("give at least one prompt")
    blank = next((i for i, p in enumerate(prompts, 1) if not p.strip()), None)
    if blank is not None:  # nothing to condition on: the tokenizer gives no tokens and generation has no start
        raise ValueError(f"prompt {blank} is empty: give a text to complete")
    collate, model, config = load_generator(source, config)
    return generate_answers(model, list(prompts), collate, config, "generate")
