"""`childtune train --nproc N`: re-run the command as N ranks under torch.distributed.run, and speak once.

Left alone, a failed N-rank job says everything N+1 times: each rank prints the same
`childtune: error:` line, then torchrun logs the SIGTERM it sent, the exit code it saw, a traceback of
its own and a `ChildFailedError` report of every rank. A user error is one line, exit 2, however many
ranks found it. So, inside a launched job, ranks do not print their user errors: `report_error` writes
each rank's message to a file in a folder the launcher made (`CHILDTUNE_ERROR_DIR`), torchrun itself
runs through this module's `__main__` with its logs quietened and its `ChildFailedError` caught, and
`launch` prints each distinct message once when the job is over. A rank that crashes (a bug, a signal)
still shows its own traceback; the launcher adds one line naming the rank and its exit code.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from childtune.training.distributed import DistInfo, DistributedError

ERROR_DIR_ENV = "CHILDTUNE_ERROR_DIR"
EXIT_USAGE = 2


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """`argv` without `--nproc N` / `--nproc=N`, so the re-executed CLI does not launch again."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def report_error(message: str) -> None:
    """Tell the user about a user error: on stderr, or, inside a `launch`ed job, to the launcher."""
    folder, me = os.environ.get(ERROR_DIR_ENV), DistInfo.from_env()
    if folder and me.distributed:
        with contextlib.suppress(OSError):  # the launcher is gone: fall back to stderr below
            (Path(folder) / f"rank{me.rank:05d}.txt").write_text(message, encoding="utf-8")
            return
    print(f"childtune: error: {message}", file=sys.stderr)


def _messages(folder: Path) -> list[str]:
    """The ranks' distinct messages, in rank order of first appearance."""
    seen: dict[str, None] = {}
    for path in sorted(folder.glob("rank*.txt")):
        seen.setdefault(path.read_text(encoding="utf-8"), None)
    return list(seen)


def launch(
    argv: Sequence[str],
    nproc: int,
    *,
    module: str = "childtune.cli",
    script: str | Path | None = None,
    threads: int | None = None,
) -> int:
    """Run `python -m <module> <argv>` (or `<script>`) as `nproc` ranks under torch.distributed.run.

    The same job as `torchrun --standalone --nproc-per-node N -m childtune.cli train ...`, with one
    voice (the module docstring says how). `threads` sets each rank's OMP_NUM_THREADS (default: the
    CPUs shared out between ranks) unless the caller set it. SIGINT and SIGTERM are passed on to
    torchrun, which stops the ranks. Returns the exit status: 2 when any rank reported a user error.
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer, got {nproc!r}")
    if DistInfo.from_env().distributed:
        raise DistributedError("already running under a distributed launcher; do not pass --nproc inside torchrun")
    target = [str(script)] if script is not None else ["-m", module]
    cmd = [sys.executable, "-m", __name__, "--standalone", f"--nproc-per-node={nproc}", *target,
           *strip_nproc(argv)]
    with tempfile.TemporaryDirectory(prefix="childtune-ranks-") as folder:
        env = dict(os.environ, **{ERROR_DIR_ENV: folder})
        env.setdefault("OMP_NUM_THREADS", str(threads or max(1, (os.cpu_count() or 1) // nproc)))
        code = _wait(subprocess.Popen(cmd, env=env))
        messages = _messages(Path(folder))
    for message in messages:
        print(f"childtune: error: {message}", file=sys.stderr)
    if messages:
        return EXIT_USAGE
    return code


def _wait(child: subprocess.Popen) -> int:
    forwarded = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            forwarded[sig] = signal.signal(sig, lambda signum, _frame: child.send_signal(signum))
    try:
        return child.wait()
    finally:
        for sig, previous in forwarded.items():
            signal.signal(sig, previous)
        if child.poll() is None:
            child.kill()
            child.wait()


def _torchrun(argv: Sequence[str]) -> int:
    """torch.distributed.run without its failure report: the exit code of the first rank that failed.

    Its own WARNING/ERROR lines (the SIGTERM sent to the other ranks, the exit code seen) are
    quietened, unless the user asked for them with torchrun's `LOGLEVEL`; a crash is named in one line.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if "LOGLEVEL" not in os.environ:
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)

    try:
        run(parse_args(list(argv)))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = failure.exitcode
        if code != EXIT_USAGE:  # a user error was reported by the rank itself
            print(f"childtune: rank {rank} failed with exit code {code} (its output is above)", file=sys.stderr)
        return code if 0 < code < 256 else 1
    return 0


if __name__ == "__main__":
    sys.exit(_torchrun(sys.argv[1:]))
