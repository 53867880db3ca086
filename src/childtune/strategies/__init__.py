"""Ways of choosing the child network, one module each, behind `Strategy` (see `base.py`)."""

from childtune.strategies.base import NetworkKind, Strategy
from childtune.strategies.bitfit import BitFit
from childtune.strategies.child_d import ChildTuningD
from childtune.strategies.child_f import ChildTuningF
from childtune.strategies.drop_regrow import DropRegrow
from childtune.strategies.full import FullFineTuning
from childtune.strategies.given import GivenNetwork
from childtune.strategies.gradual import GradualUnfreezing
from childtune.strategies.id3 import ID3
from childtune.strategies.pafi import PaFi
from childtune.strategies.random_mask import RandomMasking

__all__ = [
    "ID3",
    "BitFit",
    "ChildTuningD",
    "ChildTuningF",
    "DropRegrow",
    "FullFineTuning",
    "GivenNetwork",
    "GradualUnfreezing",
    "NetworkKind",
    "PaFi",
    "RandomMasking",
    "Strategy",
]
