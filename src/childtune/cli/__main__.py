"""`python -m childtune.cli`: the same as the `childtune` command."""

import sys

from childtune.cli import main

sys.exit(main())
