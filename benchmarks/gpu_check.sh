#!/usr/bin/env bash
# GPU check (under 12 minutes on one GPU): every method on SmolLM2-135M + math in bf16 on CUDA, the fused
# AdamW path, --optimizer-in-backward and a 4-bit base, printing each run's result and peak CUDA memory.
# Run from the repository root on a machine with a CUDA GPU, after `make install` (a CUDA torch there).
set -euo pipefail
CT=${CT:-.venv/bin/childtune}
OUT=${OUT:-runs/gpu-check}
COMMON=(--task math --model smollm2-135m --train-size 256 --eval-size 100 --epochs 1 --batch-size 8
        --max-length 64 --max-new-tokens 8 --chat-template --device cuda --no-progress --checkpoint-every 0)
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device"
print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)
PY
run() {  # name, then extra options
  local name=$1; shift
  "$CT" train "${COMMON[@]}" "$@" --output "$OUT/$name" --overwrite
  python - "$OUT/$name/metrics.json" "$name" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]:28s} dev exact_match {m['dev']['exact_match']:.3f} loss {m['dev']['loss']:.3f} "
      f"train {m['train_time_s']:.0f}s peak CUDA {m['peak_cuda_mib']} MiB state {m['optimizer_state_bytes']/1e6:.1f} MB")
PY
}
# fp32 weights under autocast, step after backward, dense gradients (a causal LM's selective runs default to
# bf16 weights, the step in backward and child-only gradients: the *-causal-defaults runs below)
for method in full child-f child-d random id3 gradual lora id3-lora; do
  run "$method-bf16autocast" --method "$method" --bf16 --dtype fp32 --no-optimizer-in-backward --no-child-only-grads
done
run child-d-causal-defaults --method child-d
run random-causal-defaults --method random
run lora-bf16-base --method lora --dtype bf16
run child-d-bf16-masters --method child-d --dtype bf16
run random-bf16-masters --method random --dtype bf16
run child-d-in-backward --method child-d --dtype bf16 --optimizer-in-backward
run random-in-backward --method random --optimizer-in-backward
# a 4-bit base (--base-bits 4): bitsandbytes' CUDA dequantisation under the child, and QLoRA on the same base
run child-d-4bit --method child-d --base-bits 4
run child-d-4bit-lean --method child-d --base-bits 4 --dtype bf16 --optimizer-in-backward
run random-4bit --method random --base-bits 4
run qlora-4bit --method lora --base-bits 4 --dtype bf16
"$CT" generate "$OUT/child-d-4bit" --prompt "What is 7 + 5?"  # (the quantized base on the GPU: device auto)
