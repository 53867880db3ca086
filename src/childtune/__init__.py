"""childtune: selective fine-tuning of pretrained models (Child-Tuning, ID3 and friends).

The data path: choose a child network (`childtune.strategies`) -> mask gradients in the optimizer step
(`ChildOptimizer`, `ChildTuningAdamW`) -> train -> save a sparse delta -> evaluate and analyse.

The classes below are imported on first use, not with the package: `import childtune.cli` must not load
torch before the CLI has set OpenMP's wait policy, which OpenMP reads only when torch loads it
(childtune/openmp.py says why it matters).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from childtune.optim.authors import ChildTuningAdamW
    from childtune.optim.masked import ChildOptimizer
    from childtune.strategies import (
        ID3,
        ChildTuningD,
        ChildTuningF,
        FullFineTuning,
        GradualUnfreezing,
        RandomMasking,
        Strategy,
    )

__all__ = [
    "ID3",
    "ChildOptimizer",
    "ChildTuningAdamW",
    "ChildTuningD",
    "ChildTuningF",
    "FullFineTuning",
    "GradualUnfreezing",
    "RandomMasking",
    "Strategy",
]

_HOME = {"ChildTuningAdamW": "childtune.optim.authors", "ChildOptimizer": "childtune.optim.masked"}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'childtune' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME.get(name, "childtune.strategies")), name)
