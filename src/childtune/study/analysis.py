"""Which pretrained weights a child network uses: per-layer and per-type shares, and overlaps.

The Child-Tuning paper's claim that a task's child network is task-specific is a claim about sets, so
this module compares sets: each child network is its masks (`childtune.masks`, name -> bool tensor),
loaded from a masks file or a sparse delta. Task heads are left out by default (`EXCLUDE`): they are
newly initialised, trained in full and shaped per task, so they say nothing about which *pretrained*
weights a task relies on, and they would not line up between a regression and a classification task.
A parameter absent from a child network's masks counts as not chosen at all.

Overlap is reported next to what chance alone would give: two unrelated child networks of densities
p and q still share about pq / (p + q - pq) of their union (0.11 for two 20% networks), and an
overlap is only evidence of shared structure above that level.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from childtune.data.assets import AssetError
from childtune.delta import CONFIG_FILE, TENSORS_FILE, SparseDelta
from childtune.fileio import atomic_write
from childtune.layers import HEAD, block_key, blocks, layer_index, parameter_type
from childtune.masks import MASKS_FILE, Masks, count
from childtune.study.tables import save_figure, write_csv
from childtune.training.models import model_folder

MaskMap = Mapping[str, torch.Tensor]

EXCLUDE = HEAD
"""Task heads are left out of every statistic unless the caller says otherwise."""

TYPES = ("embedding", "attention", "ffn", "layernorm", "head", "other")
EMBEDDINGS, TOP = "embeddings", "top"


# --------------------------------------------------------------------------- loading child networks


def load_masks(path: str | Path) -> Masks:
    """A child network from a masks file, a sparse delta, or a run folder holding either.

    A sparse delta's child network is the set of elements the run changed (`SparseDelta.masks`); for a
    strict run that is its child network, less any element whose gradient never moved it. Masks may be
    stored as bool or as 0/1 integers; anything else is refused rather than thresholded.
    """
    path = Path(path)
    delta_dir = _delta_dir(path)
    if delta_dir is not None:
        delta = SparseDelta.load(delta_dir)
        masks = {n: m.bool() for n, m in delta.masks().items()}
        shapes = base_shapes(delta.config.base_model)
        if shapes is None:
            warnings.warn(f"{delta_dir}: base model {delta.config.base_model!r} not found; shares are over the "
                          "tensors the delta changed only, not the whole model", stacklevel=2)
            return masks
        return complete(masks, shapes, exclude=delta.config.dense_patterns)
    if path.is_dir():
        path = path / MASKS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no child network at {path}: expected a masks .safetensors file, a delta "
                                "folder, or a run folder holding one")
    from safetensors.torch import load_file

    try:
        stored = load_file(str(path))
    except Exception as err:  # safetensors raises its own SafetensorError for a damaged file
        raise ValueError(f"{path} is not a readable masks file: {str(err).splitlines()[0][:160]}") from None
    out: Masks = {}
    for name, tensor in stored.items():
        if tensor.dtype != torch.bool:
            if tensor.is_floating_point() or not bool(((tensor == 0) | (tensor == 1)).all()):
                raise ValueError(f"{path}: {name!r} is not a mask (dtype {tensor.dtype}, values not all 0/1)")
            tensor = tensor.bool()
        out[name] = tensor
    return out


def complete(masks: MaskMap, shapes: Mapping[str, tuple[int, ...]], exclude: Iterable[str] = EXCLUDE) -> Masks:
    """`masks` plus an all-False mask for every other parameter in `shapes` (outside `exclude`).

    A sparse delta lists only the tensors a run changed; a tensor the child network never touched is
    absent, yet it belongs in the denominator of its layer's share.
    """
    exclude = tuple(exclude)
    out = dict(masks)
    for name, shape in shapes.items():
        if name in out:
            if tuple(out[name].shape) != tuple(shape):
                raise ValueError(f"{name!r}: mask has shape {tuple(out[name].shape)}, the model has {tuple(shape)}")
        elif not any(e in name for e in exclude):
            out[name] = torch.zeros(shape, dtype=torch.bool)
    return out


@functools.lru_cache(maxsize=4)
def base_shapes(model: str) -> dict[str, tuple[int, ...]] | None:
    """Parameter names and shapes of a sequence classifier on `model` (a folder or pinned name).

    Built on the meta device from the model's config, so no weights are read; None when the model
    cannot be found (a delta moved to another machine).
    """
    if not model:
        return None
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(model_folder(model), local_files_only=True)
    except (OSError, ValueError, AssetError):
        return None
    with torch.device("meta"):
        net = AutoModelForSequenceClassification.from_config(config)
    return {n: tuple(t.shape) for n, t in net.state_dict().items()}


def base_of(path: str | Path) -> tuple[str, str]:
    """(name, weights fingerprint) of the base model a saved child network was chosen on, "" where its files do
    not say: a delta records both, a run folder that kept masks only its config's model, a bare file neither."""
    import json

    from childtune.training.config import TrainConfig

    path = Path(path)
    delta_dir = _delta_dir(path)
    try:
        if delta_dir is not None:
            raw = json.loads((delta_dir / CONFIG_FILE).read_text(encoding="utf-8"))
            return str(raw.get("base_model") or ""), str(raw.get("base_fingerprint") or "")
        config = (path if path.is_dir() else path.parent) / "config.json"
        return (TrainConfig.load_json(config).model, "") if config.is_file() else ("", "")
    except (OSError, ValueError, AttributeError):  # unreadable: loading the masks says what is wrong
        return "", ""


def check_same_base(paths: Mapping[str, Path]) -> None:
    """Refuse child networks chosen on different base models. Which weights a task relies on is a question
    about one set of weights; across bases an overlap only counts positions that happen to coincide.
    Fingerprints decide where both inputs have one, else model names (paths resolved); unknown bases pass."""
    bases = {label: base_of(path) for label, path in paths.items()}
    for a, b in itertools.combinations(bases, 2):
        if _different(bases[a], bases[b]):
            raise ValueError(f"{a!r} and {b!r} were chosen on different base models ({_base_label(*bases[a])} and "
                             f"{_base_label(*bases[b])}): overlaps across bases are meaningless; analyse each "
                             "base's child networks apart")


def _different(a: tuple[str, str], b: tuple[str, str]) -> bool:
    (name_a, print_a), (name_b, print_b) = a, b
    if print_a and print_b:
        return print_a != print_b
    return bool(name_a and name_b) and _model_key(name_a) != _model_key(name_b)


def _model_key(name: str) -> str:
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _base_label(name: str, fingerprint: str) -> str:
    return (name or "unnamed") + (f", weights {fingerprint[:12]}" if fingerprint else "")


def _delta_dir(path: Path) -> Path | None:
    """The delta folder `path` names: the folder itself, its tensor file, or a run folder's `delta/`."""
    if path.is_file():
        return path.parent if path.name == TENSORS_FILE and (path.parent / CONFIG_FILE).is_file() else None
    for candidate in (path, path / "delta"):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    return None


# --------------------------------------------------------------------------- shares


@dataclass(frozen=True)
class Share:
    """One group of parameters (a layer, or a parameter type) and how much of it the child holds.

    `density`: the fraction of the group's elements that are in the child network (what a heatmap
    row shows: does the task use this layer?). `share`: the fraction of the child network that lies in
    the group (where its budget went).
    """

    group: str
    chosen: int
    total: int
    child: int

    @property
    def density(self) -> float:
        return self.chosen / self.total if self.total else 0.0

    @property
    def share(self) -> float:
        return self.chosen / self.child if self.child else 0.0


def _kept(masks: MaskMap, exclude: Iterable[str]) -> dict[str, torch.Tensor]:
    exclude = tuple(exclude)
    return {n: m for n, m in masks.items() if not any(e in n for e in exclude)}


def layer_group(name: str, position: str = "before", parted: bool = False) -> str:
    """`layer i` for a parameter inside block i (`<part>.<stack> i` when `parted`: a model of parts, whose
    towers' blocks are several stacks, e.g. `vision.ConvNet 3`, `language.layers 12`); else `embeddings` or
    `top` (pooler, final norm, head).

    A parameter outside the blocks is placed by its name when the name says what it is (embeddings
    below, pooler and heads on top), whatever order it was saved in: safetensors files come back
    sorted by name, which puts GPT-2's `wte` after its blocks. Otherwise `position` (before or after
    the blocks in the given order) decides.
    """
    index = layer_index(name)
    if index is not None:
        if not parted:
            return f"layer {index}"
        stack = (block_key(name) or ("", 0))[0]
        return f"{name.split('.')[0]}.{stack.split('.')[-1]} {index}"
    if parameter_type(name) == "embedding" or "embed" in name.lower():
        return EMBEDDINGS
    if parameter_type(name) == "head":
        return TOP
    return EMBEDDINGS if position == "before" else TOP


def _group_order(label: str) -> tuple[int, str, int]:
    if label == EMBEDDINGS:
        return (0, "", 0)
    if label == TOP:
        return (2, "", 0)
    part, index = label.rsplit(" ", 1)
    return (1, part, int(index))


def parts(names: Iterable[str]) -> list[str]:
    """The top-level modules (first name component) that hold stacked blocks, in order of appearance: one
    for a plain model (`bert`, `model`), a part each for a model of parts (the vision-language model's
    `vision` and `language`)."""
    return list(dict.fromkeys(n.split(".")[0] for n in names if layer_index(n) is not None))


def _layer_groups(names: Iterable[str], parted: bool | None = None) -> dict[str, str]:
    """name -> layer group, using `blocks` to tell what came before the stacked blocks from after; blocks
    labelled by part when `parted` (default: when `names` span several parts)."""
    names = list(names)
    grouped = blocks(names)
    parted = len(parts(names)) > 1 if parted is None else parted
    seen_block = False
    out = {}
    for group in grouped:
        numbered = layer_index(group[0]) is not None
        seen_block = seen_block or numbered
        for name in group:
            out[name] = layer_group(name, "after" if seen_block and not numbered else "before", parted)
    return out


def _shares(masks: MaskMap, key: Mapping[str, str], order) -> list[Share]:
    chosen: dict[str, int] = {}
    total: dict[str, int] = {}
    for name, mask in masks.items():
        group = key[name]
        chosen[group] = chosen.get(group, 0) + int(mask.sum())
        total[group] = total.get(group, 0) + mask.numel()
    child = sum(chosen.values())
    return [Share(g, chosen[g], total[g], child) for g in sorted(total, key=order)]


def layer_share(masks: MaskMap, exclude: Iterable[str] = EXCLUDE, parted: bool | None = None) -> list[Share]:
    """The child network per layer, bottom-up: embeddings, layer 0 … layer N-1, top (blocks labelled by
    part when `parted`, which several networks of one model of parts share: `is_parted`)."""
    kept = _kept(masks, exclude)
    return _shares(kept, _layer_groups(kept, parted), _group_order)


def is_parted(named_masks: Mapping[str, MaskMap]) -> bool:
    """Whether the child networks, together, hold blocks of several parts: then every one of them labels its
    blocks by part, even one that lies in a single part (a vision-only child network of the VLM)."""
    return len(parts(n for masks in named_masks.values() for n in masks)) > 1


def part_share(masks: MaskMap, exclude: Iterable[str] = EXCLUDE) -> list[Share]:
    """The child network per top-level module (first name component), in model order: for a model of parts,
    how much of it each tower holds (a vision-language model's `vision` against its `language`)."""
    kept = _kept(masks, exclude)
    order = list(dict.fromkeys(n.split(".")[0] for n in kept))
    return _shares(kept, {n: n.split(".")[0] for n in kept}, order.index)


def type_share(masks: MaskMap, exclude: Iterable[str] = EXCLUDE) -> list[Share]:
    """The child network per parameter type (`childtune.layers.parameter_type`)."""
    kept = _kept(masks, exclude)
    return _shares(kept, {n: parameter_type(n) for n in kept}, TYPES.index)


# --------------------------------------------------------------------------- overlap


def _aligned(a: MaskMap, b: MaskMap, exclude: Iterable[str]):
    a, b = _kept(a, exclude), _kept(b, exclude)
    for name in a.keys() & b.keys():
        if a[name].shape != b[name].shape:
            raise ValueError(
                f"{name!r} has shape {tuple(a[name].shape)} in one child network and {tuple(b[name].shape)} "
                "in the other: they come from different models"
            )
    return a, b


def jaccard(a: MaskMap, b: MaskMap, exclude: Iterable[str] = EXCLUDE) -> float:
    """|A n B| / |A u B| over all elements; two empty child networks are identical (1.0, as scipy)."""
    a, b = _aligned(a, b, exclude)
    inter = sum(int((a[n] & b[n].to(a[n].device)).sum()) for n in a.keys() & b.keys())
    union = count(a) + count(b) - inter
    return inter / union if union else 1.0


def chance_jaccard(a: MaskMap, b: MaskMap, exclude: Iterable[str] = EXCLUDE) -> float:
    """Expected Jaccard of two random child networks with the same size as `a` and `b` in every tensor.

    Per tensor of n elements holding k_a and k_b chosen ones, a uniformly random pair meets in
    k_a k_b / n elements on average; summing per tensor keeps a method that concentrates on some
    layers from looking like shared structure. (Ratio of expectations: exact to O(1/n).)
    """
    a, b = _aligned(a, b, exclude)
    inter = 0.0
    for name in a.keys() & b.keys():
        inter += int(a[name].sum()) * int(b[name].sum()) / a[name].numel()
    union = count(a) + count(b) - inter
    return inter / union if union else 1.0


@dataclass(frozen=True)
class Overlap:
    """Pairwise Jaccard overlaps of named child networks, with the chance level of each pair."""

    labels: tuple[str, ...]
    values: np.ndarray
    chance: np.ndarray


def overlap_matrix(named_masks: Mapping[str, MaskMap], exclude: Iterable[str] = EXCLUDE) -> Overlap:
    labels = tuple(named_masks)
    n = len(labels)
    values, chance = np.eye(n), np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            a, b = named_masks[labels[i]], named_masks[labels[j]]
            values[i, j] = values[j, i] = jaccard(a, b, exclude)
            chance[i, j] = chance[j, i] = chance_jaccard(a, b, exclude)
    for i in range(n):  # an empty child network is identical to itself; say so rather than assume
        values[i, i] = jaccard(named_masks[labels[i]], named_masks[labels[i]], exclude)
    return Overlap(labels, values, chance)


# --------------------------------------------------------------------------- plots


def _share_grid(tables: Mapping[str, list[Share]], order) -> tuple[list[str], np.ndarray]:
    columns = sorted({s.group for rows in tables.values() for s in rows}, key=order)
    grid = np.full((len(tables), len(columns)), np.nan)
    for i, rows in enumerate(tables.values()):
        for s in rows:
            grid[i, columns.index(s.group)] = s.density
    return columns, grid


def _heatmap(ax, grid: np.ndarray, rows: list[str], columns: list[str], text: Callable[[int, int], str], cmap: str,
             vmax: float):
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=35, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            value = grid[i, j]
            if math.isnan(value):
                continue
            r, g, b, _ = image.cmap(image.norm(value))
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # text in whichever colour the cell lets you read
            ax.text(j, i, text(i, j), ha="center", va="center", fontsize=8, color="white" if dark else "black")
    return image


def plot_layer_share(named_masks: Mapping[str, MaskMap], path: str | Path,
                     exclude: Iterable[str] = EXCLUDE) -> Path:
    """Heatmaps of each child network's density per layer (left) and per parameter type (right).

    Rows are child networks labelled with their overall density; a dark cell is a layer the task
    updates much of, a pale one a layer it leaves almost untouched.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exclude = tuple(exclude)
    parted = is_parted(named_masks)
    layers = {k: layer_share(m, exclude, parted) for k, m in named_masks.items()}
    types = {k: type_share(m, exclude) for k, m in named_masks.items()}
    rows = []
    for label, table in layers.items():
        total = sum(s.total for s in table)
        rows.append(f"{label} ({100 * sum(s.chosen for s in table) / total:.1f}%)" if total else label)
    layer_cols, layer_grid = _share_grid(layers, _group_order)
    type_cols, type_grid = _share_grid(types, TYPES.index)
    vmax = max(float(np.nanmax(np.concatenate([layer_grid.ravel(), type_grid.ravel()]), initial=0.0)), 1e-9)
    width = 2.0 + 0.75 * (len(layer_cols) + len(type_cols))
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(width, 2.2 + 0.45 * len(rows)), gridspec_kw={"width_ratios": [len(layer_cols), len(type_cols)]},
        constrained_layout=True,
    )
    pct = lambda grid: lambda i, j: f"{100 * grid[i, j]:.0f}"  # noqa: E731
    _heatmap(left, layer_grid, rows, layer_cols, pct(layer_grid), "Blues", vmax)
    image = _heatmap(right, type_grid, rows, type_cols, pct(type_grid), "Blues", vmax)
    right.set_yticks(range(len(rows)), [""] * len(rows))
    left.set_title("per layer (bottom → top)")
    right.set_title("per parameter type")
    fig.suptitle("Share of each group's weights in the child network (%)")
    fig.colorbar(image, ax=[left, right], label="share of the group chosen", shrink=0.9, aspect=12)
    return save_figure(fig, path)


def plot_overlap(overlap: Overlap, path: str | Path, title: str = "Child-network overlap (Jaccard)") -> Path:
    """Heatmap of pairwise Jaccard overlap; each cell also shows the chance level for that pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(overlap.labels)
    size = 2.5 + 1.1 * n
    fig, ax = plt.subplots(figsize=(size + 1.2, size), constrained_layout=True)
    values, chance = overlap.values.copy(), overlap.chance
    # The diagonal (each network with itself) is left grey so the colour scale spans the pairs only.
    np.fill_diagonal(values, np.nan)
    vmax = max(float(np.nanmax(values, initial=0.0)), 1e-9)

    def text(i: int, j: int) -> str:
        return f"{values[i, j]:.3f}\n(chance {chance[i, j]:.3f})"

    ax.set_facecolor("0.85")
    image = _heatmap(ax, values, list(overlap.labels), list(overlap.labels), text, "viridis", vmax)
    for i in range(n):
        ax.text(i, i, "self", ha="center", va="center", fontsize=8, color="0.4")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="|A ∩ B| / |A ∪ B|")
    return save_figure(fig, path)


# --------------------------------------------------------------------------- tables and the whole report


def share_markdown(tables: Mapping[str, list[Share]], what: str) -> str:
    """One Markdown table: a row per child network, a column per group, cells 'density (share)' in %."""
    groups = list(dict.fromkeys(s.group for rows in tables.values() for s in rows))
    if what == "layer":
        columns = sorted(groups, key=_group_order)
    else:
        columns = sorted(groups, key=TYPES.index) if what == "type" else groups  # parts: in model order
    lines = [f"| child network | {' | '.join(columns)} |", "|---" * (len(columns) + 1) + "|"]
    for label, rows in tables.items():
        by = {s.group: s for s in rows}
        cells = [f"{100 * by[c].density:.1f} ({100 * by[c].share:.1f})" if c in by else "" for c in columns]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def overlap_markdown(overlap: Overlap) -> str:
    labels = overlap.labels
    lines = [f"| | {' | '.join(labels)} |", "|---" * (len(labels) + 1) + "|"]
    for i, row in enumerate(labels):
        cells = [
            f"{overlap.values[i, j]:.3f}" if i == j else f"{overlap.values[i, j]:.3f} ({overlap.chance[i, j]:.3f})"
            for j in range(len(labels))
        ]
        lines.append(f"| {row} | {' | '.join(cells)} |")
    return "\n".join(lines)


def analyze(inputs: Mapping[str, str | Path | MaskMap], output_dir: str | Path,
            exclude: Iterable[str] = EXCLUDE) -> dict[str, Path]:
    """Load each named child network (a path, or masks already in memory) and write the analysis.

    Writes `layer_share.csv`, `type_share.csv`, `overlap.csv`, `analysis.md`, `layer_share.png` and
    `overlap.png` (only with two or more child networks) into `output_dir`; returns them by stem.
    """
    if not inputs:
        raise ValueError("analyze needs at least one child network")
    exclude = tuple(exclude)
    check_same_base({k: Path(v) for k, v in inputs.items() if not isinstance(v, Mapping)})
    named = {k: v if isinstance(v, Mapping) else load_masks(v) for k, v in inputs.items()}
    out = Path(output_dir)
    parted = is_parted(named)
    layers = {k: layer_share(m, exclude, parted) for k, m in named.items()}
    types = {k: type_share(m, exclude) for k, m in named.items()}
    header = ["child_network", "group", "chosen", "total", "density", "share"]
    paths = {
        "layer_share": write_csv(out / "layer_share.csv", header, _share_rows(layers)),
        "type_share": write_csv(out / "type_share.csv", header, _share_rows(types)),
    }
    sections = [
        "# Child-network analysis",
        "Cells are *density (share)* in %: density = fraction of the group's weights in the child network; "
        "share = fraction of the child network in the group. Task heads are excluded"
        + (f" (names containing {', '.join(map(repr, exclude))})." if exclude else " only if asked (none here)."),
    ]
    if parted:  # a model of parts: where the towers stand first
        by_part = {k: part_share(m, exclude) for k, m in named.items()}
        paths["part_share"] = write_csv(out / "part_share.csv", header, _share_rows(by_part))
        sections += ["## Per part", share_markdown(by_part, "part")]
    sections += [
        "## Per layer", share_markdown(layers, "layer"),
        "## Per parameter type", share_markdown(types, "type"),
        "![layer share](layer_share.png)",
    ]
    paths["layer_share_png"] = plot_layer_share(named, out / "layer_share.png", exclude)
    if len(named) > 1:
        overlap = overlap_matrix(named, exclude)
        labels = overlap.labels
        pairs = [(labels[i], labels[j], overlap.values[i, j], overlap.chance[i, j])
                 for i in range(len(labels)) for j in range(i + 1, len(labels))]
        paths["overlap"] = write_csv(out / "overlap.csv", ["a", "b", "jaccard", "chance"], pairs)
        paths["overlap_png"] = plot_overlap(overlap, out / "overlap.png")
        sections += [
            "## Overlap",
            "Jaccard |A ∩ B| / |A ∪ B|; in brackets the chance level: what two random child networks with the "
            "same per-tensor sizes would share on average.",
            overlap_markdown(overlap),
            "![overlap](overlap.png)",
        ]
    paths["analysis"] = atomic_write(out / "analysis.md", "\n\n".join(sections) + "\n")
    return paths


def _share_rows(tables: Mapping[str, list[Share]]):
    for label, rows in tables.items():
        for s in rows:
            yield label, s.group, s.chosen, s.total, f"{s.density:.6f}", f"{s.share:.6f}"


# --------------------------------------------------------------------------- naming inputs


def parse_inputs(items: Iterable[str]) -> dict[str, Path]:
    """`NAME=PATH` or `PATH` (named after the run it came from) -> {name: path}; names must be unique."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or Path(item).exists():
            name, path = describe(Path(item)), item
        if name in out:
            raise ValueError(f"two child networks are both named {name!r}; name them with NAME=PATH")
        out[name] = Path(path)
    return out


def describe(path: Path) -> str:
    """A readable name for a saved child network: `task method s<seed>` from its run or delta config."""
    import json

    for candidate, key in ((path / "config.json", None), (path / "delta" / "delta_config.json", "hparams"),
                           (path / "delta_config.json", "hparams"), (path.parent / "delta_config.json", "hparams")):
        if candidate.is_file():
            try:
                raw = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                break
            conf = raw.get(key, {}) if key and isinstance(raw, dict) else raw
            if not isinstance(conf, dict):  # a hand-edited file: the name falls back to the path's
                break
            task = conf.get("task") or Path(str(conf.get("train_file") or path.name)).stem
            if conf.get("method") is not None and conf.get("seed") is not None:
                return f"{task} {conf['method']} s{conf['seed']}"
    return path.stem if path.is_file() else path.name
