"""Peak memory and step time as models grow: every method in its own process, on Llama-shaped models.

`bench.py --memory-scale` runs this: for each model size and each setting below, a fresh process builds a
randomly initialised Llama of that shape (SmolLM2-135M's, and a larger one that dense fp32 AdamW still
fits on this 24 GB machine), sets the method up as `childtune train` does (`training.loop.setup`), runs
Child-Tuning_D's Fisher pass where there is one, then starts a new peak-memory window (VmHWM reset) and
times `STEPS` training steps (`training.loop.train_step`). Reported: the training-phase peak resident
memory (weights, gradients, optimizer state, activations, framework), the Fisher pass's own peak, and
the median step time. The largest model each setting fits in 24 GB / 80 GB is extrapolated linearly in
the parameter count from the two sizes (peak = fixed + per-parameter bytes x parameters); activations
are those of one batch of 1 x 128 tokens, so longer sequences or bigger batches need more.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from timing import Row, Section

SIZES = {  # name: LlamaConfig fields; vocab and proportions as SmolLM2's
    "135M (SmolLM2 shape)": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                 num_key_value_heads=3, intermediate_size=1536),
    "0.67B": dict(hidden_size=1536, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=4,
                  intermediate_size=4096),
}
SETTINGS = {  # label: (method, weights dtype, TrainConfig overrides)
    "forward+backward only, bf16 (floor)": ("floor", "bf16", {}),
    "dense AdamW, fp32": ("full", "fp32", {}),
    "dense AdamW, bf16 autocast (fp32 weights)": ("full", "fp32", {"bf16": True}),
    "peft LoRA r=8 on a bf16 base": ("lora", "bf16", {"lora_rank": 8}),
    "child-d p=0.01, sparse": ("child-d", "fp32", {}),
    "child-d p=0.01, sparse, in backward": ("child-d", "fp32", {"optimizer_in_backward": True}),
    "child-d p=0.01, sparse, bf16 + fp32 masters": ("child-d", "bf16", {}),
    "child-d p=0.01, bf16 + in backward": ("child-d", "bf16", {"optimizer_in_backward": True}),
    "child-d p=0.01, bf16 + in backward + child-only grads (causal-LM default)": (
        "child-d", "bf16", {"optimizer_in_backward": True, "child_only_grads": True}),
    "id3 budget 0.01, sparse": ("id3", "fp32", {}),
    "id3 budget 0.01, bf16 + in backward": ("id3", "bf16", {"optimizer_in_backward": True}),
}
STEPS, BATCH, LENGTH, VOCAB = 3, 1, 128, 49152
BOTH = ("child-d p=0.01, bf16 + in backward", "id3 budget 0.01, bf16 + in backward")
ROOT = Path(__file__).resolve().parent


def child(size: str, setting: str) -> dict:
    """Run one setting on one size in this process; the measurements as a dict."""
    import torch
    import transformers

    from childtune.training.config import TrainConfig
    from childtune.training.evaluate import peak_rss_mib, reset_peak_rss
    from childtune.training.loop import TrainState, setup, train_step
    from childtune.training.params import freeze_unchosen

    method, dtype, overrides = SETTINGS[setting]
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=True, max_position_embeddings=LENGTH,
                                      **SIZES[size])
    model = transformers.LlamaForCausalLM(config)
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(100, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    model.train()
    times = []
    if method == "floor":  # gradients freed as they arrive: what any training step must hold at least
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None))
        _release()
        reset_peak_rss()
        for _ in range(STEPS):
            started = time.perf_counter()
            model(**batch).loss.backward()
            times.append(time.perf_counter() - started)
        return {"params": params, "peak_mib": peak_rss_mib(), "prepare_peak_mib": None,
                "step_s": statistics.median(times)}
    extra = {"reserve_p": 0.01} if method == "child-d" else {"id3_budget": 0.01} if method == "id3" else {}
    # each setting says every run setting a causal LM would otherwise take from the defaults (CAUSAL_LM)
    run = TrainConfig(task="math", method=method, progress=False, fisher_samples=BATCH, dtype=dtype, **extra,
                      **{"optimizer_in_backward": False, "child_only_grads": False, **overrides}).resolved()
    model, trained, strategy, optimizer, scheduler = setup(run, model, 1000)
    _release()
    reset_peak_rss()
    strategy.prepare(model, [batch])
    prepare_peak = peak_rss_mib() if strategy.needs_data else None
    if run.strict:
        freeze_unchosen(strategy, trained)
    if run.child_only_grads:  # after the Fisher pass, as the training loop installs them
        optimizer.child_only_grads(model)
    state = TrainState(model, optimizer, scheduler, strategy, run, None)
    _release()
    reset_peak_rss()
    for _ in range(STEPS):
        started = time.perf_counter()
        train_step(state, batch)
        times.append(time.perf_counter() - started)
    return {"params": params, "peak_mib": peak_rss_mib(), "prepare_peak_mib": prepare_peak,
            "step_s": statistics.median(times)}


def _release() -> None:
    """Give freed heap back to the OS before a peak window opens, so the window measures what the phase
    holds, not what glibc kept from setup (the model's construction, the Fisher scores)."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def memory_section(threads: int) -> Section:
    results: dict[tuple[str, str], dict] = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    for size in SIZES:
        for setting in SETTINGS:
            out = subprocess.run([sys.executable, str(Path(__file__)), size, setting], env=env,
                                 capture_output=True, text=True, check=False)
            if out.returncode:
                raise RuntimeError(f"memory bench {size} / {setting} failed:\n{out.stderr[-2000:]}")
            results[size, setting] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{size} | {setting}: {results[size, setting]}", file=sys.stderr)
    small, large = SIZES
    section = Section(
        "Memory as models grow (Llama shapes, each setting in its own process)",
        f"Random Llama-shaped causal LMs (vocab {VOCAB:,}, tied embeddings), one batch of {BATCH} x {LENGTH} tokens, "
        f"{STEPS} training steps after the setting's own preparation (benchmarks/memory.py). Peak: resident memory "
        "of the training steps (VmHWM reset after setup and Fisher); Fisher: the peak of Child-Tuning_D's Fisher "
        "pass before them. Ratios to LoRA's peak and to the floor (bf16 weights, forward+backward, every gradient "
        "freed as it arrives) at the larger size.",
        ["setting", *(f"{s}: peak MiB" for s in SIZES), f"{large}: Fisher MiB", f"{large}: step s",
         "vs LoRA peak", "vs floor", "fits 24 GB", "fits 80 GB", "target"])
    lora = results[large, "peft LoRA r=8 on a bf16 base"]
    floor = results[large, "forward+backward only, bf16 (floor)"]
    for setting in SETTINGS:
        a, b = results[small, setting], results[large, setting]
        per_param = (b["peak_mib"] - a["peak_mib"]) / (b["params"] - a["params"])  # MiB per parameter
        fixed = a["peak_mib"] - per_param * a["params"]
        fits = [f"{(cap * 1024 - fixed) / per_param / 1e9:.1f}B" for cap in (24, 80)]
        vs_lora, vs_floor = b["peak_mib"] / lora["peak_mib"], b["peak_mib"] / floor["peak_mib"]
        target, verdict = "", ""
        if setting in BOTH:
            target = "<= LoRA, <= 1.15x floor, step <= 1.1x LoRA"
            ok = vs_lora <= 1.0 and vs_floor <= 1.15 and b["step_s"] <= 1.1 * lora["step_s"]
            verdict = "PASS" if ok else "MISS"
        fisher = f"{b['prepare_peak_mib']:.0f}" if b["prepare_peak_mib"] else ""
        section.rows.append(Row(setting, [f"{a['peak_mib']:.0f}", f"{b['peak_mib']:.0f}", fisher,
                                          f"{b['step_s']:.1f}", f"{vs_lora:.2f}", f"{vs_floor:.2f}", *fits,
                                          target], verdict))
    section.notes.append(
        f"Sizes: {small} has {results[small, next(iter(SETTINGS))]['params'] / 1e6:.1f}M parameters, "
        f"{large} {results[large, 'dense AdamW, fp32']['params'] / 1e6:.1f}M. 'Fits' extrapolates each setting's "
        "peak linearly in the parameter count through the two measured sizes and solves for 24 and 80 GiB; it "
        "holds for the same batch and sequence length, on a CPU (a GPU run adds the CUDA context, ~0.5 GiB, and "
        "allocator caching), and it ignores that wider models have proportionally smaller embeddings.")
    return section


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1], sys.argv[2])))
