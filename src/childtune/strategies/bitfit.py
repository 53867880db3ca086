"""BitFit (Ben Zaken, Ravfogel & Goldberg, 2022, arXiv 2106.10199): the child network is every bias term.

Whole tensors, chosen by name when the optimizer binds the parameters: a parameter whose last name
component ends in `bias` (`query.bias`, `LayerNorm.bias`, `c_attn.bias`, `in_proj_bias`) is trained in
full, every other maskable one is frozen (`rest="freeze"`: all-False masks, so a strict run gives them no
gradient at all). The task head is trained in full (`always`), as the toolkit below does: it is newly
initialised (its README at 9ba6a1f: `choose_all`, "useful for randomly initialized heads like
classification layers"). There is no size setting: the child network is as large as the model's biases,
about 0.1% of a BERT. A model without biases (Llama, T5) has nothing to train, which binding refuses.

The ID3 authors' toolkit (Aradhye2002/selective-peft-toolkit, `selective_optimizers/optimizers/bitfit.py`,
read at commits f87e338 and 9ba6a1f) differs in what it takes for a bias: every 1-D (and 0-D) parameter
("Assume 1D parameters are bias terms"), so LayerNorm's gains join the biases. It fills them in parameter
order up to an element budget, cutting the last one short, with `choose_all` groups (the head) trained
whole and counted against that budget (f87e338 has no such groups: a head's weight matrix is frozen
there like any other). With a budget at least the 1-D parameters' size, the only difference is the
LayerNorm gains. Its optimizer forces weight decay to 0 (`base_optimizer.py` at ced7724): the CLI's
`authors` preset, with their example's lr 1e-4 (`examples/vit_trainer.py` at ced7724, README).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from childtune import shards
from childtune.strategies.chosen import ChosenStrategy


def is_bias(name: str) -> bool:
    """Whether parameter `name` is a bias term, from its last name component."""
    return name.rsplit(".", 1)[-1].endswith("bias")


@dataclass
class BitFit(ChosenStrategy):
    """Every bias in `scope` trained in full, everything else maskable frozen."""

    rest: str = field(default="freeze", kw_only=True)

    def scored(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in super().scored().items() if is_bias(n)}

    def bind(self, named_params: Mapping[str, torch.Tensor]) -> None:
        super().bind(named_params)
        biases = self.scored()
        if not biases:
            raise ValueError("BitFit found no bias among the parameters: this model has nothing for it to train")
        chosen = {n: torch.ones_like(shards.local(p), dtype=torch.bool) for n, p in biases.items()}
        self.chosen = self.complete(chosen)
