"""`make bench`: what selective fine-tuning costs next to plain fine-tuning, measured on this machine.

Every comparison is made side by side in one run: the modes of a table are timed in turn within each
repeat (the order rotated every repeat), and a ratio is the median over repeats of (mode / baseline) from
the same repeat. Other jobs on a shared CPU then slow both sides of a ratio alike, which a ratio of two
medians taken minutes apart would not survive. Results go to a Markdown file, written atomically, with
the command, date and machine, each target and PASS/MISS, and why a target was missed.

    .venv/bin/python benchmarks/bench.py --output benchmarks/RESULTS.md [--repeats N] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import safetensors.torch
import torch
import transformers
from cli_memory import cli_memory_section
from fisher_ways import fisher_ways_section
from llm import llm_fisher_section, llm_section
from memory import memory_section, quantized_memory_section
from shared_cpu import TITLE as SHARED_CPU
from shared_cpu import shared_cpu_section
from timing import Row, Section, interleaved, ratio, timing_rows, verdict
from tqdm.auto import tqdm

from childtune import ChildOptimizer, ChildTuningAdamW, kernels
from childtune.fileio import atomic_write
from childtune.masks import top_fraction
from childtune.optim.sparse import SparseChildAdamW, state_bytes
from childtune.strategies import (
    ID3,
    ChildTuningD,
    ChildTuningF,
    GradualUnfreezing,
    RandomMasking,
)

THREADS = 2  # set once in main() from --threads
THREAD_NOTE = (
    "`--threads auto` uses both cores on an idle machine and 1 thread when other jobs already keep the cores busy "
    "(1-minute load average >= cores): OpenMP's 2-thread kernels wait at every barrier for a thread the OS has "
    "descheduled, and on this machine under load an AdamW step measured 3-10x slower and ~10x noisier with 2 "
    "threads than with 1, which would make every ratio below noise.")
P_F = P_D = 0.3  # the CLI's defaults for child-f and child-d
LR = 1e-5  # small enough that hundreds of timed steps never drive weights to inf/NaN
RUN_STEPS = 189  # the CLI's default run on 1,000 examples (batch 16, 3 epochs): ID3 grows over this many steps
ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------- plumbing


def load_model():
    from transformers import AutoModelForSequenceClassification

    from childtune.data.assets import model_path

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(str(model_path()), num_labels=2)


def training_method(method: str, named: dict, d_masks, total_steps: int) -> torch.optim.Optimizer:
    """The optimizer a training run of `method` uses (the CLI's defaults), with inner AdamW foreach."""
    adamw = dict(lr=LR, foreach=True)
    if method == "vanilla (AdamW)":
        return torch.optim.AdamW(named.values(), **adamw)
    if method == "vanilla (AdamW fused)":
        return torch.optim.AdamW(named.values(), lr=LR, fused=True)
    if method == "child-f":
        return ChildOptimizer(named, ChildTuningF(P_F), torch.optim.AdamW, **adamw)
    if method == "child-f one pass":  # ChildOptimizer's default for F
        return ChildOptimizer(named, ChildTuningF(P_F), lr=LR)
    if method in ("child-d", "child-d sparse"):
        strategy = ChildTuningD(P_D, rest="freeze")
        opt = (SparseChildAdamW(named, strategy, lr=LR) if method.endswith("sparse") else
               ChildOptimizer(named, strategy, torch.optim.AdamW, strict=True, **adamw))
        strategy.chosen = strategy.complete(d_masks)
        return opt
    if method == "random p=0.01":
        return ChildOptimizer(named, RandomMasking(0.01), torch.optim.AdamW, strict=True, **adamw)
    if method == "random p=0.01 sparse":
        return SparseChildAdamW(named, RandomMasking(0.01), lr=LR)
    if method == "id3":
        return ChildOptimizer(named, ID3(0.005, total_steps), torch.optim.AdamW, strict=True, **adamw)
    if method == "id3 sparse":
        return SparseChildAdamW(named, ID3(0.005, total_steps), lr=LR)
    if method == "gradual":
        return ChildOptimizer(named, GradualUnfreezing(10_000), torch.optim.AdamW, strict=True, **adamw)
    if method == "gradual sparse":
        return SparseChildAdamW(named, GradualUnfreezing(10_000), lr=LR)
    raise ValueError(method)


METHODS = ["vanilla (AdamW)", "vanilla (AdamW fused)", "child-f", "child-f one pass", "child-d", "child-d sparse",
           "random p=0.01", "random p=0.01 sparse",
           "id3", "id3 sparse", "gradual", "gradual sparse"]


def token_batch(model, batch: int = 16, length: int = 128) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(1000, model.config.vocab_size, (batch, length), generator=g),
            "attention_mask": torch.ones(batch, length, dtype=torch.long),
            "labels": torch.randint(0, 2, (batch,), generator=g)}


# ----------------------------------------------------------------------------------------- sections


def fisher_section(model, args) -> tuple[Section, dict[str, torch.Tensor]]:
    from transformers import AutoTokenizer

    from childtune.data.assets import model_path
    from childtune.data.batching import make_collate
    from childtune.data.tasks import load_task
    from childtune.fisher import fisher_information

    n = 1000
    data = load_task("mr", train_size=n)
    collate = make_collate(AutoTokenizer.from_pretrained(str(model_path())), max_length=128)
    batches = [collate(data.train[i: i + 16]) for i in range(0, n, 16)]  # tokenised up front, not timed
    started = time.perf_counter()
    scores = fisher_information(model, batches, progress=False)  # D's child network in the sections below
    whole = time.perf_counter() - started
    section = fisher_ways_section(
        "Fisher information for Child-Tuning_D (real mr examples)",
        "The transformer blocks' weights of all-MiniLM-L6-v2, scored on real `mr` training examples, batches of 16 "
        "with dynamic padding (tokenised up front, not timed).", model,
        batches[: max(1, args.fisher_examples // 16)], args.fisher_repeats)
    section.notes.append(f"The per-batch pass over all 1,000 examples (whose scores give D's child network below) "
                         f"took {whole:.1f} s.")
    return section, scores


def optimizer_section(model, d_masks, args) -> tuple[Section, dict]:
    named = dict(model.named_parameters())
    g = torch.Generator().manual_seed(1)
    grads = {n: torch.randn(p.shape, generator=g) * 1e-3 for n, p in named.items()}
    for n, p in named.items():
        p.grad = grads[n].clone()

    def reset():  # masking optimizers zero gradients in place: every call starts from the same ones
        for n, p in named.items():
            p.grad.copy_(grads[n])

    params = list(named.values())
    fixed = {n: m for n, m in d_masks.items()}
    by_param = {named[n]: m for n, m in fixed.items()}
    ctd = ChildTuningAdamW(params, lr=LR, mode="ChildTuning-D")
    ctd.set_gradient_mask(by_param)

    def child_opt(strategy, strict=False, **kw):
        return ChildOptimizer(named, strategy, torch.optim.AdamW, strict=strict, lr=LR, **kw)

    def with_d(opt):
        opt.strategy.chosen = opt.strategy.complete(fixed)
        return opt

    def two_pass():  # built with the one-pass path off: the compiled mask (at step time), then torch's fused step
        with eager_kernels():
            return child_opt(ChildTuningF(P_F), fused=True)

    opts = {
        "AdamW foreach (baseline)": torch.optim.AdamW(params, lr=LR, foreach=True),
        "AdamW for-loop (torch's CPU default)": torch.optim.AdamW(params, lr=LR, foreach=False),
        "AdamW fused": torch.optim.AdamW(params, lr=LR, fused=True),
        "ChildTuningAdamW without a mask (mode=None)": ChildTuningAdamW(params, lr=LR),
        "F: ChildTuningAdamW (authors' drop-in)": ChildTuningAdamW(params, lr=LR, reserve_p=P_F,
                                                                   mode="ChildTuning-F"),
        "F: ChildOptimizer + AdamW foreach": child_opt(ChildTuningF(P_F), foreach=True),
        "F: ChildOptimizer, mask kernel then AdamW fused (two passes)": two_pass(),
        ONE_PASS: child_opt(ChildTuningF(P_F)),
        "D: ChildTuningAdamW (authors' drop-in)": ctd,
        "D: ChildOptimizer + AdamW foreach": with_d(child_opt(ChildTuningD(P_D), foreach=True)),
        "D: ChildOptimizer strict + AdamW foreach": with_d(child_opt(ChildTuningD(P_D), strict=True, foreach=True)),
        "D: ChildOptimizer + AdamW fused": with_d(child_opt(ChildTuningD(P_D), fused=True)),
        "fixed random p=0.3: ChildOptimizer + AdamW foreach": child_opt(RandomMasking(0.3), foreach=True),
        "D: SparseChildAdamW": with_d(SparseChildAdamW(named, ChildTuningD(P_D), lr=LR)),
    }
    for p in (0.3, 0.1, 0.01):
        opts[f"SparseChildAdamW, random p={p}"] = SparseChildAdamW(named, RandomMasking(p), lr=LR)
    base = "AdamW foreach (baseline)"
    times = interleaved({k: o.step for k, o in opts.items()}, args.repeats, 2, "optimizer step", before=reset)
    targets = {k: (1.5, "<= 1.5") for k in opts if k.startswith("F:")}
    targets |= {k: (1.1, "<= 1.1") for k in opts if k.startswith(("D:", "fixed"))}
    targets["SparseChildAdamW, random p=0.1"] = (1.0, "< 1.0")
    section = Section(
        "Optimizer step on the MiniLM parameter set",
        f"One `step()` over all {sum(p.numel() for p in params) / 1e6:.1f}M parameters of all-MiniLM-L6-v2 + a "
        f"2-class head, with fixed random gradients restored before every call (not timed); F at p={P_F}, D with "
        f"the real Fisher child network at p={P_D} (`rest='freeze'`, the CLI default), median of "
        f"{args.repeats} interleaved repeats after 2 warm-up calls. Ratio: median of per-repeat ratios to AdamW "
        "foreach. Spread: interquartile range / median.",
        ["mode", "median ms", "ratio vs AdamW foreach", "spread", "target"],
        timing_rows(times, base, targets))
    fused = ratio(times, "AdamW fused", base)
    one_pass = ratio(times, ONE_PASS, "AdamW fused")
    two = ratio(times, "F: ChildOptimizer, mask kernel then AdamW fused (two passes)", "AdamW fused")
    first, cached = kernel_build_seconds()
    section.notes.append(
        f"Child-Tuning_F through `ChildOptimizer` in one pass takes {one_pass:.2f}x torch's fused AdamW step "
        f"(target <= 1.3: {verdict(one_pass, 1.3)}); masking first with the same compiled draw and then running "
        f"torch's fused step takes {two:.2f}x. The draw is counter-based (childtune/kernels.py): a keep bit is a "
        "hash of the weight's position keyed by (seed, step, name), computed in registers inside the AdamW loop "
        "(csrc/kernels.cpp), so the step reads p, g, m, v and writes p, m, v once, like the fused step. The "
        f"kernels are built on first use: {first:.0f} s in an empty cache folder, {cached:.1f} s to load "
        "from that cache in a later process (both measured by this run, each in its own process).")
    n = sum(p.numel() for p in params)
    zeros, ones = torch.zeros(n), torch.ones(n)
    roots = interleaved({"zeros": zeros.sqrt, "ones": ones.sqrt}, args.repeats, 1, "sqrt")
    section.notes.append(
        "Masked dense AdamW is slow here for a second reason besides the mask multiply: `torch.sqrt` over "
        f"{n / 1e6:.1f}M zeros took {ratio(roots, 'zeros', 'ones'):.1f}x as long as over as many ones on this CPU "
        "(measured in this run), and every weight outside a fixed child network keeps a second moment of exactly "
        "zero, so the AdamW it wraps runs slower on masked gradients than on full ones. SparseChildAdamW keeps no "
        "moments there.")
    section.notes.append(
        f"torch's fused CPU AdamW takes {fused:.2f} of the foreach step's time, so `ChildOptimizer` now wraps "
        "the fused kernel unless the caller picks `foreach` (the rows above pin foreach to compare like with "
        "like). Its strict mode under a fixed child network copies nothing (optim/masked.py says why). "
        "SparseChildAdamW computes the same update as `ChildOptimizer(..., strict=True)` (tests/test_sparse_optim.py) "
        "but only on the child elements.")
    return section, opts


ONE_PASS = "F: ChildOptimizer, one pass (draw + mask + AdamW, the default)"
COMPILED_APPLY = "draw + apply as torch ops, torch.compile'd per tensor (inductor)"
DRAW = "counter-based draw, compiled (bool masks)"
EAGER_DRAW = "counter-based draw, eager torch reference (CHILDTUNE_KERNELS=eager)"
OLD_DRAW = "previous draw: mt19937 random_ into 16-bit lanes, < threshold"


@contextlib.contextmanager
def eager_kernels():
    """childtune's eager kernels while inside (`CHILDTUNE_KERNELS=eager`), the compiled ones after."""
    os.environ["CHILDTUNE_KERNELS"] = "eager"
    try:
        yield
    finally:
        del os.environ["CHILDTUNE_KERNELS"]


def kernel_build_seconds() -> tuple[float, float]:
    """Seconds `kernels.extension()` takes in a fresh process: building into an empty cache folder,
    then loading what that build left (each in its own process, so nothing is cached in memory)."""
    probe = "from childtune import kernels; kernels.extension(); print(kernels.build_seconds[0])"
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "CHILDTUNE_KERNEL_CACHE": cache}
        env.pop("CHILDTUNE_KERNELS", None)
        return tuple(float(subprocess.run([sys.executable, "-c", probe], env=env, check=True, capture_output=True,
                                          text=True).stdout.split()[-1]) for _ in range(2))


def draw_section(model, args) -> Section:
    """Child-Tuning_F's per-step mask draw, alone and against alternatives of the same job."""
    named = dict(model.named_parameters())
    strategy = ChildTuningF(P_F)
    strategy.bind(named)
    n = sum(p.numel() for p in strategy.maskable().values())
    g = torch.Generator().manual_seed(0)
    floats, flags = torch.empty(n), torch.empty(n, dtype=torch.bool)
    grads = [p.detach().clone() for p in strategy.maskable().values()]
    masks = list(strategy.masks(0).values())
    adamw = torch.optim.AdamW(named.values(), lr=LR, foreach=True)
    for p in named.values():
        p.grad = torch.zeros_like(p)
    lanes = torch.empty((n + 3) // 4, dtype=torch.int64)

    def old_draw():
        lanes.random_(-(2**63), 2**63 - 1, generator=g)
        torch.lt(lanes.view(torch.int16)[:n], round(P_F * 65536) - 32768, out=flags)

    def eager_draw():
        with eager_kernels():
            strategy.masks(1)

    fns = {
        "AdamW foreach step (reference)": adamw.step,
        DRAW: lambda: strategy.masks(1),
        EAGER_DRAW: eager_draw,
        OLD_DRAW: old_draw,
        "torch.rand < p (uniform_ + lt)": lambda: torch.lt(floats.uniform_(generator=g), P_F, out=flags),
        "bernoulli_(p) into bool": lambda: flags.bernoulli_(P_F, generator=g),
        "bernoulli_(p) into float32": lambda: floats.bernoulli_(P_F, generator=g),
        "applying a bool mask: foreach grad *= mask": lambda: torch._foreach_mul_(grads, masks),
        "applying a bool mask: foreach grad *= 1/p": lambda: torch._foreach_mul_(grads, 1 / P_F),
        "draw + apply, compiled (mask_gradients_)": lambda: strategy.mask_gradients_(1, by_name),
        COMPILED_APPLY: lambda: compiled_apply(1),
    }
    by_name = dict(zip(strategy.maskable(), grads, strict=True))
    threshold, scale = strategy._threshold, strategy.scale

    def masked(g, k1, k2):  # the same draw written as torch ops, for inductor to fuse
        keep = kernels.keep_bits(torch.arange(g.numel()), k1, k2) < threshold
        return g.copy_(torch.where(keep, g * scale, torch.zeros_like(g)))

    kernel = torch.compile(masked, dynamic=True)

    def compiled_apply(step):
        strategy.draw(step)
        for name, g in by_name.items():
            draw = strategy.drawn(name)
            kernel(g.view(-1), draw.k1, draw.k2)

    started = time.perf_counter()
    compiled_apply(0)
    compile_s = time.perf_counter() - started
    times = interleaved(fns, args.repeats, 1, "F mask draw")
    base = "AdamW foreach step (reference)"
    section = Section(
        "Child-Tuning_F mask draw",
        f"Drawing one Bernoulli({P_F}) mask over the {n / 1e6:.1f}M maskable weights (everything but the "
        "head), as Child-Tuning_F does every step, against other ways of doing the same job.",
        ["draw", "median ms", "ratio vs AdamW foreach step", "spread", ""], timing_rows(times, base, {}))
    for row in section.rows:
        row.cells.pop()
    section.header.pop()
    med = {k: statistics.median(v) for k, v in times.items()}
    by_mask = med["applying a bool mask: foreach grad *= mask"]
    by_scale = med["applying a bool mask: foreach grad *= 1/p"]
    fused = med["draw + apply, compiled (mask_gradients_)"]
    section.notes.append(
        f"The counter-based draw (childtune/kernels.py) takes {med[DRAW] / med[OLD_DRAW]:.2f}x the previous "
        "mt19937 draw and runs on every thread torch uses: no generator runs in sequence and no random buffer "
        f"exists. Its eager torch form, the reference the compiled one must equal bit for bit, takes "
        f"{med[EAGER_DRAW] / med[DRAW]:.0f}x the compiled one; it is the fallback where no C++ compiler is "
        f"found. `torch.rand(n) < p` takes {med['torch.rand < p (uniform_ + lt)'] / med[DRAW]:.1f}x and "
        f"`bernoulli_` {med['bernoulli_(p) into bool'] / med[DRAW]:.1f}x the compiled draw. Applying a bool mask "
        f"as torch ops costs {(by_mask + by_scale) / med[DRAW]:.1f}x the draw (the bool multiply alone is "
        f"{by_mask / by_scale:.1f}x the float one); drawing and applying in one compiled loop takes "
        f"{fused / (med[DRAW] + by_mask + by_scale):.2f} of draw + apply. The same job as torch ops under "
        f"`torch.compile` (inductor, dynamic shapes, one call per tensor; first call {compile_s:.1f} s) takes "
        f"{med[COMPILED_APPLY] / fused:.1f}x the compiled kernel: each of its calls pays Python-side overhead "
        "that, over this model's tensors, is a large part of a fused AdamW step.")
    return section


def training_section(model, d_masks, args) -> Section:
    named = dict(model.named_parameters())
    batch = token_batch(model)
    opts = {m: training_method(m, named, d_masks, RUN_STEPS) for m in METHODS}
    model.train()

    def step(opt):
        def run():
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            opt.step()
        return run

    times = interleaved({m: step(o) for m, o in opts.items()}, args.train_repeats, 1, "training step")
    targets = {m: (1.05, "<= 1.05") for m in METHODS[1:] if m not in ("vanilla (AdamW fused)", "child-f one pass")}
    section = Section(
        "Whole training step (forward + backward + optimizer step)",
        f"Batch of 16 x 128 tokens through all-MiniLM-L6-v2 in train mode, then the method's optimizer (the "
        f"CLI's defaults: F and D at p={P_F}, random p=0.01, ID3 budget 0.005 while it grows over a "
        f"{RUN_STEPS}-step run (the CLI's default on 1,000 examples), gradual "
        f"unfreezing in its first stage; inner AdamW foreach). Median of {args.train_repeats} interleaved "
        "repeats after 1 warm-up step.",
        ["method", "median ms", "ratio vs vanilla", "spread", "target"],
        timing_rows(times, "vanilla (AdamW)", targets))
    one_pass = ratio(times, "child-f one pass", "vanilla (AdamW fused)")
    section.notes.append(
        f"With the defaults of `ChildOptimizer` (F in one pass, against torch's fused AdamW for vanilla) a "
        f"Child-Tuning_F training step takes {one_pass:.2f}x vanilla's (target <= 1.05: {verdict(one_pass, 1.05)}).")
    for opt in opts.values():  # free their state before the next section
        opt.state.clear()
    return section


def state_section(model, opts) -> Section:
    named = dict(model.named_parameters())
    dense = torch.optim.AdamW(named.values(), lr=LR)
    for p in named.values():
        p.grad = torch.zeros_like(p)
    dense.step()
    full = state_bytes(dense)
    section = Section(
        "Optimizer state bytes",
        "Sum of `nbytes` of every tensor in the optimizer's state (moments, child indices, step counts) after one "
        "step, against `torch.optim.AdamW` on the same parameters. Random child networks over every weight but "
        "the head (which keeps dense state) for the `random p` rows; D's Fisher child network for the D rows.",
        ["optimizer", "child elements", "MiB", "ratio vs AdamW", "moments only", "target"])
    section.rows.append(Row("AdamW (dense)", [f"{sum(p.numel() for p in named.values()):,}", f"{full / 2**20:.1f}",
                                              "1.000", "1.000", ""]))
    for name in ("D: ChildOptimizer strict + AdamW foreach", "D: SparseChildAdamW"):
        _state_row(section, name, opts[name], full, None)
    for p in (0.3, 0.1, 0.01):
        _state_row(section, f"SparseChildAdamW, random p={p}", opts[f"SparseChildAdamW, random p={p}"], full, p)
    return section


def _state_row(section: Section, name: str, opt, full: int, p: float | None) -> None:
    used = state_bytes(opt)
    moments = sum(s[k].nbytes for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq") if k in s)
    child = sum(len(s["index"]) if "index" in s else s["exp_avg"].numel() for s in opt.state.values()
                if "exp_avg" in s)
    limit = None if p is None else p + 0.02
    section.rows.append(Row(name, [f"{child:,}", f"{used / 2**20:.1f}", f"{used / full:.3f}", f"{moments / full:.3f}",
                                   "" if p is None else f"<= {limit:.2f}"], verdict(used / full, limit)))


def delta_section(model) -> Section:
    from childtune.delta import SparseDelta
    from childtune.layers import HEAD

    base = {n: t.detach().clone() for n, t in model.state_dict().items()}
    section = Section(
        "Delta file size",
        "A model whose p-fraction of weights (random, all but the head) moved by ~1e-3 and whose head was "
        "re-initialised, saved as a `SparseDelta` directory against the pretrained base, next to the whole "
        "model saved as `model.safetensors`.",
        ["p", "delta (MiB)", "full model.safetensors (MiB)", "ratio", "target (1.2 p + head)"])
    head = sum(t.nbytes for n, t in base.items() if any(h in n for h in HEAD))
    named = dict(model.named_parameters())
    with tempfile.TemporaryDirectory() as tmp:
        full_path = Path(tmp) / "model.safetensors"
        safetensors.torch.save_file({n: t.contiguous() for n, t in base.items()}, str(full_path))
        full = full_path.stat().st_size
        for p in (0.3, 0.1, 0.01):
            strategy = RandomMasking(p, seed=7)
            strategy.bind(named)
            g = torch.Generator().manual_seed(3)
            tuned = {n: t.clone() for n, t in base.items()}
            for n, mask in strategy.final_masks(0).items():
                noise = torch.randn(mask.shape, generator=g) * 1e-3
                tuned[n] = torch.where(mask, tuned[n] + noise, tuned[n])
            for n in tuned:
                if any(h in n for h in HEAD):
                    tuned[n] = torch.randn(tuned[n].shape, generator=g) * 0.02
            delta = SparseDelta.from_training(base, tuned, method="random", hparams={"p": p})
            folder = Path(tmp) / f"delta-{p}"
            delta.save(folder)
            size = sum(f.stat().st_size for f in folder.iterdir())
            limit = 1.2 * p + head / full
            section.rows.append(Row(str(p), [f"{size / 2**20:.2f}", f"{full / 2**20:.1f}", f"{size / full:.4f}",
                                             f"<= {limit:.4f}"], verdict(size / full, limit)))
    return section


def rss_section(d_masks, args) -> Section:
    section = Section(
        "Peak memory of a training run",
        f"Each method in its own process (`bench.py --rss-child METHOD`): load the model, build the optimizer, run "
        f"{args.rss_steps} training steps on 16 x 128 tokens, report the peak resident set (`VmHWM`, which "
        "includes loading the weights). D gets the same Fisher child network as above, through a file.",
        ["method", "peak RSS (MiB)", "above forward+backward only (MiB)", "vs vanilla"])
    with tempfile.TemporaryDirectory() as tmp:
        masks_file = Path(tmp) / "d_masks.pt"
        torch.save(d_masks, masks_file)
        peaks = {}
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
        for method in tqdm(["forward+backward only", *METHODS], desc="peak RSS", leave=False):
            out = subprocess.run(
                [sys.executable, __file__, "--rss-child", method, "--rss-steps", str(args.rss_steps),
                 "--threads", str(THREADS),
                 "--d-masks", str(masks_file)], capture_output=True, text=True, env=env, check=False)
            if out.returncode != 0:
                raise RuntimeError(f"peak-RSS child for {method!r} failed:\n{out.stderr[-2000:]}")
            peaks[method] = json.loads(out.stdout.strip().splitlines()[-1])["maxrss_mib"]
    for method, peak in peaks.items():
        extra = peak - peaks["forward+backward only"]
        section.rows.append(Row(method, [f"{peak:.0f}", f"{extra:.0f}", f"{peak / peaks['vanilla (AdamW)']:.2f}"]))
    section.notes.append(
        "Dense AdamW state for these weights is 173 MiB (two float32 moments); the peak also holds the weights, "
        "gradients, activations of the largest backward pass and the framework, and glibc's allocator makes "
        "differences of a few tens of MiB noise. ID3 allocates a float32 importance score and a top-k buffer over "
        "every weight while it grows.")
    return section


def rss_child(args) -> None:
    """One measured training run in a fresh process, so each method's peak is its own."""
    torch.set_num_threads(THREADS)
    model = load_model()
    named = dict(model.named_parameters())
    d_masks = torch.load(args.d_masks, weights_only=True)
    opt = None if args.rss_child == "forward+backward only" else training_method(
        args.rss_child, named, d_masks, args.rss_steps)
    batch = token_batch(model)
    model.train()
    for _ in range(args.rss_steps):
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        if opt is not None:
            opt.step()
    print(json.dumps({"maxrss_mib": peak_rss_mib()}))


def peak_rss_mib() -> float:
    """Peak resident set of this process since exec (VmHWM). `ru_maxrss` would not do: Linux carries the
    forking parent's resident size over into the child's, so every child would report the parent's peak."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------- report


def render(sections: list[Section], command: str, started: float, load: tuple, misses: list[str]) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    lines = [
        "# Benchmarks",
        "",
        f"Produced by `{command}` on {datetime.date.today().isoformat()}, in {time.time() - started:.0f} s "
        "(`make bench` runs `python benchmarks/bench.py --memory-scale --output benchmarks/RESULTS.md`).",
        "",
        f"Machine: {os.cpu_count()} CPUs ({cpu}), torch {torch.__version__} with {THREADS} threads, transformers "
        f"{transformers.__version__}, Python {platform.python_version()}. Load average (1 min) at start "
        f"{load[0]:.1f}, at end {os.getloadavg()[0]:.1f}: other jobs shared these cores, so absolute times are "
        "noisy; ratios come from calls timed next to each other and are the numbers to read.",
        "",
        THREAD_NOTE,
        "",
    ]
    for s in sections:
        lines.append(render_section(s))
    lines += [MISSES, ""]
    lines += misses or ["None."]
    return "\n".join(lines).rstrip() + "\n"


def render_section(s: Section) -> str:
    lines = [f"## {s.title}", "", s.intro, "", "| " + " | ".join([*s.header, "result"]) + " |",
             "|" + "---|" * (len(s.header) + 1)]
    lines += ["| " + " | ".join([r.label, *r.cells, r.verdict]) + " |" for r in s.rows]
    lines += [""] + [f"{n}\n" for n in s.notes]
    return "\n".join(lines)


MISSES = "## Targets missed, and why"


def section_text(report: str, title: str) -> str | None:
    """The section `## title` of a rendered report, up to the next section, or None."""
    start = report.find(f"## {title}\n")
    if start < 0:
        return None
    end = report.find("\n## ", start + 1)
    return report[start: end + 1 if end >= 0 else len(report)]


def with_section(report: str, text: str, title: str) -> str:
    """`report` with its section `title` replaced by `text`, or `text` put before the missed targets."""
    old = section_text(report, title)
    if old is not None:
        return report.replace(old, text)
    at = report.find(MISSES)
    return report[:at] + text + report[at:] if at >= 0 else report + "\n" + text


def previous(path: str) -> str:
    return Path(path).read_text(encoding="utf-8") if Path(path).exists() else ""


def one_section_only(args, command: str, section: Section, started: float) -> None:
    """`--only-shared-cpu`, `--only-memory-scale`, `--only-memory-4bit`, `--only-cli-memory`: one table of slow,
    mostly process-sized runs (minutes to tens of minutes), put in place in --output with its missed targets, the
    other sections kept as they were (`make bench` carries the shared-CPU one over)."""
    section.notes.append(f"Measured by `{command}` on {datetime.date.today().isoformat()}, in "
                         f"{time.time() - started:.0f} s, alone: the other sections are kept from their last run.")
    text = with_section(previous(args.output), render_section(section) + "\n", section.title)
    misses = section_text(text, MISSES.removeprefix("## ")) or ""
    kept = [line for line in misses.splitlines() if line.startswith("- ") and f"**{section.title}:" not in line]
    misses_text = "\n".join([MISSES, "", *kept, *explain_misses([section])]) + "\n"
    atomic_write(args.output, with_section(text, misses_text, MISSES.removeprefix("## ")))
    print(render_section(section))


def explain_misses(sections: list[Section]) -> list[str]:
    """One honest sentence per missed target, keyed by what the table row measures."""
    reasons = [  # (section title starts with, row label starts with, why)
        ("Whole `childtune train`", "child-d at its default", "child-d's causal-LM default keeps fp32 weights, "
         "twice LoRA's bf16 base, because bf16 cost it its answers (docs/RESULTS.md, issue 29.6). Its largest "
         "phase is the Fisher pass, whose float32 score sums are as large as the fp32 weights. The lean setting "
         "(bf16, in backward) peaks at 1.21x LoRA, also in the Fisher pass, but loses child-d's dev score."),
        ("Whole `childtune train`", "id3 at its default", "ID3 at its default grows every step from dense "
         "gradients, one tensor's at a time in backward. Its run peaks when the finished run's weights are "
         "compared with the base to count what changed, as LoRA's does; the training steps come second, "
         "within 13% of LoRA's run. Before 2026-12-05 each tensor kept its own best `grow` candidates for "
         "the growth, at most `grow` per tensor, and training peaked at 2,972 MiB. Now the offers are cut "
         "back to the global best `grow` whenever they pass twice that."),
        ("Optimizer step", "F: ChildTuningAdamW", "The authors' drop-in keeps their arithmetic: whole-tensor bool "
         "masks multiplied into every gradient, then an AdamW written as torch ops (foreach); see the draw table."),
        ("Optimizer step", "F: ", "Over a foreach AdamW the ratio is that AdamW's many passes plus a separate "
         "masking pass; the one-pass row is the default and the target to read."),
        ("Optimizer step", "D: ChildTuningAdamW", "Unmasked, the authors' drop-in is as fast as AdamW foreach (its "
         "mode=None row); with D's mask it pays the bool multiply and the sqrt over zero second moments, as "
         "ChildOptimizer does."),
        ("Optimizer step", "D: ChildOptimizer strict", "Strict AdamW copies nothing any more (optim/masked.py), but "
         "its weight decay restricted to the child network is one more masked pass over every weight, on top of the "
         "bool gradient mask and the sqrt over zero moments. SparseChildAdamW is strict without any of them."),
        ("Optimizer step", "D: ChildOptimizer", "Two costs: multiplying every gradient by a bool mask (torch's CPU "
         "kernel converts bool to float element by element; draw table), and the wrapped AdamW itself running slower "
         "on masked gradients, because it takes the square root of the exactly-zero second moment of every non-child "
         "weight and this CPU's sqrt is much slower on zeros (note above). SparseChildAdamW avoids both."),
        ("Optimizer step", "fixed", "As for D: the bool mask multiply, and AdamW's sqrt over zero second moments."),
        ("Optimizer step", "D: SparseChildAdamW", "Gathering and scattering the child elements by index touches "
         "memory at random, several times slower per element than streaming; at D's size that eats the saving."),
        ("Optimizer step", "SparseChildAdamW", "Gathering and scattering the child elements by index touches memory "
         "at random, several times slower per element than streaming, so p=0.1 saves less than 10x."),
        ("Optimizer state", "SparseChildAdamW", "Each child element also needs its int32 flat index (4 bytes next "
         "to 8 bytes of moments), so state is 1.5p of AdamW's; the moments alone are exactly p. A bitmap index (1 "
         "bit per weight, +0.016) would meet p + 0.02, but turning it into positions is a pass over every weight "
         "on every step: the dense cost this optimizer exists to avoid."),
        ("Whole", "child-f", "The F step's own cost (optimizer table) is paid on every step."),
        ("Whole", "child-d", "D's gradient mask, AdamW's sqrt over zero moments and the child-only decay (optimizer "
         "table); `child-d sparse` is the same method without them."),
        ("Whole", "random", "The bool mask multiply, AdamW's sqrt over zero moments and the child-only decay, on every "
         "weight, to update 1% of them; `random p=0.01 sparse` is the same method without them."),
        ("Whole", "id3 sparse", "ID3 ranks every not-yet-chosen weight (|g| / (|w| + eps)) on every step while its "
         "child network grows, which by design is the whole run: one compiled streaming pass per tensor "
         "(childtune/kernels.py, `top_unchosen`), plus the sparse optimizer taking in the elements that join."),
        ("Whole", "id3", "ID3's ranking pass (see `id3 sparse`), plus the dense masked AdamW's costs (bool mask "
         "multiply, sqrt over zero moments, child-only decay) that `id3 sparse` avoids."),
        ("Fisher", "per-example, by layer", "Per example, a Linear weight's gradient is a product over that "
         "example's tokens alone, written and squared into the score one example at a time: a pass over the "
         "score tensor per example where the per-batch estimate makes one per batch, and short sequences make "
         "those products small and memory-bound; plus the once-per-pass check against two examples run alone, "
         "which a short timed pass does not amortise."),
        ("Whole", "gradual", "Frozen blocks still get gradients, bool masks, zero second moments and the child-only "
         "decay; `gradual sparse` is the same method without them."),
        ("Memory on a 4-bit base", "child-d p=0.01", "Its training steps cost what QLoRA's do; the excess at a "
         "batch of 1 x 128 is what the allocator kept from the Fisher pass before the window (its float32 score sums "
         "and each layer's dense gradient), which glibc does not give back. At 135M the tensors alive after the "
         "steps differ by 11 MiB and the rise over the window's start is 368 MiB against QLoRA's 361; with a fixed "
         "1 MiB mmap threshold (MALLOC_MMAP_THRESHOLD_=1048576, so large blocks go back to the system when freed) "
         "the two peak at 1,002 and 998 MiB. At 4 x 512, where activations dominate, its peak and step are at or "
         "below QLoRA's. Its step at 1 x 128, 1.02-1.10x, is the child-only products and the sparse update per "
         "tensor, which weigh more when the batch is small."),
        ("Memory on a 4-bit base", "id3 budget 0.01", "The first timed step is a growth step: a dense gradient of "
         "each quantized weight in turn, and a float32 score per element of the tensor at hand, as in full "
         "precision. At 4 x 512 its peak and step are below QLoRA's (0.94x and 0.92-0.93x)."),
        ("Memory", "child-d p=0.01, lean", "At 4 x 512 tokens child-d's training peak and step are below LoRA's "
         "(0.95x, 0.97x at 0.67B): activations dominate there, and its backward forms no dense weight gradient. At "
         "1 x 128 its peak is within 4% of LoRA's and its step 1.0-1.2x: the child-only products and sparse updates "
         "per tensor weigh more when the batch is small. The Fisher pass is the miss that counts: its float32 "
         "score sums for every scored weight (twice the bf16 weights) make it 2.1-2.5x the training peak in one "
         "pass; scoring the blocks in 4 groups (`--fisher-passes 4`, the same child network) brings it to "
         "1.4-1.6x at four times the passes, and it would need about 8 groups to meet the target."),
        ("Memory", "id3 budget 0.01, grows", "Growing every 10 steps takes ID3's step from several times LoRA's "
         "(every step, exact) to 1.0-1.2x, and below LoRA's at 4 x 512 on 0.67B. Its peak, 1.2-1.3x LoRA's at "
         "1 x 128, is the growth step, which scores every unchosen weight from dense gradients as they arrive (a "
         "float32 score per element of the tensor at hand, and the gradient itself); the step's candidates are "
         "held to about twice the growth over all tensors."),
        ("Delta", "0.01", "Not reachable for a random child network with float32 values: naming which 1% of "
         "elements changed takes at least log2(1/p) + 1.44 = 8.1 bits per element (the entropy of the mask), while "
         "1.2p leaves 0.2 x 32 = 6.4 bits. Structured child networks (whole rows, D's clustered choice) compress "
         "below that."),
        ("Delta", "", "Delta files store values for the changed elements plus their positions and a few exactness "
         "exceptions; see `childtune.delta`."),
    ]
    out = []
    for s in sections:
        for r in s.rows:
            if r.verdict == "MISS":
                why = next((text for title, label, text in reasons
                            if s.title.startswith(title) and r.label.startswith(label)), "see the table.")
                out.append(f"- **{s.title}: {r.label}** ({', '.join(r.cells)}): {why}")
    return out


def minilm_sections(args) -> list[Section]:
    model = load_model()
    fisher, scores = fisher_section(model, args)
    d = ChildTuningD(P_D, rest="freeze")  # embeddings and pooler stay as they were
    d.bind(dict(model.named_parameters()))
    d_masks = d.dense(d.complete(top_fraction(scores, P_D, d.per_layer)))  # masks: the authors' optimizer takes them
    opt_section, opts = optimizer_section(model, d_masks, args)
    sections = [opt_section, draw_section(model, args), state_section(model, opts)]
    opts.clear()
    return [*sections, training_section(model, d_masks, args), delta_section(load_model()), fisher,
            rss_section(d_masks, args)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="benchmarks/RESULTS.md", help="Markdown file to write (atomically)")
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats of each optimizer step / draw")
    parser.add_argument("--train-repeats", type=int, default=7, help="timed repeats of each whole training step")
    parser.add_argument("--fisher-examples", type=int, default=160, help="examples per timed Fisher pass")
    parser.add_argument("--fisher-repeats", type=int, default=5, help="timed repeats of each Fisher estimate")
    parser.add_argument("--rss-steps", type=int, default=3, help="training steps per peak-RSS process")
    parser.add_argument("--threads", default="auto", help="torch threads: a number, or 'auto' (see THREAD_NOTE)")
    parser.add_argument("--llm-repeats", type=int, default=4, help="timed repeats of each SmolLM2 training step")
    parser.add_argument("--no-llm", action="store_true", help="skip the SmolLM2 table (minutes on a CPU)")
    parser.add_argument("--memory-scale", action="store_true",
                        help="add the memory table: Llama shapes up to 0.67B, each setting in its own process "
                             "(about 15 minutes on this CPU)")
    parser.add_argument("--only-llm", action="store_true", help="only the SmolLM2 table")
    parser.add_argument("--only-memory-scale", action="store_true",
                        help="only the memory table, put in place in --output (the rest kept as it was)")
    parser.add_argument("--only-memory-4bit", action="store_true",
                        help="only the memory table on a 4-bit base (QLoRA, child-d, ID3), put in place likewise")
    parser.add_argument("--only-cli-memory", action="store_true",
                        help="only the whole-process `childtune train` table, put in place likewise")
    parser.add_argument("--only-shared-cpu", action="store_true",
                        help="only the shared-CPU table (training steps/s with a core busy, OpenMP's wait policy "
                             "before and after; ~10 minutes here), put in place in --output, the rest kept")
    parser.add_argument("--shared-cpu-repeats", type=int, default=3, help="repeats of each shared-CPU run")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run with few repeats and examples")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    parser.add_argument("--d-masks", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global THREADS
    load = os.getloadavg()
    if args.threads == "auto":
        THREADS = 1 if load[0] >= (os.cpu_count() or 1) else min(2, os.cpu_count() or 1)
    else:
        THREADS = int(args.threads)
    if args.rss_child:
        return rss_child(args)
    if args.quick:
        args.repeats, args.train_repeats, args.rss_steps, args.llm_repeats = 3, 2, 1, 1
        args.fisher_examples, args.fisher_repeats = 32, 1
    torch.set_num_threads(THREADS)
    started = time.time()
    command = shlex.join(["python", os.path.relpath(__file__, Path.cwd()), *(argv or sys.argv[1:])])
    if args.only_shared_cpu or args.only_memory_scale or args.only_cli_memory or args.only_memory_4bit:
        section = (shared_cpu_section(args.shared_cpu_repeats) if args.only_shared_cpu else
                   memory_section(THREADS) if args.only_memory_scale else
                   quantized_memory_section(THREADS) if args.only_memory_4bit else cli_memory_section())
        return one_section_only(args, command, section, started)
    sections = [] if args.only_llm else minilm_sections(args)
    if not args.no_llm:
        sections += [llm_section(args.llm_repeats), llm_fisher_section(args.fisher_repeats)]
    if args.memory_scale:
        sections += [memory_section(THREADS), quantized_memory_section(THREADS)]
    text = render(sections, command, started, load, explain_misses(sections))
    kept = section_text(previous(args.output), SHARED_CPU)
    if kept:  # measured on its own (--only-shared-cpu)
        text = with_section(text, kept, SHARED_CPU)
    atomic_write(args.output, text)
    print(text)


if __name__ == "__main__":
    main()
