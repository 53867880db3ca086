"""A quantized base with a sparse fp32 child on top (`--base-bits`, models/quantized.py, childtune/overlay.py),
against a dense reference: the same tiny Llama with each quantized weight replaced by its dequantised dense
form, trained as an ordinary fp32 model with the same child network."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest
import torch
import transformers
from test_causal import child_d_generation_run, write_generation_task
from test_families import write_tiny_llama

from childtune.cli import main
from childtune.data.types import TaskSpec
from childtune.delta import SparseDelta
from childtune.fisher import fisher_information
from childtune.models import quantized
from childtune.optim import SparseChildAdamW
from childtune.optim.child_grad import ChildGrads
from childtune.overlay import OverlayWeight, values_of
from childtune.strategies.given import GivenNetwork
from childtune.training.checkpoint import Checkpointer, load_checkpoint
from childtune.training.config import ConfigError, TrainConfig
from childtune.training.generate import load_generator
from childtune.training.models import load_model

SPEC = TaskSpec("t", "generation", 0, (), "exact_match")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("q") / "llama", tied=True)


def quantized_model(folder: Path, bits: int = 4) -> torch.nn.Module:
    config = TrainConfig(model=str(folder), method="child-d", base_bits=bits, dtype="fp32", device="cpu")
    return load_model(config, SPEC)[1]


def reference(folder: Path, model: torch.nn.Module) -> torch.nn.Module:
    """The unquantized model with each quantized weight set to `model`'s dense form of it."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, weight in quantized.overlays(model).items():
            params[name].copy_(weight.dense())
    return ref


def some_indices(model: torch.nn.Module, share: float = 0.3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, weight in quantized.overlays(model).items():
        k = max(1, int(share * weight.numel()))
        out[name] = torch.randperm(weight.numel(), generator=g)[:k].sort().values
    return out


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(2, 20, (3, 7), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_an_overlay_weight_is_its_base_with_the_child_over_it_and_leavers_keep_their_values():
    base = torch.arange(20, dtype=torch.float32).reshape(4, 5)
    w = OverlayWeight((4, 5), torch.float32, lambda: base.clone())
    assert torch.isnan(w.detach()).all()  # a reader that forgot the overlay sees NaN, not plausible numbers
    with pytest.raises(RuntimeError, match="single memory location"):  # a writer fails: one element, expanded
        w.detach().mul_(0.9)  # (a dense optimizer's arithmetic)
    with pytest.raises(RuntimeError, match="single memory location"):
        w.detach().copy_(base)  # (load_state_dict)
    first, values = torch.tensor([1, 7, 12]), torch.tensor([-1.0, -7.0, -12.0])
    w.overlay(first, values)
    assert w.child_values is values  # held by reference: the optimizer's masters
    second = torch.tensor([7, 15])
    w.overlay(second, torch.tensor([70.0, 150.0]))  # 1 and 12 left the child: they keep their last values
    expected = base.clone().view(-1)
    expected[[1, 7, 12, 15]] = torch.tensor([-1.0, 70.0, -12.0, 150.0])
    assert torch.equal(w.dense().view(-1), expected)
    assert torch.equal(w.at(torch.tensor([0, 1, 7, 15, 19])), expected[[0, 1, 7, 15, 19]])
    index, got = w.changed()
    assert index.tolist() == [1, 7, 12, 15] and torch.equal(got, expected[index])
    w.overlay(torch.tensor([1, 7, 15]), torch.tensor([5.0, 70.0, 150.0]))  # 1 came back: the child's again
    assert w.kept_index.tolist() == [12] and w.dense().view(-1)[1] == 5.0
    with pytest.raises(TypeError, match="delta"):
        copy.deepcopy(w)
    with pytest.raises(TypeError, match="delta"):
        torch.save(w, io.BytesIO())


@pytest.mark.parametrize("bits", [4, 8])
def test_the_quantized_forward_is_the_dense_forward_of_the_dequantised_weights(llama, bits):
    model = quantized_model(llama, bits)
    layers = [m for m in model.modules() if isinstance(m, quantized.QuantizedLinear)]
    assert len(layers) == 14 and {m.bits for m in layers} == {bits}  # 7 Linear layers per block, 2 blocks
    assert not isinstance(model.lm_head, quantized.QuantizedLinear)  # tied to the embeddings: full precision
    ref = reference(llama, model)
    unquantized = transformers.AutoModelForCausalLM.from_pretrained(llama)
    with torch.no_grad():
        error = max(float((quantized.overlays(model)[n].dense() - p).norm() / p.norm())
                    for n, p in unquantized.named_parameters() if n in quantized.overlays(model))
    # NF4 / int8 round trips (bitsandbytes' NF4 on CPU errs 0.2-0.3 on these 256-element tensors, 0.09 on a
    # 1536 x 576 one)
    assert 0 < error < (0.4 if bits == 4 else 0.02)
    with torch.no_grad():
        assert torch.equal(model(**batch()).logits, ref(**batch()).logits)


def test_child_gradients_on_a_quantized_base_are_the_dense_gradients_at_the_child(llama):
    model, index = quantized_model(llama), None
    ref = reference(llama, model)
    index = some_indices(model)
    ref(**batch()).loss.backward()
    wanted = {n: p.grad for n, p in ref.named_parameters() if n in index}
    model(**batch()).loss.backward()  # without child-only gradients: dense .grad of the weight's shape
    for name, weight in quantized.overlays(model).items():
        torch.testing.assert_close(weight.grad, wanted[name], rtol=1e-5, atol=1e-7)
        weight.grad = None
    grads = ChildGrads(model, index)
    model(**batch()).loss.backward()
    for name, weight in quantized.overlays(model).items():
        assert weight.grad is None  # no dense dW was formed
        torch.testing.assert_close(grads.grad(name), wanted[name].view(-1)[index[name]], rtol=1e-5, atol=1e-7)
    grads.remove()
    assert all(w.site is None for w in quantized.overlays(model).values())


@pytest.mark.parametrize("in_backward", [False, True])
def test_sparse_adamw_on_a_quantized_base_matches_the_dense_reference_step_by_step(llama, in_backward):
    model = quantized_model(llama)
    ref = reference(llama, model)
    index = some_indices(model)
    optimizers = []
    for m in (model, ref):
        for name, p in m.named_parameters():
            p.requires_grad_(name in index)
        named = [(n, p) for n, p in m.named_parameters() if n in index]
        optimizers.append(SparseChildAdamW(named, GivenNetwork(given=index), lr=1e-2, weight_decay=0.1,
                                           in_backward=in_backward and m is model))
    grads = optimizers[0].child_only_grads(model)
    assert set(grads.sites) == set(index)  # every quantized weight's gradient at its child only
    for step in range(3):
        for m, opt in zip((model, ref), optimizers, strict=True):
            m(**batch(step)).loss.backward()
            opt.step()
            opt.zero_grad()
    params = dict(ref.named_parameters())
    for name, weight in quantized.overlays(model).items():
        torch.testing.assert_close(weight.dense(), params[name].detach(), rtol=1e-5, atol=1e-6)
        assert weight.child_values is optimizers[0].state[weight]["master"]  # the update wrote the forward's values
    with torch.no_grad():
        torch.testing.assert_close(model(**batch(9)).logits, ref(**batch(9)).logits, rtol=1e-4, atol=1e-5)


def test_fisher_on_a_quantized_base_is_the_dequantised_models(llama):
    model = quantized_model(llama)
    ref = reference(llama, model)
    names = list(quantized.overlays(model))
    got = fisher_information(model, [batch(0), batch(1)], scored=names, progress=False)
    wanted = fisher_information(ref, [batch(0), batch(1)], scored=names, progress=False)
    for name in names:
        torch.testing.assert_close(got[name], wanted[name], rtol=1e-4, atol=1e-12)


@pytest.fixture(scope="module")
def run(llama, tmp_path_factory) -> tuple[Path, Path]:
    """A child-d run on a 4-bit base from the CLI: (run folder, dev file)."""
    return child_d_generation_run(llama, tmp_path_factory.mktemp("qrun"), "--base-bits", "4")


def test_a_quantized_run_learns_and_keeps_a_delta_against_the_unquantized_base(llama, run):
    out, dev = run
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["base_bits"] == 4 and config["child_only_grads"] is True
    assert metrics["dev"]["exact_match"] >= 0.4, metrics["dev"]  # an untrained model answers none
    assert metrics["changed_outside_child"] == 0 and 0 < metrics["changed_params"] <= metrics["child_params"]
    delta = SparseDelta.load(out / "delta")
    # the delta applies to the unquantized base (its fingerprint is that model's), as a QLoRA adapter merges
    base = transformers.AutoModelForCausalLM.from_pretrained(llama)
    before = {n: t.clone() for n, t in base.state_dict().items()}
    delta.apply(base)
    # and on the quantized base, `generate`'s way, it restores the trained values exactly: the run's answers
    collate, model, generating = load_generator(str(out), TrainConfig(max_new_tokens=3, progress=False,
                                                                       device="cpu"))
    weights = quantized.overlays(model)
    merged = base.state_dict()
    assert set(delta.entries) & set(weights)  # (and the blocks' norms, in full precision)
    for name in set(delta.entries) & set(weights):
        entry = delta.entries[name]
        index, values = weights[name].changed()
        assert torch.equal(index, entry.indices)
        assert torch.equal(merged[name].view(-1)[index], values.to(merged[name].dtype))
        untouched = torch.ones(merged[name].numel(), dtype=torch.bool)
        untouched[index] = False
        assert torch.equal(merged[name].view(-1)[untouched], before[name].view(-1)[untouched])
    from childtune.data.metrics import exact_match
    from childtune.training.evaluate import generate_answers

    examples = [(r["prompt"], r["target"]) for r in map(json.loads, dev.read_text().splitlines())]
    answers = generate_answers(model, [p for p, _ in examples], collate, generating, "again")
    assert exact_match(answers, [t for _, t in examples])["exact_match"] == metrics["dev"]["exact_match"]


def test_qlora_runs_on_the_same_quantized_base_and_keeps_its_adapter(tmp_path, capsys):
    folder = tmp_path / "llama64"
    write_tiny_llama(tmp_path / "small", tied=True)  # its tokenizer; a model wide enough for bitsandbytes' kernels
    transformers.AutoTokenizer.from_pretrained(tmp_path / "small").save_pretrained(folder)
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    train, dev = write_generation_task(tmp_path, n_train=16, n_dev=4)
    out = tmp_path / "qlora"
    assert main(["train", "--model", str(folder), "--train", str(train), "--dev", str(dev), "--kind", "generation",
                 "--method", "lora", "--epochs", "1", "--batch-size", "8", "--max-new-tokens", "2", "--no-progress",
                 "--checkpoint-every", "0", "--base-bits", "4", "--output", str(out)]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not (out / "model").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["changed_params"] is None  # its adapter is apart from the base: nothing was compared
    assert f"trained {metrics['trainable_params']:,} adapter weights over the 4-bit base" in capsys.readouterr().out
    assert main(["generate", str(out), "--prompt", "very the good very not", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.strip()  # the quantized base with the adapter over it answers


@pytest.mark.parametrize(("settings", "words"), [
    ({"method": "full"}, "cannot be updated in place"),
    ({"method": "child-f"}, "cannot be updated in place"),
    ({"method": "child-d", "strict": False}, "cannot be updated in place"),
    ({"method": "child-d", "base_bits": 3}, "base_bits must be 4 or 8"),
    ({"method": "child-d", "save": "model"}, "childtune apply"),
    ({"method": "child-d", "fisher_per_example": True}, "per-example Fisher"),
    ({"method": "child-d", "optimizer": "authors"}, "authors' dense AdamW"),
    ({"method": "child-d", "task": "fashion-mnist", "model": "easyocr-crnn"}, "not an image model"),
    ({"method": "child-d", "tasks": "mr,spam"}, "one process and one task"),
])
def test_what_a_quantized_base_cannot_do_is_refused_in_one_line(settings, words):
    config = TrainConfig(**{"task": "mr", "base_bits": 4, **settings})
    with pytest.raises(ConfigError, match=words):
        config.resolved()
    with pytest.raises(ConfigError, match="one process"):
        TrainConfig(task="mr", method="child-d", base_bits=4).resolved(processes=2)


class Weights:
    """Keeps a finished run's weights (an overlay weight's dense form) and metrics."""

    def on_start(self, state) -> None: ...

    def on_step(self, state) -> None: ...

    def on_end(self, state, metrics) -> None:
        self.weights = {n: values_of(p).detach().clone() for n, p in state.model.named_parameters()}
        self.metrics = metrics


@pytest.mark.parametrize("method", ["child-dyn", "id3"])
def test_a_quantized_run_resumes_bit_identical(llama, tmp_path, method):
    """The checkpoint holds each overlay weight's own elements (the child's and a moving network's leavers),
    not its base; the resumed run ends on the same weights and scores as the uninterrupted one."""
    from test_resume import Crash, CrashAt

    from childtune.training.loop import train

    train_file, dev_file = write_generation_task(tmp_path, n_train=40, n_dev=6)
    config = TrainConfig(model=str(llama), train_file=str(train_file), dev_file=str(dev_file), kind="generation",
                         method=method, base_bits=4, batch_size=8, epochs=2, lr=1e-2, reserve_p=0.3, id3_budget=0.2,
                         dyn_every=3, dyn_window=2, max_new_tokens=2, progress=False, device="cpu")
    whole = Weights()
    train(config, [whole])
    assert whole.metrics["steps"] == 10
    folder = tmp_path / "ck"
    with pytest.raises(Crash):
        train(config, [Checkpointer(1, directory=folder), CrashAt(5)])
    saved = load_checkpoint(folder)["model"]
    assert not any(torch.isnan(t).any() for t in saved.values())  # no stand-in was saved
    resumed = Weights()
    train(config, [Checkpointer(2, resume=True, directory=folder), resumed])
    assert resumed.weights.keys() == whole.weights.keys()
    for name, tensor in whole.weights.items():
        assert torch.equal(resumed.weights[name], tensor), name
    assert resumed.metrics["dev"] == whole.metrics["dev"]


def test_a_text_classifier_trains_on_a_4bit_base_with_its_head_in_full_precision(tmp_path):
    from test_resume import write_task, write_tiny_model

    folder = write_tiny_model(tmp_path / "bert", dropout=0.0)
    train_file, dev_file = write_task(tmp_path, n_train=40, n_dev=10)
    config = TrainConfig(model=str(folder), train_file=str(train_file), dev_file=str(dev_file), method="child-d",
                         base_bits=4, reserve_p=0.3, device="cpu")
    model = load_model(config, TaskSpec("t", "classification", 2, ("0", "1"), "accuracy"))[1]
    quantized_names = set(quantized.overlays(model))
    assert quantized_names and not any("classifier" in n for n in quantized_names)  # the new head trains whole
    out = tmp_path / "run"
    assert main(["train", "--model", str(folder), "--train", str(train_file), "--dev", str(dev_file),
                 "--method", "child-d", "--reserve-p", "0.3", "--lr", "5e-3", "--epochs", "2", "--batch-size", "8",
                 "--no-progress", "--checkpoint-every", "0", "--base-bits", "4", "--output", str(out)]) == 0
    delta = SparseDelta.load(out / "delta")
    assert set(delta.entries) & quantized_names and any("classifier" in n for n in delta.dense)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    delta.apply(base)  # the unquantized classifier is the delta's base (its fingerprint is checked)


def test_bitsandbytes_is_imported_without_the_hub_and_the_environment_is_restored(monkeypatch):
    import os

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with quantized.offline_bitsandbytes():
        assert os.environ["HF_HUB_OFFLINE"] == "1"  # bitsandbytes' CPU backend asks the hub for a kernel otherwise
    assert "HF_HUB_OFFLINE" not in os.environ
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with quantized.offline_bitsandbytes():
        assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ["HF_HUB_OFFLINE"] == "0"
