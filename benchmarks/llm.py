"""The training step of every method on SmolLM2-135M (134.5M parameters), as `childtune train` builds it.

Each method gets its own copy of the model and exactly what a run of it trains with
(`childtune.training.loop.setup`: the CLI's resolved defaults, LoRA wrapping, strictness, the optimizer
`make_optimizer` picks), and the step timed is the loop's own `train_step` (forward, backward, clipping,
the optimizer step, the schedule, the divergence check). Child-Tuning_D's Fisher pass runs once on a few
batches before timing; ID3 and id3-lora are timed while their child network grows (their whole run).
"""

from __future__ import annotations

import copy
import statistics

import torch
from fisher_ways import fisher_ways_section
from timing import Section, interleaved, timing_rows

from childtune.training.config import TrainConfig
from childtune.training.loop import TrainState, setup, train_step
from childtune.training.models import model_folder, quiet_transformers
from childtune.training.params import freeze_unchosen

LLM_METHODS = ("full", "child-f", "child-d", "random", "id3", "gradual", "lora", "id3-lora")
BATCH, LENGTH = 8, 128
RUN_STEPS = 1000  # the schedule the strategies are built for: ID3 grows for all of it


def load_smollm2():
    import transformers

    with quiet_transformers():
        return transformers.AutoModelForCausalLM.from_pretrained(model_folder("smollm2-135m"), dtype=torch.float32)


def llm_fisher_section(repeats: int, examples: int = 32) -> Section:
    """Fisher's estimates side by side on SmolLM2 and real `math` examples, collated as a run collates them."""
    import transformers

    from childtune.data.batching import LMCollate
    from childtune.data.tasks import load_task

    config = TrainConfig(task="math", model="smollm2-135m", method="child-d", progress=False).resolved()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_folder("smollm2-135m"))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    collate = LMCollate(tokenizer, config.max_length, config.chat_template)
    train = load_task("math", train_size=examples).train
    batches = [collate(train[i : i + BATCH]) for i in range(0, examples, BATCH)]
    return fisher_ways_section(
        "Fisher information on SmolLM2-135M (real math examples)",
        f"The transformer blocks' weights of SmolLM2-135M-Instruct (float32), scored on real `math` training "
        f"examples in batches of {BATCH}, collated as `childtune train --model smollm2-135m` collates them (chat "
        "template, log-likelihood of the answer tokens).", load_smollm2(), batches, repeats)


def llm_section(repeats: int, fisher_batches: int = 2) -> Section:
    base = load_smollm2()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, base.config.vocab_size, (BATCH, LENGTH), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    steps, configs = {}, {}
    for method in LLM_METHODS:
        # the float32 step of every method: a causal LM's selective runs default to bf16 weights, the step in
        # backward and child-only gradients (benchmarks/memory.py measures those), pinned off here
        config = TrainConfig(task="math", model="smollm2-135m", method=method, progress=False, dtype="fp32",
                             optimizer_in_backward=False, child_only_grads=False).resolved()
        model, params, strategy, optimizer, scheduler = setup(config, copy.deepcopy(base), RUN_STEPS)
        model.train()
        strategy.prepare(model, [batch] * fisher_batches)
        if config.strict:
            freeze_unchosen(strategy, params)
        state = TrainState(model, optimizer, scheduler, strategy, config, None)
        steps[method] = lambda state=state: train_step(state, batch)
        configs[method] = config
    del base
    times = interleaved(steps, repeats, 1, "SmolLM2 training step")
    settings = "; ".join(
        f"{m}: lr {c.lr:g}" + (f", p={c.reserve_p:g}" if m in ("child-f", "child-d", "random") else "")
        + (f", budget {c.id3_budget:g}" if m.startswith("id3") else "") + (", strict" if c.strict else "")
        for m, c in configs.items())
    section = Section(
        "SmolLM2-135M training step, every method",
        f"One update on a batch of {BATCH} x {LENGTH} tokens through SmolLM2-135M-Instruct (float32, causal-LM "
        "loss on every token), each method set up as `childtune train --model smollm2-135m --dtype fp32 "
        "--no-optimizer-in-backward --no-child-only-grads` sets it up "
        f"(benchmarks/llm.py). Median of {repeats} interleaved repeats after 1 warm-up step; ratio to full "
        f"fine-tuning within each repeat. Settings (the childtune preset's defaults): {settings}.",
        ["method", "median ms", "ratio vs full", "spread", "target"],
        timing_rows(times, "full", {}))
    fastest = min(times, key=lambda m: statistics.median(times[m]))
    section.notes.append(
        f"Fastest step here: {fastest}. The forward and backward pass through all 30 blocks is most of every "
        "row: the methods differ in the optimizer step and in what backward must compute (frozen parameters "
        "get no weight gradients).")
    return section
