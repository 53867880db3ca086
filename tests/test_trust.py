"""Every file childtune trusts (issue 28): a base model, a delta's config, a label or a prompt that is not
what it seems ends in one clear error naming it, never in a traceback or a silently wrong result.

Cached model files are checked in tests/test_assets.py (`test_cached_model_file_changed_...`).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertForSequenceClassification

from childtune import ChildOptimizer, ChildTuningD, ChildTuningF
from childtune.cli import main
from childtune.data.types import DataError
from childtune.data.userfiles import load_files
from childtune.delta import CONFIG_FILE, DeltaConfig, DeltaError, SparseDelta
from childtune.study.analysis import analyze, check_same_base
from childtune.training.export import apply_delta

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_bert_config
from test_resume import run_config, tiny_run_files


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    return tiny_run_files(tmp_path_factory.mktemp("trust"))


@pytest.fixture(scope="module")
def strict_run(tmp_path_factory, tiny) -> Path:
    """A finished child-d run: strict, so it saved a sparse delta with its base's files recorded."""
    from childtune.training.loop import train

    output = tmp_path_factory.mktemp("strict") / "run"
    train(run_config(tiny, "child-d", epochs=1, output=str(output)))
    return output


def cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def edited_delta(run: Path, to: Path, change) -> Path:
    """A copy of the run's delta whose config went through `change(config)`, as a hand edit leaves it."""
    shutil.copytree(run / "delta", to)
    config = json.loads((to / CONFIG_FILE).read_text())
    change(config)
    (to / CONFIG_FILE).write_text(json.dumps(config))
    return to


# ------------------------------------------------------------------------------- the base of a delta


def swapped_tokenizer(model: Path, to: Path) -> Path:
    """The same weights with a tokenizer whose [CLS] and [SEP] ids are swapped."""
    shutil.copytree(model, to)
    tokenizer = json.loads((to / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["[CLS]"], vocab["[SEP]"] = vocab["[SEP]"], vocab["[CLS]"]
    (to / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert AutoTokenizer.from_pretrained(to)("x")["input_ids"] != AutoTokenizer.from_pretrained(model)("x")["input_ids"]
    return to


def test_apply_refuses_a_base_whose_tokenizer_differs(capsys, tmp_path, tiny, strict_run):
    base = swapped_tokenizer(Path(tiny["model"]), tmp_path / "swapped")
    code, err = cli(capsys, "apply", strict_run, "--output", tmp_path / "out", "--model", base)
    assert code == 2 and err.count("\n") == 1
    assert f"{base / 'tokenizer.json'} differs from the delta's base" in err
    assert not (tmp_path / "out").exists()
    code, err = cli(capsys, "apply", strict_run, "--output", tmp_path / "out", "--model", tiny["model"])
    assert code == 0, err


def test_base_settings_count_but_bookkeeping_does_not(tmp_path, tiny, strict_run):
    """config.json's architecture settings are part of the base; its transformers version is not."""
    delta = SparseDelta.load(strict_run / "delta")
    resaved = shutil.copytree(tiny["model"], tmp_path / "resaved")
    config = json.loads((resaved / "config.json").read_text())
    (resaved / "config.json").write_text(json.dumps({**config, "transformers_version": "0.0.1"}, indent=4))
    apply_delta(strict_run, tmp_path / "ok", model=str(resaved))
    (resaved / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(DeltaError, match=r"config\.json differs"):
        apply_delta(strict_run, tmp_path / "refused", model=str(resaved))
    assert delta.config.base_files.keys() >= {"config.json", "tokenizer.json"}


def test_version_1_delta_still_applies_checking_weights_only(tmp_path, tiny, strict_run):
    def version_1(config: dict) -> None:
        config["format_version"] = 1
        del config["base_files"]

    old = edited_delta(strict_run, tmp_path / "old", version_1)
    with pytest.warns(UserWarning, match="only .* weights are checked"):
        apply_delta(old, tmp_path / "applied", model=tiny["model"])
    assert (tmp_path / "applied" / "config.json").is_file()


@pytest.mark.parametrize(("edit", "message"), [
    ({"format_version": 2, "base_files": None}, "'base_files' must be an object"),
    ({"base_files": {"vocab.txt": "abc"}}, "'base_files' entry 'vocab.txt' must be a sha256"),
])
def test_base_files_entry_is_type_checked(strict_run, edit, message):
    raw = json.loads((strict_run / "delta" / CONFIG_FILE).read_text())
    with pytest.raises(DeltaError, match=message):
        DeltaConfig.from_dict({**raw, **edit})
    del raw["base_files"]
    with pytest.raises(DeltaError, match="missing config key 'base_files'"):
        DeltaConfig.from_dict(raw)


@pytest.mark.parametrize(("field", "value"), [
    ("num_labels", "two"), ("num_labels", True), ("kind", "ranking"), ("label_names", [0, 1]), ("label_names", ["a"]),
])
def test_edited_task_head_field_is_one_delta_error(capsys, tmp_path, tiny, strict_run, field, value):
    delta = edited_delta(strict_run, tmp_path / "edited", lambda config: config["hparams"].update({field: value}))
    code, err = cli(capsys, "apply", delta, "--output", tmp_path / "out", "--model", tiny["model"])
    assert code == 2 and err.count("\n") == 1 and f"hparams.{field}" in err, err


# ------------------------------------------------------------------------------- strategy and optimizer


def test_child_d_prepare_refuses_a_model_other_than_the_bound_one(tiny_bert):
    strategy = ChildTuningD(0.3)
    with pytest.raises(ValueError, match="bound to no parameters"):
        strategy.prepare(tiny_bert, [])
    ChildOptimizer(tiny_bert.named_parameters(), strategy)
    config = tiny_bert_config()
    config.intermediate_size = 24
    other = BertForSequenceClassification(config)
    with pytest.raises(ValueError, match=r"'bert\.encoder\.layer\.0\.intermediate\.dense\.weight' is \(32, 16\) in the "
                                         r"optimizer, but the given model has shape \(24, 16\)"):
        strategy.prepare(other, [])
    assert strategy.chosen is None


def sparse_embedding_step(strategy, optimizer) -> None:
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    opt = ChildOptimizer({"layer.0.embed": embedding.weight}, strategy, optimizer, lr=0.1)
    strategy.chosen = {"layer.0.embed": torch.arange(40, dtype=torch.int32)}  # a fixed child network, for D
    embedding(torch.tensor([1, 2])).sum().backward()
    opt.step()


@pytest.mark.parametrize(("strategy", "optimizer"), [
    (ChildTuningF(0.5, seed=1), torch.optim.SGD), (ChildTuningD(0.5), torch.optim.AdamW),
], ids=["child-f", "fixed"])
def test_sparse_gradient_is_refused_by_name(strategy, optimizer):
    with pytest.raises(ValueError, match=r"'layer\.0\.embed' has a sparse gradient .* sparse=False"):
        sparse_embedding_step(strategy, optimizer)


# ------------------------------------------------------------------------------- labels and prompts


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("kind", [None, "regression"])
def test_integer_label_beyond_float_range_is_a_data_error(tmp_path, kind):
    data = write(tmp_path / "t.jsonl", '{"text": "good", "label": 1%s}\n{"text": "bad", "label": 0}\n' % ("0" * 400))
    with pytest.raises(DataError, match=r"line 1: label 1000.{30,40} is not a finite number") as err:
        load_files(data, data, kind=kind)
    assert len(str(err.value)) < 200


def test_integer_label_beyond_the_digit_limit_is_a_data_error(tmp_path):
    data = write(tmp_path / "t.jsonl", '{"text": "good", "label": 1%s}\n' % ("0" * 5000))
    with pytest.raises(DataError, match="line 1: unreadable number"):
        load_files(data, data)


def test_numbers_beside_class_names_are_named_plainly(tmp_path):
    labels = ["0", "1", "pos", "neg"]
    data = write(tmp_path / "t.csv", "text,label\n" + "".join(f"film {i},{labels[i % 4]}\n" for i in range(8)))
    with pytest.raises(DataError, match=r"4 classes found \(0, 1, neg, pos\): whole numbers \(lines 2, 3, 6, \.\.\.\) "
                                        r"beside names \(lines 4, 5, 8, \.\.\.\)"):
        load_files(data, data)


def test_classes_the_models_own_head_cannot_hold_are_named(capsys, tmp_path, tiny):
    data = write(tmp_path / "t.csv", "text,label\n" + "".join(f"film {i},{'abc'[i % 3]}\n" for i in range(6)))
    code, err = cli(capsys, "train", "--model", tiny["model"], "--train", data, "--dev", data, "--no-progress",
                    "--output", tmp_path / "run")
    assert code == 2 and "has a task head with 2 outputs, but this classification task has 3 (a, b, c)" in err


@pytest.mark.parametrize(("prompts", "which"), [([""], 1), (["2 + 2 =", "  "], 2)])
def test_empty_prompt_is_one_line_error(capsys, prompts, which):
    code, err = cli(capsys, "generate", "smollm2-135m", *(a for p in prompts for a in ("--prompt", p)))
    assert code == 2 and err == f"childtune: error: prompt {which} is empty: give a text to complete\n"


# ------------------------------------------------------------------------------- analysis


def delta_on(base: dict[str, torch.Tensor], name: str, folder: Path) -> Path:
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["layer.0.w"][0, :2] += 1.0
    SparseDelta.from_training(base, tuned, method="child-d", base_model=name).save(folder)
    return folder


def test_analysis_refuses_child_networks_of_different_bases(tmp_path):
    g = torch.Generator().manual_seed(0)
    one, two = ({"layer.0.w": torch.randn(3, 4, generator=g)} for _ in range(2))
    a, b = delta_on(one, "base-one", tmp_path / "a"), delta_on(two, "base-two", tmp_path / "b")
    with pytest.raises(ValueError, match=r"'a' and 'b' were chosen on different base models \(base-one, weights "
                                         r"\w{12} and base-two, weights \w{12}\)"):
        analyze({"a": a, "b": b}, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    check_same_base({"a": a, "a again": delta_on(one, "renamed", tmp_path / "c")})  # the weights decide


def test_analysis_compares_run_folders_by_their_model(tmp_path, tiny, strict_run):
    masks_only = tmp_path / "masks-run"
    masks_only.mkdir()
    shutil.copy(strict_run / "masks.safetensors", masks_only)
    config = json.loads((strict_run / "config.json").read_text())
    (masks_only / "config.json").write_text(json.dumps({**config, "model": tiny["model"]}))
    check_same_base({"delta": strict_run, "masks": masks_only})
    other = Path(shutil.copytree(tiny["model"], tmp_path / "other-model"))
    (masks_only / "config.json").write_text(json.dumps({**config, "model": str(other)}))
    with pytest.raises(ValueError, match="'delta' and 'masks' were chosen on different base models"):
        check_same_base({"delta": strict_run, "masks": masks_only})
