"""Peak resident memory of Child-Tuning_D's choice (Fisher pass and top-p cut) against a training step's floor.

Each measurement runs in a fresh process on a randomly initialised Llama of one of `memory.py`'s shapes:
the weights alone (resident now), then a new peak window (VmHWM reset) around `ChildTuningD(...).prepare`
on a few batches, or around the floor of any training step (forward and backward of the same batches,
each gradient freed as it arrives). Run from the repository root:

    .venv/bin/python benchmarks/fisher_memory.py --dtype bf16 --p 0.3 --clip 1.0 --passes 1 2 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from memory import SIZES, _release

BATCHES, BATCH, LENGTH, VOCAB = 3, 2, 128, 49152


def measure(what: str, passes: int | None, args: argparse.Namespace) -> dict:
    """One measurement in this process: MiB resident after building the model, and the phase's peak."""
    import torch
    import transformers

    from childtune import ChildOptimizer, ChildTuningD
    from childtune.training.evaluate import peak_rss_mib, reset_peak_rss

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=True, max_position_embeddings=LENGTH,
                                      **SIZES[args.size])
    model = transformers.LlamaForCausalLM(config).to({"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype])
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(BATCHES):
        ids = torch.randint(100, VOCAB, (BATCH, LENGTH), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    strategy = ChildTuningD(args.p, per_example=args.per_example, clip=args.clip, rest="freeze",
                            **({} if passes is None else {"passes": passes}))
    ChildOptimizer(model.named_parameters(), strategy)
    _release()
    weights = _resident_mib()
    reset_peak_rss()
    if what == "fisher":
        strategy.prepare(model, batches, progress=False)
    else:  # the floor of a training step: every gradient freed as soon as backward has it
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None))
        for batch in batches:
            model(**batch).loss.backward()
    return {"weights_mib": weights, "peak_mib": peak_rss_mib(),
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}


def _resident_mib() -> float:
    """Resident memory now (VmRSS), in MiB: the weights and the framework, before the phase's window opens."""
    with open("/proc/self/status") as status:
        return next(round(int(line.split()[1]) / 1024, 1) for line in status if line.startswith("VmRSS:"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default=next(iter(SIZES)))
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--p", type=float, default=0.01, help="the child network's share (memory.py's is 0.01)")
    parser.add_argument("--per-example", action="store_true")
    parser.add_argument("--clip", type=float, default=None)
    parser.add_argument("--passes", type=int, nargs="*", default=None, help="Fisher passes to measure (default: "
                        "the library's default only)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        passes = None if args.child[1] == "default" else int(args.child[1])
        print(json.dumps(measure(args.child[0], passes, args)))
        return
    common = ["--size", args.size, "--dtype", args.dtype, "--p", str(args.p),
              *(["--per-example"] if args.per_example else []),
              *([] if args.clip is None else ["--clip", str(args.clip)])]
    for what, passes in [("floor", "default"), *[("fisher", str(n)) for n in args.passes or ["default"]]]:
        done = subprocess.run([sys.executable, __file__, *common, "--child", what, passes], capture_output=True,
                              text=True, check=True)
        print(what, f"passes={passes}", done.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
