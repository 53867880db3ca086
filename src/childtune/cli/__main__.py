"""`python -m childtune.cli`: the same as the `childtune` command.

A rank of a `--nproc` job (torchrun runs this module once per rank) leaves without the interpreter's
teardown, once its run has finished, left its process group and flushed what it printed: tearing down
after gloo was seen to abort a rank ('terminate called without an active exception', exit -6) in about 1
of 20 CLI FSDP2 runs under the tests, every time after the run had written all its files, and torchrun then
failed the whole job."""

import os
import sys

from childtune.cli import main
from childtune.training.distributed import DistInfo

code = main()
if DistInfo.from_env().distributed:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
