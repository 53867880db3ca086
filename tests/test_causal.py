"""Causal LMs and generative tasks: the loss covers target tokens only, prompts are cut from the left,
Fisher scores the target's log-likelihood, and a tiny random Llama learns a prompt -> answer task."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
import transformers

from childtune.cli import main
from childtune.data.batching import IGNORE, LMCollate
from childtune.data.metrics import exact_match, normalise_answer
from childtune.data.userfiles import load_files
from childtune.fisher import fisher_information
from childtune.training.config import TrainConfig
from childtune.training.evaluate import generate_answers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_families import write_tiny_llama
from test_resume import FILLER, NEGATIVE, POSITIVE


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("llama") / "model")


def collate_for(llama: Path, max_length: int = 32) -> LMCollate:
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama)
    tokenizer.pad_token = tokenizer.eos_token
    return LMCollate(tokenizer, max_length)


def test_labels_cover_the_target_and_eos_only(llama):
    collate = collate_for(llama)
    tok = collate.tokenizer
    batch = collate([("the film was", "good"), ("a movie", "very bad")])
    for row, (prompt, target) in enumerate([("the film was", "good"), ("a movie", "very bad")]):
        p = tok(prompt)["input_ids"]
        t = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = len(p) + len(t)
        assert batch["input_ids"][row, :n].tolist() == p + t
        assert batch["labels"][row, :n].tolist() == [IGNORE] * len(p) + t
        assert (batch["labels"][row, n:] == IGNORE).all() and (batch["attention_mask"][row, n:] == 0).all()


def test_prompt_positions_carry_no_gradient_and_the_loss_is_the_targets(llama):
    collate = collate_for(llama)
    model = transformers.AutoModelForCausalLM.from_pretrained(llama)
    batch = collate([("the film was very", "good"), ("plot", "bad")])
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["logits"] = output

    model.lm_head.register_forward_hook(keep)
    loss = model(**batch).loss
    loss.backward()
    grad = captured["logits"].grad
    predicts_target = batch["labels"][:, 1:] != IGNORE  # logits at t predict the token at t + 1
    assert (grad[:, :-1][~predicts_target] == 0).all() and (grad[:, -1] == 0).all()
    assert grad[:, :-1][predicts_target].abs().sum() > 0
    logp = torch.log_softmax(captured["logits"][:, :-1].detach().float(), -1)
    targets = batch["labels"][:, 1:]
    manual = -logp.gather(2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)[predicts_target].mean()
    torch.testing.assert_close(loss.detach(), manual, rtol=1e-5, atol=1e-6)


def test_a_long_prompt_loses_its_beginning_never_the_target(llama):
    collate = collate_for(llama, max_length=8)
    prompt = " ".join(FILLER + FILLER)
    batch = collate([(prompt, "good")])
    tok = collate.tokenizer
    assert batch["input_ids"].shape[1] == 8 and collate.truncated == 1
    assert batch["input_ids"][0, -2:].tolist() == [tok.convert_tokens_to_ids("good"), tok.eos_token_id]
    kept = tok(prompt)["input_ids"][-6:]
    assert batch["input_ids"][0, :6].tolist() == kept  # the prompt's end survives
    with pytest.raises(ValueError, match="does not fit"):
        collate([("the", " ".join(["good"] * 10))])
    gen = collate.for_generation(["good", "the film was"])
    assert gen["attention_mask"][0].tolist()[0] == 0  # padded on the left
    assert gen["input_ids"].shape[1] == len(tok("the film was")["input_ids"])


def test_exact_match_normalises_answers():
    assert normalise_answer("  Paris. ") == "paris"
    assert exact_match(["The capital is Paris.", " 42", "-7"], ["the capital is paris", "42", "7"]) == {
        "exact_match": 2 / 3}


def test_causal_fisher_is_the_target_log_likelihood_per_example(llama, way):
    collate = collate_for(llama)
    model = transformers.AutoModelForCausalLM.from_pretrained(llama)
    data = [("the film was", "good"), ("a very dull plot", "bad"), ("movie", "fun")]
    batch = collate(data)
    scored = [n for n, _ in model.named_parameters() if ".layers.1." in n]
    # vectorised (the `way` fixture refuses a fallback): by layer, or vmap with a causal 4D mask built inside
    got = fisher_information(model, [batch], scored=scored, per_example=True, progress=False)
    params = dict(model.named_parameters())
    expected = {n: torch.zeros_like(params[n]) for n in scored}
    for example in data:
        one = collate([example])
        out = model(**one)
        # log p(target | prompt): the model's mean token loss times the number of target tokens
        n_target = int((one["labels"][:, 1:] != IGNORE).sum())
        grads = torch.autograd.grad(out.loss * n_target, [params[n] for n in scored])
        for n, g in zip(scored, grads, strict=True):
            expected[n] += g ** 2 / len(data)
    for n in scored:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-10)


def write_generation_task(folder: Path, n_train: int = 120, n_dev: int = 20) -> tuple[Path, Path]:
    """Prompt: a few filler words and one sentiment word; target: 'good' or 'bad' by its polarity."""
    rng = random.Random(0)

    def rows(n: int) -> str:
        lines = []
        for i in range(n):
            word = rng.choice(POSITIVE if i % 2 else NEGATIVE)
            prompt = " ".join([*rng.sample(FILLER, 2), word, *rng.sample(FILLER, 2)])
            lines.append(json.dumps({"prompt": prompt, "target": "good" if i % 2 else "bad"}))
        return "\n".join(lines) + "\n"

    train, dev = folder / "train.jsonl", folder / "dev.jsonl"
    train.write_text(rows(n_train))
    dev.write_text(rows(n_dev))
    return train, dev


def test_user_generation_files_are_checked(tmp_path):
    good = tmp_path / "g.jsonl"
    good.write_text('{"q": "2+2", "a": 4}\n{"q": "3+3", "a": "6"}\n')
    task = load_files(good, good, kind="generation", prompt_col="q", target_col="a")
    assert task.spec.kind == "generation" and task.train == [("2+2", "4"), ("3+3", "6")]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"prompt": "2+2", "target": ""}\n')
    with pytest.raises(ValueError, match="line 1: target must be a non-empty text"):
        load_files(bad, bad, kind="generation")


@pytest.mark.parametrize("method", ["full", "child-d", "id3"])
def test_a_tiny_llama_learns_a_generation_task(llama, tmp_path, method):
    train, dev = write_generation_task(tmp_path)
    out = tmp_path / method
    common = ["--model", str(llama), "--train", str(train), "--dev", str(dev), "--kind", "generation",
              "--batch-size", "8", "--eval-batch-size", "20", "--max-new-tokens", "3", "--no-progress",
              "--checkpoint-every", "0"]
    extra = {"full": ["--lr", "3e-3"], "child-d": ["--lr", "1e-2", "--reserve-p", "0.5"],
             "id3": ["--lr", "2e-2", "--id3-budget", "0.3"]}[method]
    assert main(["train", *common, "--method", method, "--epochs", "6", *extra, "--output", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kind"] == "generation" and metrics["primary_metric"] == "exact_match"
    assert metrics["dev"]["exact_match"] >= 0.8, metrics["dev"]  # an untrained model answers neither
    collate = collate_for(llama)
    untuned = transformers.AutoModelForCausalLM.from_pretrained(llama).eval()
    examples = [(r["prompt"], r["target"]) for r in map(json.loads, dev.read_text().splitlines())]
    with torch.no_grad():
        before = float(untuned(**collate(examples)).loss)
    answers = generate_answers(untuned, [p for p, _ in examples], collate, TrainConfig(max_new_tokens=3,
                                                                                      progress=False))
    assert exact_match(answers, [t for _, t in examples])["exact_match"] <= 0.2  # untuned: no answer right
    assert metrics["dev"]["loss"] < before - 0.1, (metrics["dev"]["loss"], before)
    assert metrics["truncated_prompts"] == 0


SHIPPED_DECODING = {"repetition_penalty": 1.3, "no_repeat_ngram_size": 1, "min_new_tokens": 3}
"""Decoding defaults a model folder may ship in generation_config.json, which `generate` applies even to
greedy decoding: with them the answer "good" (one word, then EOS) could never be produced."""


@pytest.fixture(scope="module")
def tied_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A finished child-d generation run on a tiny tied Llama whose folder ships `SHIPPED_DECODING`:
    (model folder, dev file, run folder)."""
    root = tmp_path_factory.mktemp("tied")
    llama = write_tiny_llama(root / "tied", tied=True)  # embeddings and LM head one tensor, as SmolLM2's
    transformers.GenerationConfig(**SHIPPED_DECODING).save_pretrained(llama)
    # fp32 weights (a causal LM's default is bf16): the tests below recompute its answers one prompt at a time
    # and compare base + delta bit for bit with models read as transformers reads them (fp32)
    run, dev = child_d_generation_run(llama, root, "--dtype", "fp32")
    return llama, dev, run


def child_d_generation_run(llama: Path, root: Path, *options: str) -> tuple[Path, Path]:
    """child-d at p 0.5 trained from the CLI on `write_generation_task` under `root`: (run folder, dev file)."""
    train, dev = write_generation_task(root)
    run = root / "run"
    assert main(["train", "--model", str(llama), "--train", str(train), "--dev", str(dev), "--kind", "generation",
                 "--method", "child-d", "--reserve-p", "0.5", "--lr", "1e-2", "--epochs", "6", "--batch-size", "8",
                 "--max-new-tokens", "3", "--no-progress", "--checkpoint-every", "0", *options,
                 "--output", str(run)]) == 0
    return run, dev


def greedy_by_hand(model, prompts, collate: LMCollate, max_new_tokens: int) -> list[str]:
    """Each prompt decoded alone, without `generate`, padding or a cache: the argmax of the last position's
    logits appended until EOS or `max_new_tokens`, the prompt cut as `LMCollate.for_generation` cuts it."""
    tok, answers = collate.tokenizer, []
    with torch.no_grad():
        for prompt in prompts:
            ids, new = collate.prompt_ids(prompt)[-(collate.max_length - 1):], []
            for _ in range(max_new_tokens):
                token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
                if token == tok.eos_token_id:
                    break
                new.append(token)
            answers.append(tok.decode(new, skip_special_tokens=True))
    return answers


def test_the_stored_exact_match_is_the_models_own_greedy_answers(tied_run):
    """metrics.json's dev exact match, recomputed from the trained model's greedy answers decoded one by
    one (the model rebuilt as base + delta), whatever decoding defaults its folder ships."""
    from childtune.delta import SparseDelta

    llama, dev, run = tied_run
    model = transformers.AutoModelForCausalLM.from_pretrained(llama).eval()
    SparseDelta.load(run / "delta").apply(model)
    examples = [(r["prompt"], r["target"]) for r in map(json.loads, dev.read_text().splitlines())]
    answers = greedy_by_hand(model, [p for p, _ in examples], collate_for(llama, 128), max_new_tokens=3)
    recomputed = exact_match(answers, [t for _, t in examples])["exact_match"]
    assert json.loads((run / "metrics.json").read_text())["dev"]["exact_match"] == recomputed > 0


def test_batched_left_padded_greedy_decoding_equals_one_prompt_at_a_time(llama):
    """Prompts of different lengths share a batch padded on the left; each answer must be the one the
    prompt gets decoded alone (`generate` one at a time, and by hand)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(llama).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights large enough that the answers vary from token to token
        for param in model.parameters():
            param.copy_(0.5 * torch.randn(param.shape, generator=g))
    collate = collate_for(llama)
    prompts = ["good", "the film was very", "a", "plot was not fun and the movie is", "dull silly", "moving smart fine"]
    alone = greedy_by_hand(model, prompts, collate, max_new_tokens=6)
    assert len({len(collate.prompt_ids(p)) for p in prompts}) == 5 and len(set(alone)) == len(prompts)
    for batch_size in (len(prompts), 4, 1):
        config = TrainConfig(max_new_tokens=6, eval_batch_size=batch_size, progress=False)
        assert generate_answers(model, prompts, collate, config) == alone, batch_size


def test_a_frozen_lm_head_is_handed_contiguous_inputs_while_decoding(llama):
    """`generate` gives the head a strided view of the last position; a frozen head would multiply it by its
    weight expanded over the batch (2.2 GB on SmolLM2), so decoding hands it a contiguous copy, and only then."""
    model = transformers.AutoModelForCausalLM.from_pretrained(llama).eval().requires_grad_(False)
    head, seen = model.get_output_embeddings(), []
    head.register_forward_hook(lambda module, args, out: seen.append(args[0].is_contiguous()))
    collate = collate_for(llama)
    prompts = ["good", "the film was very", "a dull plot"]
    config = TrainConfig(max_new_tokens=3, eval_batch_size=3, progress=False)
    generate_answers(model, prompts, collate, config)
    assert seen and all(seen)
    assert len(head._forward_pre_hooks) == 0  # removed after decoding
    seen.clear()
    batch = collate.for_generation(prompts)
    model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=collate.tokenizer.pad_token_id)
    assert not all(seen)  # without it, transformers hands the head the strided view this guards against

def test_generation_runs_export_apply_and_generate(tmp_path, capsys, tied_run):
    llama, dev, run = tied_run
    assert (run / "delta").is_dir() and (run / "masks.safetensors").is_file()
    # the delta round trip: base + delta is the tuned causal LM, tied embedding/LM head and all, bit for bit
    assert main(["apply", str(run), "--output", str(tmp_path / "applied")]) == 0
    applied = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "applied")
    assert applied.lm_head.weight.data_ptr() == applied.model.embed_tokens.weight.data_ptr()  # still tied
    base = transformers.AutoModelForCausalLM.from_pretrained(llama)
    from childtune.delta import SparseDelta

    delta = SparseDelta.load(run / "delta")
    delta.apply(base)
    for (name, a), (_, b) in zip(applied.state_dict().items(), base.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    capsys.readouterr()
    prompts = [r["prompt"] for r in map(json.loads, dev.read_text().splitlines())][:6]
    targets = [r["target"] for r in map(json.loads, dev.read_text().splitlines())][:6]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in prompts) + "\n")
    assert main(["generate", str(run), "--input", str(tmp_path / "prompts.jsonl"), "--max-new-tokens", "3",
                 "--output", str(tmp_path / "out.jsonl")]) == 0
    completions = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [c["prompt"] for c in completions] == prompts
    metrics = json.loads((run / "metrics.json").read_text())
    score = exact_match([c["completion"] for c in completions], targets)["exact_match"]
    assert score > 0 and metrics["dev"]["exact_match"] > 0  # it learned something, and generate shows it
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "applied"), "--prompt", prompts[0], "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip() == completions[0]["completion"].strip()  # the applied model agrees
    code = main(["generate", str(llama / "missing")])
    assert code == 2


def test_id3_lora_ends_with_exactly_its_budget_of_changed_adapter_elements(llama, tmp_path):
    from peft import LoraConfig, TaskType, get_peft_model

    from childtune import ID3
    from childtune.optim import SparseChildAdamW

    model = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(llama),
                           LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, lora_dropout=0.0))
    adapter = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert adapter and all("lora_" in n for n in adapter)  # peft froze the base: only adapters train
    before = {n: p.detach().clone() for n, p in adapter.items()}
    steps, budget = 6, 0.1
    strategy = ID3(budget, steps)
    opt = SparseChildAdamW(adapter, strategy, lr=1e-2, weight_decay=0.0)
    collate = collate_for(llama)
    train, _ = write_generation_task(tmp_path, n_train=steps * 4)
    rows = [(r["prompt"], r["target"]) for r in map(json.loads, train.read_text().splitlines())]
    for step in range(steps):
        model(**collate(rows[4 * step: 4 * step + 4])).loss.backward()
        opt.step()
        opt.zero_grad()
    total = sum(p.numel() for p in adapter.values())
    changed = sum(int((p.detach() != before[n]).sum()) for n, p in adapter.items())
    assert changed == round(budget * total) == sum(len(i) for i in strategy.chosen.values())


def test_tied_weights_are_counted_once(tmp_path):
    from childtune.training.evaluate import count_elements

    llama = write_tiny_llama(tmp_path / "tied", tied=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(llama)
    pretrained = {n: t.detach().clone() for n, t in model.state_dict().items()}
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1.0)  # the LM head is the same tensor
    counts = count_elements(pretrained, model, dict(model.named_parameters()), None)
    assert counts["changed_params"] == model.model.embed_tokens.weight.numel() <= counts["total_params"]


def test_evaluate_scores_a_finished_run_as_it_ships(tied_run, capsys):
    _, _, run = tied_run
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--no-progress", "--json"]) == 0
    (scored,) = json.loads(capsys.readouterr().out).values()
    recorded = json.loads((run / "metrics.json").read_text())
    assert scored["dev"] == recorded["dev"]  # base + delta answers as the run did at its end
    assert main(["evaluate", "--run", str(run.parent), "--no-progress"]) == 2  # not a run folder: one line
    assert "is not a finished run folder" in capsys.readouterr().err
