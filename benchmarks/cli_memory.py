"""Peak memory of the whole `childtune train` process, per method, as a user runs it on a causal LM.

`bench.py --only-cli-memory` runs this: a randomly initialised 185.6M-parameter Llama (SmolLM2's tokenizer
and vocabulary, 12 blocks of width 1024, saved in fp32 as most checkpoints are) is written to a folder once;
then each method runs `childtune train` on it in its own process, at its causal-LM defaults, on the
built-in math task (24 training questions, batch 8, 3 updates, 8 dev and test questions). Reported: the
run's `peak_rss_mib` (the largest of its phases' VmHWM, loading and evaluation included) and its largest
phase, from its metrics.json, and the optimizer state it kept.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from timing import Row, Section

COMMON = ["--task", "math", "--train-size", "24", "--batch-size", "8", "--epochs", "1", "--eval-size", "8",
          "--max-length", "64", "--max-new-tokens", "4", "--no-progress", "--checkpoint-every", "0"]
RUNS = {  # label: childtune train options beyond COMMON
    "LoRA r=8 on a bf16 base": ["--method", "lora", "--dtype", "bf16"],
    "child-d at its default (p 0.05, fp32, step after backward, child-only)": ["--method", "child-d"],
    "child-d, lean (p 0.05, bf16, in backward, child-only)": ["--method", "child-d", "--dtype", "bf16",
                                                              "--optimizer-in-backward"],
    "random at its default (p 0.01, lean)": ["--method", "random"],
    "id3 at its default (bf16, in backward, dense gradients)": ["--method", "id3"],
    "id3 growing every 10 steps (lean, child-only between)": ["--method", "id3", "--id3-every", "10"],
    "full fine-tuning (fp32)": ["--method", "full"],
    "QLoRA r=8 on a 4-bit base": ["--method", "lora", "--dtype", "bf16", "--base-bits", "4"],
    "child-d at its default on a 4-bit base (p 0.05, fp32 compute)": ["--method", "child-d", "--base-bits", "4"],
    "child-d, lean, on a 4-bit base (p 0.05, bf16, in backward)": ["--method", "child-d", "--dtype", "bf16",
                                                                  "--optimizer-in-backward", "--base-bits", "4"],
    "child-d p=0.01, lean, on a 4-bit base (Fisher in 4 passes)": [
        "--method", "child-d", "--dtype", "bf16", "--optimizer-in-backward", "--reserve-p", "0.01",
        "--fisher-passes", "4", "--base-bits", "4"],
    "random at its default on a 4-bit base (p 0.01, lean)": ["--method", "random", "--base-bits", "4"],
}
TARGETS = ("child-d at its default", "id3 at its default")
QUANTIZED = "QLoRA r=8 on a 4-bit base"
"""The rows on a 4-bit base (`--base-bits 4`) are compared with QLoRA, the others with LoRA on a bf16 base; on a 4-bit
base the target is QLoRA's peak (issue 32), for child-d at its default and lean."""


def write_model(folder: Path) -> int:
    """The random 185.6M Llama with SmolLM2's tokenizer, in fp32; its parameter count."""
    import torch
    import transformers

    from childtune.training.models import model_folder

    source = model_folder("smollm2-135m")
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=True)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=2816,
                                      num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
                                      tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def cli_memory_section() -> Section:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH")]))}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        params = write_model(model)
        for label, options in RUNS.items():
            out = Path(tmp) / f"run{len(results)}"
            command = [sys.executable, "-m", "childtune.cli", "train", "--model", str(model), *COMMON, *options,
                       "--output", str(out)]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if done.returncode:
                raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
            metrics = json.loads((out / "metrics.json").read_text())
            results[label] = metrics
            print(f"cli memory | {label}: {metrics['peak_rss_mib']} MiB", file=sys.stderr, flush=True)
    lora, qlora = results["LoRA r=8 on a bf16 base"]["peak_rss_mib"], results[QUANTIZED]["peak_rss_mib"]
    section = Section(
        "Whole `childtune train` process on a causal LM (loading and evaluation included)",
        f"A randomly initialised {params / 1e6:.1f}M-parameter Llama (SmolLM2's tokenizer, 12 blocks of width 1024, "
        "saved in fp32), `childtune train " + " ".join(COMMON) + "` plus each row's options, each run its own "
        "process (benchmarks/cli_memory.py). Peak: metrics.json's `peak_rss_mib`, the largest VmHWM of the run's "
        "phases (data, model load, base copy, setup, Fisher, training, evaluation, counting, saving); "
        "`/usr/bin/time -v` would under-report it, since the mark is reset between phases. 'vs LoRA': to LoRA "
        "r=8 on the bf16 base for the full-precision rows, to QLoRA (LoRA r=8 on the same 4-bit base) for the "
        "rows with `--base-bits 4`.",
        ["run", "options", "peak MiB", "largest phase", "vs LoRA", "optimizer state MiB", "target"])
    for label, options in RUNS.items():
        m = results[label]
        phases = m["peak_rss_mib_by_phase"]
        largest = max(phases, key=phases.get)
        base, name = (qlora, "QLoRA's") if "--base-bits" in options else (lora, "LoRA's")
        target = f"peak <= {name}" if label.startswith(TARGETS) else ""
        verdict = ("PASS" if m["peak_rss_mib"] <= base else "MISS") if target else ""
        section.rows.append(Row(label, [f"`{' '.join(options)}`", f"{m['peak_rss_mib']:,.0f}", largest,
                                        f"{m['peak_rss_mib'] / base:.2f}",
                                        f"{m['optimizer_state_bytes'] / 2**20:,.1f}", target], verdict))
    return section
