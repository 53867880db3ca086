"""childtune: selective fine-tuning of pretrained models (Child-Tuning, ID3 and friends).

The data path: choose a child network (`childtune.strategies`) -> mask gradients in the optimizer step
(`ChildOptimizer`, `ChildTuningAdamW`) -> train -> save a sparse delta -> evaluate and analyse.
"""

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
