"""The vision-language model built from pretrained parts (`childtune.models.vlm`), on tiny random parts: a
random CRNN and a 2-block Llama. The image reaches the answer through the connector; generation is plain
greedy decoding; the base is the same at every assembly; child networks stay in the parts they are given,
jointly or with a budget per part; the CLI trains it end to end and keeps a delta of the changed parts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_families import write_tiny_llama
from test_vision import write_folder

from childtune import ChildTuningD
from childtune.cli import main
from childtune.data.images import as_answers
from childtune.data.types import DataError, Image, TaskData, TaskSpec
from childtune.delta import SparseDelta
from childtune.models import vlm
from childtune.models.crnn import CRNN
from childtune.optim import SparseChildAdamW
from childtune.training.config import ConfigError
from childtune.training.params import restrict_to_parts

ANSWERS = ("good", "bad")  # words the tiny Llama's tokenizer knows


def write_tiny_vlm(root: Path) -> Path:
    """An assembly folder over a random CRNN folder and a tiny Llama folder, named by their paths."""
    vision = root / "crnn"
    vision.mkdir(parents=True)
    torch.manual_seed(0)
    save_file({f"crnn.{k}": v.contiguous() for k, v in CRNN().state_dict().items()}, vision / "model.safetensors")
    (vision / "config.json").write_text(json.dumps({"model_type": "easyocr-crnn"}))
    language = write_tiny_llama(root / "llama", tied=True)
    folder = root / "vlm"
    vlm.assemble(folder, {"vision": str(vision), "language": str(language)}, vision, language)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_vlm(tmp_path_factory.mktemp("vlm"))


def load(folder: Path) -> tuple[vlm.VLMProcessor, vlm.VisionLanguageModel]:
    parts = json.loads((folder / "config.json").read_text())
    processor, model = vlm.load(folder, Path(parts["vision"]), Path(parts["language"]))
    processor.question = "which is it"
    return processor, model


def squares(n: int) -> list[tuple[Image, str]]:
    """A white square on black, left (good) or right (bad): the answer is in the image alone."""
    out = []
    for i in range(n):
        pixels = bytearray(16 * 16)
        left = i % 2 == 0
        for r in range(4, 12):
            for c in range(2, 7) if left else range(9, 14):
                pixels[r * 16 + c] = 255
        out.append((Image(bytes(pixels), 16, 16), ANSWERS[0] if left else ANSWERS[1]))
    return out


def collate_for(processor: vlm.VLMProcessor) -> vlm.VLMCollate:
    from childtune.data.batching import LMCollate

    return vlm.VLMCollate(processor.images, LMCollate(processor.tokenizer, 32), processor.question)


def test_the_image_reaches_the_loss_through_the_connector_and_labels_cover_the_answer_only(tiny):
    processor, model = load(tiny)
    batch = collate_for(processor)(squares(4))
    assert batch["pixel_values"].shape[0] == 4 and batch["labels"].shape == batch["input_ids"].shape
    out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape  # text positions only, aligned with the labels
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["connector.0.weight"].abs().sum() > 0 and grads["connector.2.weight"].abs().sum() > 0
    assert grads["vision.FeatureExtraction.ConvNet.0.weight"].abs().sum() > 0  # through the connector
    # the loss by hand: mean next-token cross-entropy over the answer and EOS positions only
    labels = batch["labels"]
    logp = torch.log_softmax(out.logits[:, :-1].detach(), -1)
    keep = labels[:, 1:] != -100
    want = -logp.gather(2, labels[:, 1:].clamp(min=0)[..., None])[..., 0][keep].mean()
    torch.testing.assert_close(out.loss.detach(), want)
    assert int(keep.sum()) == 4 * 2  # one answer word and EOS per example
    pixels = batch["pixel_values"].clone().requires_grad_(True)
    model(**dict(batch, pixel_values=pixels)).loss.backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0  # the answer's likelihood reads the pixels


def test_generation_is_greedy_decoding_over_the_image_prefix(tiny):
    processor, model = load(tiny)
    model.eval()
    batch = collate_for(processor).for_generation([image for image, _ in squares(3)])
    ids = model.generate(**batch, max_new_tokens=4, do_sample=False, min_new_tokens=4,
                         pad_token_id=processor.tokenizer.pad_token_id, eos_token_id=None)
    prompt = batch["input_ids"]
    assert torch.equal(ids[:, :prompt.shape[1]], prompt)  # returned after the prompt, as a text LM's generate
    tokens = prompt
    for _ in range(4):  # the argmax of the full forward pass, one token at a time
        mask = torch.ones_like(tokens)
        with torch.no_grad():
            logits = model(pixel_values=batch["pixel_values"], input_ids=tokens, attention_mask=mask).logits
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ids, tokens)


def test_every_assembly_is_the_same_base(tiny):
    (_, first), (_, second) = load(tiny), load(tiny)
    torch.manual_seed(123)  # the global seed does not reach the connector's init
    (_, third) = load(tiny)
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]) and torch.equal(value, third.state_dict()[name]), name


def test_the_child_scope_freezes_the_other_parts_but_never_the_connector(tiny):
    _, model = load(tiny)
    frozen = restrict_to_parts(model, "vision")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and all(n.startswith("language.") for n in frozen)
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(("vision.", "connector."))}
    _, model = load(tiny)
    restrict_to_parts(model, "connector")  # connector only: the towers frozen
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"connector"}
    with pytest.raises(ConfigError, match="no part 'audio'"):
        restrict_to_parts(model, "vision,audio")
    with pytest.raises(ConfigError, match="has none"):
        restrict_to_parts(torch.nn.Linear(2, 2), "vision")


@pytest.mark.parametrize("parts", [(), ("language.", "vision.")])
def test_child_d_cuts_jointly_or_per_part(tiny, parts):
    processor, model = load(tiny)
    strategy = ChildTuningD(0.1, parts=parts)
    SparseChildAdamW(model.named_parameters(), strategy, lr=1e-3)
    batches = [collate_for(processor)(squares(4))]
    strategy.prepare(model, batches, progress=False)
    scored = strategy.scored()
    chosen = {n: len(i) for n, i in strategy.chosen.items() if n in scored}
    towers = ("vision.", "language.")
    size = {prefix: sum(scored[n].numel() for n in scored if n.startswith(prefix)) for prefix in towers}
    got = {prefix: sum(k for n, k in chosen.items() if n.startswith(prefix)) for prefix in towers}
    assert not any(n.startswith("connector.") for n in scored)  # the connector trains whole, like a head
    if parts:  # each part its own top 10%
        assert got == {prefix: round(0.1 * size[prefix]) for prefix in size}
    else:  # one top 10% over both: the CRNN's 3.7M weights outnumber the tiny Llama's, and outscore them here
        assert sum(got.values()) == round(0.1 * sum(size.values()))
        assert got != {prefix: round(0.1 * size[prefix]) for prefix in size}


def test_an_image_task_becomes_questions_answered_by_class_name():
    spec = TaskSpec("shapes", "classification", 2, ANSWERS, "accuracy", inputs="image")
    image = squares(1)[0][0]
    task = as_answers(TaskData(spec, [(image, 1)], [(image, 0)]))
    assert task.spec.kind == "generation" and task.spec.metric == "exact_match" and task.spec.inputs == "image"
    assert task.train == [(image, "bad")] and task.dev == [(image, "good")]
    with pytest.raises(DataError, match="answers questions about images"):
        as_answers(TaskData(TaskSpec("t", "classification", 2, ANSWERS, "accuracy"), [("x", 0)], []))


def test_the_cli_trains_the_vision_part_alone_and_keeps_a_delta_of_it(tiny, tmp_path, capsys):
    train = write_folder(tmp_path / "train", {name: 4 for name in ANSWERS}, size=16)
    dev = write_folder(tmp_path / "dev", {name: 2 for name in ANSWERS}, size=16)
    run = tmp_path / "run"
    args = ["train", "--model", str(tiny), "--train", str(train), "--dev", str(dev), "--method", "child-d",
            "--reserve-p", "0.05", "--child-scope", "vision", "--epochs", "1", "--batch-size", "4",
            "--max-new-tokens", "2", "--no-progress"]
    assert main([*args, "--child-budget", "per-part", "--output", str(run)]) == 0, capsys.readouterr().err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["kind"] == "generation" and metrics["primary_metric"] == "exact_match"
    assert metrics["changed_outside_child"] == 0 and metrics["steps"] == 2
    delta = SparseDelta.load(run / "delta")
    names = set(delta.entries) | set(delta.dense)
    assert names and all(n.startswith(("vision.", "connector.")) for n in names), names
    assert any(n.startswith("connector.") for n in delta.dense)  # the connector whole, as a head
    assert delta.config.hparams["kind"] == "generation" and delta.config.hparams["label_names"] == []
    assert main(["apply", str(run), "--output", str(tmp_path / "applied")]) == 2
    assert "assembled from its parts" in capsys.readouterr().err and not (tmp_path / "applied").exists()
    # generate --image: the run's base + delta answers a question about an image, as the model itself does
    image = next((train / ANSWERS[0]).iterdir())
    capsys.readouterr()
    assert main(["generate", str(run), "--image", str(image), "--prompt", "which is it", "--max-new-tokens",
                 "3"]) == 0, capsys.readouterr().err
    said = capsys.readouterr().out.strip()
    processor, model = load(tiny)
    delta.apply(model)
    model.eval()
    from childtune.data.images import open_image

    batch = collate_for(processor).for_generation([open_image(image)])
    ids = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id,
                         eos_token_id=processor.tokenizer.eos_token_id)
    assert said == processor.tokenizer.decode(ids[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert main(["generate", str(run), "--image", str(image)]) == 2  # your own images: which question?
    assert "give the question to ask with --prompt" in capsys.readouterr().err
    assert main([*args, "--save", "model", "--output", str(tmp_path / "whole")]) == 2
    assert "assembled from, not saved as" in capsys.readouterr().err
    assert main([*args, "--method", "lora", "--output", str(tmp_path / "lora")]) == 2
    assert "LoRA's adapters lie where peft puts them" in capsys.readouterr().err


def test_lora_adapts_both_towers_and_trains_the_connector_whole(tiny, tmp_path, capsys):
    train = write_folder(tmp_path / "train", {name: 4 for name in ANSWERS}, size=16)
    dev = write_folder(tmp_path / "dev", {name: 2 for name in ANSWERS}, size=16)
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny), "--train", str(train), "--dev", str(dev), "--method", "lora",
                 "--epochs", "1", "--batch-size", "4", "--max-new-tokens", "2", "--no-progress",
                 "--output", str(run)]) == 0, capsys.readouterr().err
    delta = SparseDelta.load(run / "delta")  # the merged adapters, against the assembled base
    changed = {n.split(".")[0] for n in [*delta.entries, *delta.dense]}
    assert changed == {"vision", "connector", "language"}
    assert any("q_proj" in n for n in delta.entries) and any("ConvNet" in n for n in delta.entries)
    assert not any("k_proj" in n or "embed_tokens" in n for n in delta.entries)  # only LoRA's targets moved
