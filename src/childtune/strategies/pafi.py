"""PaFi (Liao, Meng & Monz, 2023, "Parameter-Efficient Fine-Tuning without Introducing New Latency",
arXiv 2305.16742): the child network is the pre-trained weights of smallest absolute magnitude.

The choice reads the weights alone, so it needs no data, is the same for every task (the paper's point:
one mask shared by all downstream tasks), and is made once, when the optimizer binds the parameters.
Small weights are the ones whose change disturbs least what pre-training learned.

Ours takes exactly round(p * n) of the n scored elements: the top k of -|w| through `masks.top_fraction`
(exact, ties at the threshold broken by position: tensor order, then flat index; FSDP2 row shards cut
globally). Every maskable parameter is scored (`scope="all"`, weights, biases, LayerNorm and embeddings
alike) and the task head is trained in full outside the budget (`always`), as for the other fixed
strategies; `rest="freeze"` only matters with a narrower `scope`.

The ID3 authors' toolkit (Aradhye2002/selective-peft-toolkit, `selective_optimizers/optimizers/pafi.py`,
read at commits f87e338 and 9ba6a1f, with `base_optimizer.py`, `wrap.py` and `examples/vit_trainer.py`
at ced7724) ships PaFi with the same rule: |w| of every trainable parameter it holds, the budget's
smallest. Where it differs: the budget is an element count, not a share; parameter groups marked
`choose_all` (their example: the classifier head) are trained whole *and* counted against the budget,
so the weights get the budget minus the head (here the head comes on top of p, as ID3's `head="outside"`);
ties among equal magnitudes are left to `torch.argsort` (9ba6a1f; at f87e338 a `<= cutoff` test kept the
first ones in parameter order, as here). Its optimizer forces weight decay to 0 (`base_optimizer.py` at
ced7724), which is the CLI's `authors` preset, with their example's lr 1e-4.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from childtune import shards
from childtune.masks import check_probability, top_fraction
from childtune.overlay import values_of
from childtune.strategies.chosen import ChosenStrategy


@dataclass
class PaFi(ChosenStrategy):
    """Exactly round(p * n) of the n scored elements, those of smallest |w| when bound."""

    p: float
    rest: str = field(default="freeze", kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.p = check_probability("p", self.p)

    def bind(self, named_params: Mapping[str, torch.Tensor]) -> None:
        super().bind(named_params)
        # the smallest |w| are the largest -|w|; float32 keys, whatever the weights' dtype
        scores = {n: values_of(shards.local(p)).detach().float().abs().neg() for n, p in self.scored().items()}
        self.chosen = self.complete(top_fraction(scores, self.p, group=self.group))
