"""Where childtune may write: the one rule every command that writes follows, checked before any work.

train, compare, study, export, apply, analyze and generate all write through this module, so that a
hostile or mistaken `--output` is refused the same way by each of them, before a model is loaded:

1. **A real, writable place.** The name is not empty; the output is not a symbolic link (dangling or
   not: a link is the user's, and renaming a finished folder onto it would fail after the work, or
   replace the link instead of writing where it points); the nearest existing folder above it is a
   folder we may write in (`check_target`).
2. **Apart from everything read.** The output is not, does not lie inside and does not hold anything the
   command reads: data and config files, a run, delta or model folder, a prompts file. Writing there
   would destroy the input, or leave a file in a run folder that makes the run no longer provably ours
   (`check_target`, `reads=`).
3. **Never replace what we did not make.** An existing output is replaced only with `--overwrite`; a
   file is then replaced (the user named it and asked), a folder only when its manifest
   (`childtune-manifest.json`, written last by `write_manifest`) lists everything in it, so a folder
   that holds anything of the user's is refused even with `--overwrite` (`check_replace`).
4. **Whole or nothing.** Files are written by `fileio.atomic_write`; folders are built under a hidden
   name and renamed into place when complete (`training.runfolder.RunFolder`, which applies 1-3 to
   runs, deltas, adapters, models and analyses). A write that fails for want of room becomes one
   `fileio.WriteError` line naming the file and the cause (`fileio.room_error`).

Commands that resume into their folder (compare, study) apply 1-2 here and their own resume rule for 3.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from childtune.fileio import write_json

MANIFEST = "childtune-manifest.json"
SIGNATURE = "childtune output folder"
"""The manifest's `childtune` field: what marks a folder as written, whole, by childtune."""


class OutputError(ValueError):
    """The output breaks the rule: it is not a place we may write, lies on an input, or holds what is not ours."""


def check_output(output: str | os.PathLike[str], *, reads: Iterable[str | os.PathLike[str] | None] = (),
                 overwrite: bool = False, folder: bool = True, holds: str = "files") -> Path:
    """The whole rule for a new output (`check_target`, then `check_replace`); returns it as a Path."""
    path = check_target(output, reads=reads)
    check_replace(path, overwrite=overwrite, folder=folder, holds=holds)
    return path


def check_target(output: str | os.PathLike[str], *, reads: Iterable[str | os.PathLike[str] | None] = ()) -> Path:
    """Rules 1 and 2: `output` names a place we may write, apart from every path in `reads` that exists
    (names that are not paths, such as a registry model name, are skipped)."""
    if not str(output).strip():
        raise OutputError("the output name is empty")
    path = Path(output)
    if path.is_symlink():
        raise OutputError(f"output {output} is a symbolic link (to {os.readlink(path)}); give a real path")
    above = next(p for p in (path.absolute(), *path.absolute().parents) if os.path.lexists(p))
    if above != path.absolute() and not above.is_dir():
        raise OutputError(f"cannot write {output}: {above} is not a folder")
    if above != path.absolute() and not os.access(above, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {output}: no permission to write in {above}")
    out = path.resolve()
    for source in reads:
        if source is None or not os.path.lexists(source):
            continue
        src = Path(source).resolve()
        if src == out or out.is_relative_to(src) or src.is_relative_to(out):
            raise OutputError(f"--output {output} would overwrite the input {source}; choose a path apart from it")
    return path


def check_replace(path: Path, *, overwrite: bool, folder: bool, holds: str = "files") -> None:
    """Rule 3 for an output that exists: refused without `overwrite`; with it, a file may be replaced and a
    folder only when it is provably ours (`check_replaceable`). An empty folder is free to use."""
    if not path.exists():
        return
    if folder != path.is_dir():
        raise OutputError(f"output {path} exists and is not a {'folder' if folder else 'file'}")
    if folder and not any(path.iterdir()):
        return
    if not overwrite:
        raise OutputError(f"output folder {path} already holds {holds}; pass --overwrite to replace it" if folder
                          else f"output {path} already exists; pass --overwrite to replace it")
    if folder:
        check_replaceable(path)


def write_manifest(folder: Path, kind: str, extra: Iterable[str] = ()) -> Path:
    """Sign `folder` as ours: every entry now in it (and `extra`, entries still to come), written last."""
    entries = sorted({p.name for p in folder.iterdir() if p.name != MANIFEST} | set(extra))
    return write_json(folder / MANIFEST, {"childtune": SIGNATURE, "kind": kind, "entries": entries})


def foreign_entries(path: Path) -> list[str] | None:
    """What in `path` childtune did not write: None when it has no valid manifest at all (not ours),
    else the entries the manifest does not list (empty: the whole folder is ours to replace)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("childtune") != SIGNATURE or not isinstance(
            manifest.get("entries"), list):
        return None
    listed = set(manifest["entries"]) | {MANIFEST}
    return sorted(p.name for p in path.iterdir() if p.name not in listed)


def check_replaceable(path: Path, what: str = "output folder") -> None:
    """Refuse to replace `path` unless it is provably a childtune folder with nothing of anyone else's."""
    foreign = foreign_entries(path)
    if foreign is None:
        raise OutputError(f"{what} {path} is not empty and has no childtune manifest ({MANIFEST}); "
                          "refusing to replace it even with --overwrite")
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise OutputError(f"{what} {path} holds files childtune did not write ({shown}); "
                          "refusing to replace it even with --overwrite: move them first")
