"""A delta exported as a peft SHiRA adapter loads with `PeftModel.from_pretrained` and gives apply's outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers

from childtune.cli import main
from childtune.delta import DeltaError, SparseDelta
from childtune.training.shira import plan, write_shira

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_families import write_tiny_llama
from test_resume import write_task, write_tiny_model


def _load(folder: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def _changed(folder: Path, edits: dict[str, float]) -> tuple[SparseDelta, torch.nn.Module]:
    """A delta changing a share of each named tensor (name -> share), and the tuned model itself."""
    model = _load(folder)
    base = {n: t.clone() for n, t in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, share in edits.items():
            p = model.get_parameter(name)
            keep = torch.rand(p.shape, generator=gen) < share
            p.add_(torch.randn(p.shape, generator=gen) * 0.1 * keep)
    return SparseDelta.from_training(base, model, method="child-d", base_model=str(folder)), model


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(2, 14).view(2, 6)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_shira_adapter_gives_the_outputs_of_apply(tmp_path):
    """Sparse Linear changes become SHiRA layers at one rank (the densest layer's), padded with zeros
    outside the child network; a changed norm is saved whole. peft's own loader reproduces the tuned
    model's logits."""
    from peft import PeftModel

    folder = write_tiny_llama(tmp_path / "llama")
    q, k, norm = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                  "model.layers.0.input_layernorm.weight")
    delta, tuned = _changed(folder, {q: 0.2, k: 0.05, norm: 1.0})
    out = tmp_path / "shira"
    layout = write_shira(delta, _load(folder), out, str(folder))
    assert set(layout.targets) == {q.removesuffix(".weight"), k.removesuffix(".weight")}
    assert layout.whole == ("model.layers.0.input_layernorm",)
    need = delta.entries[q].indices.numel()
    assert layout.r == -(-need // 32)  # ceil(changed / (in + out)) of the densest layer, q: 16 x 16
    assert layout.changed == delta.entries[q].indices.numel() + delta.entries[k].indices.numel()

    saved = safetensors.torch.load_file(out / "adapter_model.safetensors")
    idx = next(v for n, v in saved.items() if "layers.0.self_attn.q_proj.shira_indices" in n)
    values = next(v for n, v in saved.items() if "layers.0.self_attn.q_proj.shira_weight" in n)
    assert values.numel() == layout.r * 32 == idx.shape[1]
    flat = idx[0].long() * 16 + idx[1].long()
    child = delta.entries[q].indices
    assert torch.isin(child, flat).all()  # every changed weight is in the adapter ...
    assert (values[~torch.isin(flat, child)] == 0).all()  # ... and the padding changes nothing
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "SHIRA"

    loaded = PeftModel.from_pretrained(_load(folder), out).eval()
    torch.testing.assert_close(_logits(loaded), _logits(tuned), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(_logits(_load(folder)), _logits(tuned))  # the delta does change the outputs


def test_a_layer_too_dense_for_the_rank_is_saved_whole(tmp_path):
    """peft caps a layer at in*out values: a fully changed 16 -> 32 layer needs r = ceil(512 / 48) = 11,
    and 11 * 48 > 512, so it is saved whole and the sparse layer keeps a small rank."""
    folder = write_tiny_llama(tmp_path / "llama")
    q, up = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"
    delta, _ = _changed(folder, {q: 0.1, up: 1.0})
    layout = plan(delta, _load(folder))
    assert set(layout.targets) == {q.removesuffix(".weight")} and layout.whole == (up.removesuffix(".weight"),)
    assert layout.r == -(-delta.entries[q].indices.numel() // 32)


def test_tied_embeddings_are_refused_by_name(tmp_path):
    folder = write_tiny_llama(tmp_path / "tied", tied=True)
    delta, _ = _changed(folder, {"model.embed_tokens.weight": 0.1, "model.layers.0.mlp.up_proj.weight": 0.1})
    with pytest.raises(DeltaError, match=r"model.embed_tokens.*tied"):
        plan(delta, _load(folder))


def test_cli_exports_a_classifier_run_as_shira(tmp_path, capsys):
    """`childtune export --format shira` on the authors' random masking (query/value weights only): q and
    v become SHiRA layers, the task head goes to modules_to_save, and peft's loader gives apply's logits."""
    from peft import PeftModel

    model = write_tiny_model(tmp_path / "model", dropout=0.0)
    train, dev = write_task(tmp_path)
    run = tmp_path / "run"
    assert main(["train", "--model", str(model), "--train", str(train), "--dev", str(dev), "--method", "random",
                 "--preset", "authors", "--reserve-p", "0.05", "--epochs", "1", "--batch-size", "4", "--no-progress",
                 "--output", str(run)]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--format", "shira", "--output", str(tmp_path / "shira")]) == 0
    assert "a peft SHiRA adapter" in capsys.readouterr().out
    assert main(["apply", str(run), "--output", str(tmp_path / "applied")]) == 0
    config = json.loads((tmp_path / "shira" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]
    assert sorted(config["target_modules"]) == [f"bert.encoder.layer.{i}.attention.self.{m}" for i in (0, 1)
                                                 for m in ("query", "value")]
    applied = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "applied").eval()
    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        model, num_labels=applied.config.num_labels)
    loaded = PeftModel.from_pretrained(base, tmp_path / "shira").eval()
    ids = torch.randint(5, 20, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, applied(input_ids=ids).logits, rtol=1e-5,
                                   atol=1e-6)
