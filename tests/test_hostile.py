"""Hostile input: every bad thing a user (or a file) can hand childtune ends in one clear error, never in
corrupted weights, an out-of-bounds write or a traceback.

Data and config errors go through the CLI (`childtune.cli.main`, exit status 2 and one line on stderr);
non-finite losses and gradients through the training loop's guard; crafted delta files through
`childtune apply` and a hypothesis fuzzer over `SparseDelta.load` + `apply`.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from childtune.cli import main
from childtune.delta import CONFIG_FILE, TENSORS_FILE, SparseDelta
from childtune.fileio import sha256_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_delta import apply_then_revert_or_refuse
from test_resume import run_config, tiny_run_files, write_tiny_model


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    return tiny_run_files(tmp_path_factory.mktemp("hostile"))


def cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def train_cli(capsys, tiny_run: dict, output: Path, *extra) -> tuple[int, str]:
    return cli(capsys, "train", "--model", tiny_run["model"], "--train", tiny_run["train_file"], "--dev",
               tiny_run["dev_file"], "--epochs", 1, "--batch-size", 4, "--no-progress", "--output", output, *extra)


# ------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        (b"text,label\n", ".csv", "has no examples"),
        (b"", ".jsonl", "has no examples"),
        (b"text,label\ncaf\xe9 good,1\nbad,0\n", ".csv", "not UTF-8"),
        (b'{"text": "good", "label": [1]}\n{"text": "bad", "label": 0}\n', ".jsonl", "not a class name"),
        (b'{"text": "good", "label": true}\n{"text": "bad", "label": 0}\n', ".jsonl", "not a class name"),
        (b'{"text": 5, "label": 1}\n', ".jsonl", "text must be a non-empty string"),
        (b"text,label\ngood,1\n", ".csv", "at least 2 labels"),
    ],
    ids=["empty-csv", "empty-jsonl", "latin-1", "list-label", "bool-label", "number-text", "one-class"],
)
def test_bad_train_file_is_one_line_error(capsys, tmp_path, tiny_run, content, suffix, message):
    bad = tmp_path / f"train{suffix}"
    bad.write_bytes(content)
    code, err = cli(capsys, "train", "--model", tiny_run["model"], "--train", bad, "--dev", tiny_run["dev_file"],
                    "--no-progress", "--output", tmp_path / "run")
    assert code == 2
    assert err.startswith("childtune: error:") and message in err and str(bad) in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_text_longer_than_the_model_accepts_is_truncated(capsys, tmp_path, tiny_run):
    """A 3,000-word text against a model with 32 positions: cut to the tokenizer's limit, and trained on."""
    train = tmp_path / "train.csv"
    lines = Path(tiny_run["train_file"]).read_text().splitlines()
    train.write_text("\n".join([*lines, " ".join(["good film"] * 1500) + ",1"]) + "\n")
    code, err = cli(capsys, "train", "--model", tiny_run["model"], "--train", train, "--dev", tiny_run["dev_file"],
                    "--epochs", 1, "--batch-size", 4, "--max-length", 512, "--no-progress",
                    "--output", tmp_path / "run")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 6


def test_long_text_with_a_tokenizer_that_states_no_limit(capsys, tmp_path, tiny_run):
    model = write_tiny_model(tmp_path / "model")
    settings_file = model / "tokenizer_config.json"
    tokenizer_config = json.loads(settings_file.read_text())
    tokenizer_config.pop("model_max_length", None)
    settings_file.write_text(json.dumps(tokenizer_config))
    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + " ".join(["good film"] * 100) + ",1\nbad,0\n")
    code, err = cli(capsys, "train", "--model", model, "--train", train, "--dev", tiny_run["dev_file"],
                    "--epochs", 1, "--batch-size", 2, "--no-progress", "--output", tmp_path / "run")
    assert code == 0, err


# ----------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"lrr": 0.1}, "unknown config key 'lrr'"),
        ({"epochs": "3"}, "config key 'epochs' must be int"),
        ({"nonfinite": "ignore"}, "nonfinite must be 'stop' or 'skip'"),
    ],
)
def test_bad_config_file_names_the_key(capsys, tmp_path, tiny_run, content, message):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(content))
    code, err = train_cli(capsys, tiny_run, tmp_path / "run", "--config", config)
    assert code == 2 and message in err
    assert not (tmp_path / "run").exists()


def test_config_file_that_is_not_json(capsys, tmp_path, tiny_run):
    config = tmp_path / "config.json"
    config.write_bytes(b"\xff\xfe{lr: 1}")
    code, err = train_cli(capsys, tiny_run, tmp_path / "run", "--config", config)
    assert code == 2 and "config.json is not a JSON config" in err


# ---------------------------------------------------------------------------- non-finite numbers


class Poison:
    """Makes the loss (via the logits) or one gradient non-finite on one chosen batch, and records the
    weights after every batch so the test can see what that batch did to them."""

    def __init__(self, where: str, batch: int) -> None:
        self.where, self.batch, self.seen = where, batch, 0
        self.after: list[dict[str, torch.Tensor]] = []

    def on_start(self, state) -> None:
        self.state = state
        self.after.append(self.weights())
        model = state.model

        def logits_hook(module, args, output):
            return output * math.nan if self.where == "loss" and self.seen == self.batch else output

        def grad_hook(grad):
            return grad * math.inf if self.where == "gradient" and self.seen == self.batch else grad

        model.classifier.register_forward_hook(logits_hook)
        model.bert.encoder.layer[0].attention.self.query.weight.register_hook(grad_hook)

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.state.model.named_parameters()}

    def on_step(self, state) -> None:
        self.seen += 1
        self.after.append(self.weights())

    def on_end(self, state, metrics) -> None: ...


def all_finite(optimizer) -> bool:
    moments = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return all(bool(torch.isfinite(t).all()) for t in moments + params)


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_nonfinite_step_is_skipped_without_touching_weights(tiny_run, where):
    from childtune.training.loop import train

    poison = Poison(where, batch=2)
    metrics = train(run_config(tiny_run, "child-f", nonfinite="skip", epochs=1), [poison])
    assert metrics["skipped_steps"] == 1 and metrics["steps"] == 4
    before, after = poison.after[2], poison.after[3]  # around the poisoned batch
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not all(torch.equal(poison.after[3][n], poison.after[4][n]) for n in before)  # training went on
    assert all_finite(poison.state.optimizer)


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_nonfinite_step_stops_with_a_clear_error_and_intact_weights(tiny_run, where):
    from childtune.training.loop import TrainError, train

    poison = Poison(where, batch=2)
    with pytest.raises(TrainError, match=f"non-finite {where}.*--nonfinite skip"):
        train(run_config(tiny_run, "id3", nonfinite="stop", epochs=1), [poison])
    last, now = poison.after[-1], poison.weights()
    assert len(poison.after) == 3 and all(torch.equal(last[n], now[n]) for n in now)
    assert all_finite(poison.state.optimizer)


# ------------------------------------------------------------------------------------ crafted deltas


@pytest.fixture(scope="module")
def strict_run(tmp_path_factory, tiny_run) -> Path:
    """A finished child-d run (strict, so it saved a sparse delta) to tamper with."""
    from childtune.training.loop import train

    output = tmp_path_factory.mktemp("strict") / "run"
    train(run_config(tiny_run, "child-d", epochs=1, output=str(output)))
    assert (output / "delta" / CONFIG_FILE).is_file()
    return output


def tamper_delta(run: Path, to: Path, change) -> Path:
    """A copy of the run's delta with `change(config, tensors)` applied and the checksum made to match,
    as a deliberate attacker (not bit rot) would leave it."""
    to.mkdir()
    config = json.loads((run / "delta" / CONFIG_FILE).read_text())
    tensors = safetensors.torch.load_file(run / "delta" / TENSORS_FILE)
    change(config, tensors)
    safetensors.torch.save_file(tensors, to / TENSORS_FILE)
    config["tensors_sha256"] = sha256_file(to / TENSORS_FILE)
    (to / CONFIG_FILE).write_text(json.dumps(config))
    return to


def oblong(config: dict) -> str:
    """A changed weight matrix that is not square, so a transposed shape is a different shape."""
    return next(n for n, t in config["tensors"].items() if len(t["shape"]) == 2 and len(set(t["shape"])) == 2)


def shrink(config: dict, tensors: dict) -> None:  # every stored index now points past a 1-element tensor
    config["tensors"][oblong(config)]["shape"] = [1]


def transpose(config: dict, tensors: dict) -> None:  # same element count, wrong shape for the model
    name = oblong(config)
    config["tensors"][name]["shape"] = config["tensors"][name]["shape"][::-1]


def rename(config: dict, tensors: dict) -> None:  # a consistent delta for a tensor the model lacks
    name, other = oblong(config), "bert.no.such.weight"
    config["tensors"][other] = config["tensors"].pop(name)
    for key in [k for k in tensors if k.endswith("/" + name)]:
        tensors[key.replace(name, other)] = tensors.pop(key)


def future(config: dict, tensors: dict) -> None:
    config["format_version"] = 99


def extra_key(config: dict, tensors: dict) -> None:
    config["payload"] = "x"


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (shrink, "packed bits|padding bits|out of range|indices for"),
        (transpose, "delta is for shape"),
        (rename, "has no tensor 'bert.no.such.weight'"),
        (future, "format version 99"),
        (extra_key, "unknown config key 'payload'"),
    ],
    ids=["out-of-range", "transposed", "missing-tensor", "version", "extra-key"],
)
def test_crafted_delta_is_refused_by_apply(capsys, tmp_path, tiny_run, strict_run, tamper, message):
    delta = tamper_delta(strict_run, tmp_path / "delta", tamper)
    code, err = cli(capsys, "apply", delta, "--output", tmp_path / "merged", "--model", tiny_run["model"])
    assert code == 2 and err.startswith("childtune: error:")
    assert any(m in err for m in message.split("|")), err
    assert not (tmp_path / "merged").exists()


# A small base model as a state dict: fast enough for hundreds of fuzzed files.
def fuzz_base() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"enc.0.w": torch.randn(6, 5, generator=g), "enc.0.b": torch.randn(5, generator=g),
            "enc.1.w": torch.randn(40, generator=g), "classifier.weight": torch.randn(2, 5, generator=g)}


def fuzz_model() -> torch.nn.Module:
    """`fuzz_base` as a module, so a reverted delta also gives back the head apply replaced."""
    model = torch.nn.Module()
    for name, tensor in fuzz_base().items():
        *path, leaf = name.split(".")
        owner = model
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        owner.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=False))
    return model


@pytest.fixture(scope="module")
def fuzz_files(tmp_path_factory) -> dict[str, bytes]:
    base = fuzz_base()
    tuned = {n: t.clone() for n, t in base.items()}
    tuned["enc.0.w"][1, 2] += 0.5
    tuned["enc.0.w"][4, 0] = -tuned["enc.0.w"][4, 0] * 3  # a sign flip: becomes an exactness exception
    tuned["enc.0.b"] += 1e-3  # every element: the "all" encoding
    tuned["enc.1.w"][::7] -= 0.25
    tuned["classifier.weight"] += 1.0
    folder = tmp_path_factory.mktemp("fuzz")
    SparseDelta.from_training(base, tuned, method="child-d").save(folder)
    SparseDelta.load(folder).apply(fresh := fuzz_base())  # the untouched file is valid
    assert torch.equal(fresh["enc.0.w"], tuned["enc.0.w"])
    return {name: (folder / name).read_bytes() for name in (CONFIG_FILE, TENSORS_FILE)}


@pytest.fixture(scope="module")
def fuzz_delta(fuzz_files) -> SparseDelta:
    """The delta `fuzz_files` hold, as made."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in fuzz_files.items():
            (Path(tmp) / name).write_bytes(data)
        return SparseDelta.load(tmp)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
DTYPES = [torch.uint8, torch.int32, torch.int64, torch.float16, torch.float32, torch.bool]


@st.composite
def tensors(draw, like: torch.Tensor | None = None) -> torch.Tensor:
    """Any small tensor, or (`like`) new values of the same dtype and shape, which pass the format checks
    and so reach index decoding and `apply`."""
    dtype = like.dtype if like is not None else draw(st.sampled_from(DTYPES))
    shape = list(like.shape) if like is not None else draw(st.lists(st.integers(0, 12), max_size=2))
    n = math.prod(shape)
    if dtype.is_floating_point:
        values = draw(st.lists(st.floats(width=16 if dtype == torch.float16 else 32), min_size=n, max_size=n))
    elif dtype == torch.bool:
        values = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    else:
        info = torch.iinfo(dtype)
        values = draw(st.lists(st.integers(info.min, info.max) | st.integers(-3, 60), min_size=n, max_size=n))
    return torch.tensor(values, dtype=dtype).reshape(shape)


def paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from paths(value, (*prefix, i))


MUTATIONS = st.lists(st.sampled_from(["config", "tensor", "values", "drop", "add", "byte", "truncate"]),
                     min_size=1, max_size=3)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=MUTATIONS, data=st.data())
def test_fuzzed_delta_files_raise_only_delta_error(fuzz_files, fuzz_delta, mutations, data):
    """Whatever is stored (with a matching checksum, as a deliberate attacker would write it), loading and
    applying either works on the right shapes or raises DeltaError; nothing else, no write out of bounds.
    A refusal leaves the model bit for bit as it was; revert after a successful apply gives back the
    base bit for bit (or, for changed values it cannot undo exactly, refuses and leaves the model)."""
    config = json.loads(fuzz_files[CONFIG_FILE])
    tensors_ = safetensors.torch.load(fuzz_files[TENSORS_FILE])
    raw_bytes = None
    for kind in mutations:
        if kind == "config":
            where = data.draw(st.sampled_from(list(paths(config))[1:]))
            node = config
            for key in where[:-1]:
                node = node[key]
            node[where[-1]] = data.draw(JSON_VALUES)
        elif kind in ("tensor", "values") and tensors_:
            key = data.draw(st.sampled_from(sorted(tensors_)))
            tensors_[key] = data.draw(tensors(tensors_[key] if kind == "values" else None))
        elif kind == "drop" and tensors_:
            del tensors_[data.draw(st.sampled_from(sorted(tensors_)))]
        elif kind == "add":
            key = data.draw(st.sampled_from(["values/enc.0.w", "indices/enc.0.w", "bitmap/enc.1.w",
                                             "exc_base/enc.0.b", "dense/classifier.weight", "junk", "values/"]))
            tensors_[key] = data.draw(tensors())
        elif kind in ("byte", "truncate"):
            raw_bytes = bytearray(raw_bytes or safetensors.torch.save(tensors_))
            at = data.draw(st.integers(0, len(raw_bytes) - 1))
            if kind == "byte":
                raw_bytes[at] = data.draw(st.integers(0, 255))
            else:
                del raw_bytes[at:]
    stored = bytes(raw_bytes) if raw_bytes is not None else safetensors.torch.save(tensors_)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / TENSORS_FILE).write_bytes(stored)
        if isinstance(config, dict) and "tensors_sha256" in config:
            config["tensors_sha256"] = sha256_file(folder / TENSORS_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(config))
        apply_then_revert_or_refuse(lambda: SparseDelta.load(folder), fuzz_model(), fuzz_delta)
