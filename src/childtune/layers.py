"""Where a parameter sits in a transformer, read from its name alone.

Strategies, Fisher scoring and the analysis all ask the same questions of a parameter name ("which
block is this in?", "is it attention or FFN?"). Answering them from the dotted name, not from model
classes, is what lets childtune work on BERT, RoBERTa, GPT-2 or any `nn.Module` that stacks its
blocks in a `ModuleList`: `bert.encoder.layer.3.…` (BERT/RoBERTa), `model.layers.3.…` (Llama, Qwen,
Mistral, Gemma), `transformer.h.3.…` (GPT-2), `model.decoder.layers.3.…` (OPT), `gpt_neox.layers.3.…`
(GPT-NeoX/Pythia), `encoder.block.3.…` and `decoder.block.3.…` (T5: two stacks, kept apart).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """Index of the stacked block holding `name` (the first numeric path component), else None."""
    match = _INDEX.search(name)
    return int(match.group(1)) if match else None


def block_key(name: str) -> tuple[str, int] | None:
    """(the stack's path, the block's index) for a parameter inside a block, else None: T5's
    `encoder.block.0` and `decoder.block.0` are different blocks of different stacks."""
    match = _INDEX.search(name)
    return (name[: match.start()], int(match.group(1))) if match else None


def in_layer(name: str) -> bool:
    """The authors' default for what Fisher scores: parameters inside the stacked transformer blocks.

    Child-Tuning_D scored `'layer' in name` on BERT, leaving embeddings, pooler and classifier out;
    "inside a numbered block" is the same set on BERT and carries over to other architectures.
    """
    return layer_index(name) is not None


def blocks(names: Iterable[str]) -> list[list[str]]:
    """Names grouped bottom-up: [before the blocks], block 0, …, block N-1, [after the blocks].

    Registration order puts embeddings before the blocks and pooler/head after them, which is the
    order gradual unfreezing walks (top-down) and the order the analysis plots. Empty groups are dropped.
    """
    before: list[str] = []
    after: list[str] = []
    stacked: dict[tuple[str, int], list[str]] = {}
    stacks: list[str] = []  # in the order they first appear: an encoder's below its decoder's
    for name in names:
        key = block_key(name)
        if key is not None:
            if key[0] not in stacks:
                stacks.append(key[0])
            stacked.setdefault(key, []).append(name)
        elif stacked:
            after.append(name)
        else:
            before.append(name)
    ordered = sorted(stacked, key=lambda k: (stacks.index(k[0]), k[1]))
    groups = [before, *(stacked[k] for k in ordered), after]
    return [g for g in groups if g]


_TYPES = (
    ("layernorm", re.compile(r"layernorm|layer_norm|\bln_|\.ln\d*\.|norm", re.I)),
    ("embedding", re.compile(r"embed|\bwte\b|\bwpe\b", re.I)),
    ("attention", re.compile(r"attn|attention|self\.|q_proj|k_proj|v_proj|o_proj", re.I)),
    ("ffn", re.compile(r"intermediate|mlp|ffn|feed_forward|\.output\.dense|fc\d*|up_proj|down_proj|gate_proj|"
                       r"DenseReluDense|dense_h_to_4h|dense_4h_to_h", re.I)),
    ("head", re.compile(r"classifier|pooler|score|lm_head|head", re.I)),
)


def parameter_type(name: str) -> str:
    """Coarse role of a parameter (attention, ffn, layernorm, embedding, head, other) for analysis."""
    for label, pattern in _TYPES:
        if pattern.search(name):
            return label
    return "other"


HEAD = ("classifier", "score", "classification_head", "connector.")
"""Name fragments of task heads, and of the connector between a vision-language model's pretrained parts.
They are newly initialised per task (per assembly), so the masking strategies train them in full, a sparse
delta stores them whole, and the analysis leaves them out of every share."""


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether any of `patterns` (name fragments) occurs in `name`."""
    return any(p in name for p in patterns)
