"""Fisher information of each weight: the importance score behind Child-Tuning_D.

Child-Tuning_D updates the weights whose gradients say most about the labels,
F(w_i) = mean over examples of (d log p(y|x) / d w_i)^2, estimated on the task's training data before
fine-tuning. `masks.top_fraction` turns these scores into the child network; this package only scores.

Two estimates are offered because they rank weights differently:
- `per_example=False` (the authors'): one backward pass per batch, squaring the gradient of the
  *batch-mean* loss. Cheap, but cross terms between examples survive the squaring: the per-example
  part shrinks as 1/batch size while the squared mean gradient does not, so batch size moves the ranking.
- `per_example=True` (the definition): the squared gradient of every example's own log-likelihood,
  taken layer by layer from one backward pass of the batch where the model allows it, else by
  torch.func's vmap, else one example at a time (`per_example.py`).

The authors' pass (alibaba/AliceMind `ChildTuning/ChildTuningD.py`, `calculate_fisher`, read at commit
a6d5afe) differs from the textbook estimate in two more ways, both available here: the model is in
train mode, so dropout is on (`train_mode=True`), and each scored tensor's gradient is clipped to norm
`max_grad_norm` (1.0) with `clip_grad_norm_` *before* it is squared (`clip=1.0`). Both move the global
top-p ranking: clipping caps the contribution of batches with large gradients tensor by tensor.

Modules: `likelihood` (log p(y|x) per example, batch slicing), `squares` (clip and square), `per_example`
(the three ways), `estimate` (the pass: batches, counts, ranks, shards; `fisher_in_passes` scores a group
of blocks per pass when all the scores at once would not fit).
"""

from childtune.fisher.estimate import fisher_in_passes, fisher_information
from childtune.fisher.per_example import PerExampleFallbackWarning, VmapFallbackWarning

__all__ = ["PerExampleFallbackWarning", "VmapFallbackWarning", "fisher_in_passes", "fisher_information"]
