"""Sparse deltas: a run's change to its base model as indices and values, applied, reverted and merged
exactly (`sparse`), with the on-disk config and base fingerprint (`format`), the per-tensor arithmetic
(`entry`), the index codecs (`indexcodec`), stacking (`merge`) and merging tasks (`task_merge`: TIES, DARE)."""

from childtune.delta.errors import DeltaError
from childtune.delta.format import CONFIG_FILE, TENSORS_FILE, DeltaConfig, fingerprint
from childtune.delta.merge import encoded_bytes, merge
from childtune.delta.sparse import SparseDelta

__all__ = ["CONFIG_FILE", "TENSORS_FILE", "DeltaConfig", "DeltaError", "SparseDelta", "encoded_bytes",
           "fingerprint", "merge"]
