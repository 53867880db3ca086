"""Sparse deltas: exact apply/revert/merge, strict loading, atomic saving, compact index encodings."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import tiny_bert_config
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from transformers import BertForSequenceClassification

from childtune.delta import CONFIG_FILE, TENSORS_FILE, DeltaError, SparseDelta, encoded_bytes, fingerprint, merge
from childtune.delta.indexcodec import choose_encoding, decode_indices, encode_indices

HEAD_NAMES = ("classifier.weight", "classifier.bias")


def new_model(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config())


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], skip=()) -> bool:
    """Bit-for-bit equality (tells -0.0 from +0.0, unlike torch.equal)."""
    keys = [k for k in a if k not in skip]
    return set(keys) == {k for k in b if k not in skip} and all(
        a[k].shape == b[k].shape and torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)) for k in keys
    )


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same names, and per tensor the same dtype, shape and bytes: NaN payloads and -0.0 included."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)) for k in a
    )


def same_delta(a: SparseDelta, b: SparseDelta) -> bool:
    """The same changes: entries (indices, values, exceptions) and dense heads, bit for bit."""
    fields = ("indices", "values", "exc_pos", "exc_base", "exc_tuned")
    return a.entries.keys() == b.entries.keys() and identical(a.dense, b.dense) and all(
        identical({f: getattr(a.entries[n], f) for f in fields}, {f: getattr(b.entries[n], f) for f in fields})
        for n in a.entries
    )


def apply_then_revert_or_refuse(delta_of, model, made: SparseDelta) -> None:
    """What a model holds after a delta from `delta_of()` (which may raise DeltaError: a bad file) is
    applied and reverted: on any DeltaError exactly what it held before that step, and after both its
    base again, bit for bit. Only a delta whose changes are not the ones `made` holds (crafted values
    its exceptions do not cover) may be refused by revert, which then leaves the applied model as is."""
    base = snapshot(model)
    try:
        delta = delta_of()
        delta.apply(model)
    except DeltaError:
        assert identical(snapshot(model), base), "a refused apply changed the model"
        return
    applied = snapshot(model)
    assert all(t.shape == base[n].shape and t.dtype == base[n].dtype and bool(torch.isfinite(t).all())
               for n, t in applied.items()), "apply changed a tensor's shape or dtype, or left it non-finite"
    try:
        delta.revert(model)
    except DeltaError:
        assert identical(snapshot(model), applied), "a refused revert changed the model"
        assert not same_delta(delta, made), "revert refused the delta as it was made"
        return
    assert identical(snapshot(model), base), "apply then revert did not give back the base"


def perturb(model, p: float, seed: int, wild: bool = True) -> dict[str, torch.Tensor]:
    """Change a random `p` of the elements, returning the masks; the head is re-drawn whole.

    `wild` mixes in what breaks naive float deltas: sign flips, huge magnitude changes, signed zeros
    and subnormals, beside ordinary small fine-tuning steps.
    """
    g = torch.Generator().manual_seed(seed)
    masks = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in HEAD_NAMES:
                param.copy_(torch.randn(param.shape, generator=g))
                continue
            mask = torch.rand(param.shape, generator=g) < p
            step = param + 1e-3 * torch.randn(param.shape, generator=g)
            if wild:
                kind = torch.randint(0, 6, param.shape, generator=g)
                scale = torch.exp(8 * torch.randn(param.shape, generator=g))
                step = torch.where(kind == 1, -param * scale, step)
                step = torch.where(kind == 2, param * 1e6, step)
                step = torch.where(kind == 3, torch.full_like(param, -0.0), step)
                step = torch.where(kind == 4, torch.full_like(param, 1e-41), step)
            mask &= step.view(torch.int32) != param.view(torch.int32)
            param[mask] = step[mask]
            masks[name] = mask
    return masks


@pytest.fixture
def tuned_pair(tiny_bert):
    """(base state, tuned model, delta, masks) with a wild delta on a tiny BERT."""
    model = tiny_bert
    base = snapshot(model)
    masks = perturb(model, 0.3, seed=1)
    delta = SparseDelta.from_training(base, model, method="child_tuning_d", hparams={"p": 0.3}, base_model="tiny")
    return base, model, delta, masks


def base_model_from(base: dict[str, torch.Tensor], head_seed: int = 7):
    """A fresh model holding the base weights but its own freshly drawn head, as a new run would."""
    model = new_model(head_seed)
    model.load_state_dict({k: v for k, v in base.items() if k not in HEAD_NAMES}, strict=False)
    return model


# ------------------------------------------------------------------------------------- exactness


def test_apply_gives_tuned_and_revert_gives_base_bit_for_bit(tuned_pair, tmp_path):
    base, tuned, delta, _ = tuned_pair
    t, b = tuned.state_dict(), base
    naive = [
        (b[n] + (t[n] - b[n])).view(torch.int32) != t[n].view(torch.int32) for n in delta.entries
    ]
    assert any(bool(x.any()) for x in naive), "test data must include deltas plain float math gets wrong"
    assert delta.config.num_exceptions > 0

    delta.save(tmp_path)
    loaded = SparseDelta.load(tmp_path)
    model = base_model_from(base)
    own_head = snapshot(model)
    loaded.apply(model)
    assert same_bits(snapshot(model), snapshot(tuned))
    loaded.revert(model)
    assert same_bits(snapshot(model), own_head)


def test_ordinary_small_updates_need_few_exceptions():
    """Exceptions come from weights near zero that an update dwarfs; ordinary steps rarely make them."""
    model = new_model()
    base = snapshot(model)
    perturb(model, 0.3, seed=2, wild=False)
    delta = SparseDelta.from_training(base, model, method="random")
    assert delta.config.num_changed > 1000
    assert delta.config.num_exceptions < 0.03 * delta.config.num_changed


def test_revert_in_a_new_process_needs_no_memory_of_apply(tuned_pair, tmp_path):
    base, tuned, delta, _ = tuned_pair
    delta.save(tmp_path)
    model = base_model_from(snapshot(tuned))  # a tuned model loaded from disk, never applied here
    model.load_state_dict(snapshot(tuned))
    SparseDelta.load(tmp_path).revert(model)
    assert same_bits(snapshot(model), base, skip=HEAD_NAMES)


def test_masks_are_the_child_network(tuned_pair):
    _, _, delta, masks = tuned_pair
    got = delta.masks()
    assert set(got) == {n for n, m in masks.items() if m.any()}
    for name, mask in got.items():
        assert mask.dtype == torch.bool and torch.equal(mask, masks[name])
    assert all(got.get(n) is None for n in HEAD_NAMES)
    assert delta.masks(include_dense=True)["classifier.weight"].all()


def test_extract_stores_differences_not_absolute_values(tuned_pair):
    base, tuned, delta, _ = tuned_pair
    name = "bert.encoder.layer.0.attention.self.query.weight"
    entry = delta.entries[name]
    flat_b, flat_t = base[name].reshape(-1), tuned.state_dict()[name].reshape(-1)
    assert torch.equal(entry.values, flat_t[entry.indices] - flat_b[entry.indices])
    assert entry.indices.dtype == torch.int64


# ------------------------------------------------------------------------------------------ refusals


def test_wrong_base_is_refused_and_model_left_alone(tuned_pair):
    base, _, delta, _ = tuned_pair
    model = base_model_from(base)
    with torch.no_grad():
        model.bert.encoder.layer[1].output.dense.weight[0, 0] += 1e-3
    before = snapshot(model)
    with pytest.raises(DeltaError, match=r"wrong base.*'tiny'.*BertForSequenceClassification"):
        delta.apply(model)
    assert same_bits(snapshot(model), before)


def test_revert_of_a_model_that_is_not_base_plus_delta_rolls_back(tuned_pair):
    base, _, delta, _ = tuned_pair
    model = base_model_from(base)
    delta.apply(model)
    name = next(iter(delta.entries))
    with torch.no_grad():
        model.state_dict()[name].view(-1)[delta.entries[name].indices[0]] += 1.0
    before = snapshot(model)
    with pytest.raises(DeltaError, match="not that base plus this delta"):
        delta.revert(model)
    assert same_bits(snapshot(model), before)


def test_shape_mismatch_with_target_model_is_refused(tuned_pair):
    _, _, delta, _ = tuned_pair
    other = BertForSequenceClassification(tiny_bert_config(num_labels=3))
    with pytest.raises(DeltaError, match=r"dense head 'classifier\.weight'"):
        delta.apply(other)


def test_from_training_refuses_non_finite_weights():
    model = new_model()
    base = snapshot(model)
    with torch.no_grad():
        model.bert.pooler.dense.bias[0] = float("nan")
    with pytest.raises(DeltaError, match="non-finite"):
        SparseDelta.from_training(base, model, method="x")


# ---------------------------------------------------------------------------------------------- merge


def test_merge_equals_applying_both_in_turn(tuned_pair):
    base, _, first, _ = tuned_pair
    other = base_model_from(base, head_seed=3)
    perturb(other, 0.3, seed=5)
    second = SparseDelta.from_training(base, other, method="random", hparams={"p": 0.3})
    overlap = sum(
        int((first.masks()[n] & second.masks()[n]).sum()) for n in first.entries if n in second.entries
    )
    assert overlap > 0

    sequential = base_model_from(base)
    first.apply(sequential)
    second.apply(sequential, check_base=False)
    with pytest.raises(DeltaError, match="pass base="):
        merge(first, second)
    merged = merge(first, second, base=base)
    model = base_model_from(base)
    merged.apply(model)
    assert same_bits(snapshot(model), snapshot(sequential))
    assert torch.equal(model.classifier.weight, other.classifier.weight)  # the later head wins
    merged.revert(model)
    assert same_bits(snapshot(model), base, skip=HEAD_NAMES)
    assert merged.config.hparams["first.p"] == 0.3 and merged.config.hparams["second.method"] == "random"


def test_merge_of_disjoint_children_needs_no_base(tuned_pair, tmp_path):
    base, _, first, masks = tuned_pair
    other = base_model_from(base)
    with torch.no_grad():
        for name, param in other.named_parameters():
            if name in masks:
                free = ~masks[name] & (torch.rand(param.shape) < 0.2)
                param[free] = -3.0 * param[free]
    second = SparseDelta.from_training(base, other, method="random")
    merged = merge(first, second)
    merged.save(tmp_path)
    sequential = base_model_from(base)
    first.apply(sequential)
    second.apply(sequential, check_base=False)
    model = base_model_from(base)
    SparseDelta.load(tmp_path).apply(model)
    assert same_bits(snapshot(model), snapshot(sequential))
    merged.revert(model)
    assert same_bits(snapshot(model), base, skip=HEAD_NAMES)


def test_merge_refuses_different_bases(tuned_pair):
    _, _, first, _ = tuned_pair
    other_base = new_model(seed=11)
    base2 = snapshot(other_base)
    perturb(other_base, 0.1, seed=3)
    second = SparseDelta.from_training(base2, other_base, method="random", base_model="other")
    with pytest.raises(DeltaError, match=r"different bases.*'tiny'.*'other'"):
        merge(first, second)


# -------------------------------------------------------------------------------------- file handling


def corrupt(directory: Path, *, tensors=None, config=None) -> None:
    """Rewrite a saved delta through `tensors`/`config` editors and re-sign it, to reach the validators."""
    raw = safetensors.torch.load((directory / TENSORS_FILE).read_bytes())
    cfg = json.loads((directory / CONFIG_FILE).read_text())
    if tensors:
        tensors(raw, cfg)
    data = safetensors.torch.save(raw)
    cfg["tensors_sha256"] = hashlib.sha256(data).hexdigest()
    if config:
        config(cfg)
    (directory / TENSORS_FILE).write_bytes(data)
    (directory / CONFIG_FILE).write_text(json.dumps(cfg))


NAME = "bert.encoder.layer.0.attention.self.query.weight"


def as_indices(raw, cfg, indices=None):
    """Re-encode NAME as plain indices (optionally replaced), so index validation can be reached."""
    bits = np.unpackbits(raw.pop(f"bitmap/{NAME}").numpy())
    cfg["tensors"][NAME]["encoding"] = "indices"
    found = np.flatnonzero(bits).astype(np.int32)
    raw[f"indices/{NAME}"] = torch.from_numpy(found if indices is None else indices(found))


@pytest.mark.parametrize(
    ("tensors", "config", "message"),
    [
        (lambda r, c: as_indices(r, c, lambda i: np.r_[i[:-1], 256]), None, "out of range"),
        (lambda r, c: as_indices(r, c, lambda i: np.r_[i[:-1], -1]), None, "out of range"),
        (lambda r, c: as_indices(r, c, lambda i: i[::-1].copy()), None, "not strictly increasing"),
        (lambda r, c: as_indices(r, c, lambda i: np.r_[i[:-1], i[-2]]), None, "not strictly increasing"),
        (lambda r, c: as_indices(r, c, lambda i: i[:-1]), None, "indices for"),
        (lambda r, c: r[f"values/{NAME}"].__setitem__(0, float("inf")), None, "finite"),
        (lambda r, c: r.__setitem__("extra/thing", torch.zeros(1)), None, "unexpected tensor 'extra/thing'"),
        (lambda r, c: r.__setitem__(f"exc_tuned/{NAME}", r[f"exc_tuned/{NAME}"][:-1]), None, "differ in count"),
        (None, lambda c: c.__setitem__("learning_rate", 1), "unknown config key 'learning_rate'"),
        (None, lambda c: c.pop("method"), "missing config key 'method'"),
        (None, lambda c: c.__setitem__("format_version", 99), "format version 99"),
        (None, lambda c: c["tensors"][NAME].__setitem__("shape", [16, 17]), "packed bits"),
        (None, lambda c: c["tensors"][NAME].__setitem__("encoding", "zstd"), "unknown encoding 'zstd'"),
        (None, lambda c: c.__setitem__("num_changed", 1), "counts"),
        (None, lambda c: c.__setitem__("num_dense", "34"), "'num_dense' must be a non-negative integer"),
    ],
)
def test_crafted_files_are_refused(tuned_pair, tmp_path, tensors, config, message):
    _, _, delta, _ = tuned_pair
    assert delta.config.tensors[NAME].encoding == "bitmap"
    delta.save(tmp_path)
    SparseDelta.load(tmp_path)  # the untouched file is fine, so the edit is what gets refused
    corrupt(tmp_path, tensors=tensors, config=config)
    with pytest.raises(DeltaError, match=message):
        SparseDelta.load(tmp_path)


def test_resized_tensor_is_refused_at_apply(tuned_pair, tmp_path):
    base, _, delta, _ = tuned_pair
    delta.save(tmp_path)

    def grow(raw, cfg):
        as_indices(raw, cfg)
        cfg["tensors"][NAME]["shape"] = [16, 32]

    corrupt(tmp_path, tensors=grow)
    loaded = SparseDelta.load(tmp_path)
    model = base_model_from(base)
    before = snapshot(model)
    with pytest.raises(DeltaError, match=r"shape \(16, 32\), model has \(16, 16\)"):
        loaded.apply(model)
    assert same_bits(snapshot(model), before)


def test_missing_truncated_and_bit_flipped_files_are_refused(tuned_pair, tmp_path):
    _, _, delta, _ = tuned_pair
    delta.save(tmp_path)
    good = (tmp_path / TENSORS_FILE).read_bytes()

    (tmp_path / TENSORS_FILE).write_bytes(good[: len(good) // 2])
    with pytest.raises(DeltaError, match="checksum"):
        SparseDelta.load(tmp_path)

    header = json.loads(good[8 : 8 + struct.unpack("<Q", good[:8])[0]])
    start = 8 + len(good[8 : 8 + struct.unpack("<Q", good[:8])[0]]) + header[f"values/{NAME}"]["data_offsets"][0]
    flipped = bytearray(good)
    flipped[start + 2] ^= 0x10
    (tmp_path / TENSORS_FILE).write_bytes(bytes(flipped))
    with pytest.raises(DeltaError, match="checksum"):
        SparseDelta.load(tmp_path)

    (tmp_path / TENSORS_FILE).unlink()
    with pytest.raises(DeltaError, match=f"missing {TENSORS_FILE}"):
        SparseDelta.load(tmp_path)


def test_failed_save_leaves_previous_files_intact(tuned_pair, tmp_path, monkeypatch):
    base, tuned, delta, _ = tuned_pair
    delta.save(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = SparseDelta.from_training(base, tuned, method="other", hparams={"p": 0.5})

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        other.save(tmp_path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # and no temp files left
    assert SparseDelta.load(tmp_path).config.method == "child_tuning_d"


def test_indices_survive_a_values_dtype_cast(tuned_pair, tmp_path):
    base, _, wild_delta, _ = tuned_pair
    with pytest.raises(DeltaError, match="overflow"):
        wild_delta.astype(torch.float16)
    tuned = base_model_from(base)
    perturb(tuned, 0.3, seed=4, wild=False)
    delta = SparseDelta.from_training(base, tuned, method="random")
    assert delta.config.num_exceptions > 0
    half = delta.astype(torch.float16)
    half.save(tmp_path)
    loaded = SparseDelta.load(tmp_path)
    for name, entry in delta.entries.items():
        assert torch.equal(loaded.entries[name].indices, entry.indices)
        assert loaded.entries[name].values.dtype == torch.float16
        assert torch.equal(loaded.entries[name].values, entry.values.half())
    model = base_model_from(base)
    loaded.apply(model)
    got, want = model.state_dict(), tuned.state_dict()
    for name, entry in delta.entries.items():
        exact = entry.indices[entry.exc_pos]
        assert torch.equal(got[name].view(-1)[exact], want[name].view(-1)[exact])
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-3)


def test_fingerprint_ignores_the_head_and_sees_one_bit():
    model = new_model()
    fp = fingerprint(model)
    assert fp == fingerprint(snapshot(model))
    with torch.no_grad():
        model.classifier.weight.normal_()
    assert fingerprint(model) == fp
    with torch.no_grad():
        w = model.bert.embeddings.LayerNorm.bias
        w.view(torch.int32)[3] ^= 1
    assert fingerprint(model) != fp


# ------------------------------------------------------------------------------------------ encodings


@pytest.mark.parametrize(
    ("n", "k", "expected"),
    [(4096, 4096, "all"), (40_000, 12_000, "bitmap"), (40_000, 4_000, "elias_fano"),
     (40_000, 400, "elias_fano"), (40_000, 3, "elias_fano"), (2**20 + 3, 1_000, "elias_fano"),
     (8, 1, "bitmap")],
)
def test_index_encodings_round_trip_and_pick_the_smallest(n, k, expected):
    rng = np.random.default_rng(k)
    indices = np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)
    encoding = choose_encoding("w", n, k)
    assert encoding == expected
    for enc in ("bitmap", "indices", "elias_fano", *(("all",) if k == n else ())):
        assert np.array_equal(decode_indices("w", enc, encode_indices(enc, indices, n), n, k), indices)
    if expected == "elias_fano":
        stored = encode_indices(expected, indices, n).nbytes
        p = k / n
        assert stored * 8 / n < 1.5 * (-p * np.log2(p) - (1 - p) * np.log2(1 - p)) + 0.01  # near entropy


def test_encoded_bytes_matches_the_file(tuned_pair, tmp_path):
    _, _, delta, _ = tuned_pair
    delta.save(tmp_path)
    report = encoded_bytes(delta)
    raw = safetensors.torch.load((tmp_path / TENSORS_FILE).read_bytes())
    assert report["total"] == sum(t.numel() * t.element_size() for t in raw.values())
    assert report["values"] == 4 * (delta.config.num_changed - delta.config.num_exceptions)


# -------------------------------------------------------------------------------------------- fuzzing

_FUZZ: dict = {}


def _fuzz_setup(tmp_root: Path):
    if not _FUZZ:
        model = new_model()
        base = snapshot(model)
        perturb(model, 0.2, seed=9)
        delta = SparseDelta.from_training(base, model, method="fuzz")
        delta.save(tmp_root / "good")
        files = {f: (tmp_root / "good" / f).read_bytes() for f in (CONFIG_FILE, TENSORS_FILE)}
        _FUZZ.update(base=base, delta=SparseDelta.load(tmp_root / "good"), files=files)
    return _FUZZ["base"], _FUZZ["delta"], _FUZZ["files"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(which=CONFIG_FILE, edits=[(0.0, ord("{"))], cut=None, resign=False)  # unchanged: apply and revert work
@given(
    which=st.sampled_from([CONFIG_FILE, TENSORS_FILE]),
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.floats(0, 1)),
    resign=st.booleans(),
)
def test_fuzzed_files_only_ever_raise_delta_error(tmp_path_factory, which, edits, cut, resign):
    base, made, files = _fuzz_setup(tmp_path_factory.getbasetemp())
    data = bytearray(files[which])
    for where, byte in edits:
        data[int(where * len(data))] = byte
    if cut is not None:
        data = data[: int(cut * len(data))]
    directory = tmp_path_factory.mktemp("fuzz")
    (directory / which).write_bytes(bytes(data))
    other = TENSORS_FILE if which == CONFIG_FILE else CONFIG_FILE
    other_data = files[other]
    if resign and which == TENSORS_FILE:  # get past the checksum so the parser and validators are hit
        cfg = json.loads(other_data)
        cfg["tensors_sha256"] = hashlib.sha256(bytes(data)).hexdigest()
        other_data = json.dumps(cfg).encode()
    (directory / other).write_bytes(other_data)
    apply_then_revert_or_refuse(lambda: SparseDelta.load(directory), base_model_from(base), made)
    shutil.rmtree(directory)
