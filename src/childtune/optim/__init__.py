"""Masks applied in the optimizer step: the authors' drop-in, a wrapper for any torch optimizer, and
a sparse AdamW whose state is proportional to the child network (see each module's docstring)."""

from childtune.optim.authors import ChildTuningAdamW
from childtune.optim.masked import ChildOptimizer
from childtune.optim.sparse import SparseChildAdamW, state_bytes

__all__ = ["ChildOptimizer", "ChildTuningAdamW", "SparseChildAdamW", "state_bytes"]
