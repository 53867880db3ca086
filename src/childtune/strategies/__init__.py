"""Ways of choosing the child network, one module each, behind `Strategy` (see `base.py`)."""

from childtune.strategies.base import HEAD, Strategy
from childtune.strategies.child_d import ChildTuningD
from childtune.strategies.child_f import ChildTuningF
from childtune.strategies.full import FullFineTuning
from childtune.strategies.gradual import GradualUnfreezing
from childtune.strategies.id3 import ID3
from childtune.strategies.random_mask import RandomMasking

__all__ = [
    "HEAD",
    "ID3",
    "ChildTuningD",
    "ChildTuningF",
    "FullFineTuning",
    "GradualUnfreezing",
    "RandomMasking",
    "Strategy",
]
