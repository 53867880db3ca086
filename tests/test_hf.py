"""Child-Tuning inside the Hugging Face Trainer: only the child network changes, Fisher included."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from childtune import ChildOptimizer
from childtune.hf import ChildTuningTrainer, create_optimizer
from childtune.strategies import ChildTuningD, ChildTuningF


class RandomTokens(Dataset):
    """A few random sentences with random labels: enough for gradients to reach every weight."""

    def __init__(self, n: int = 24, length: int = 9) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, 64, (n, length), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", max_steps=6,
                per_device_train_batch_size=8, learning_rate=1e-2, weight_decay=0.1, logging_strategy="no",
                disable_tqdm=True, dataloader_num_workers=0, seed=0)
    return TrainingArguments(**{**base, **kw})


def changed(model, before) -> dict[str, torch.Tensor]:
    return {n: p.detach() != before[n] for n, p in model.named_parameters()}


def test_trainer_with_child_tuning_d_strict_changes_only_the_child_network(tiny_bert, tmp_path):
    before = {n: p.detach().clone() for n, p in tiny_bert.named_parameters()}
    strategy = ChildTuningD(0.2, rest="freeze")  # the authors' rest="train" would also train the embeddings
    trainer = ChildTuningTrainer(model=tiny_bert, args=args(tmp_path), train_dataset=RandomTokens(),
                                 strategy=strategy, strict=True)
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, ChildOptimizer)  # unwrapped from Accelerate's wrapper
    chosen = strategy.final_masks(0)  # Fisher ran on the Trainer's own dataloader before the first step
    scored = {n: p for n, p in tiny_bert.named_parameters() if ".layer." in n}
    assert set(scored) <= set(chosen)
    assert not any(chosen[n].any() for n in set(chosen) - set(scored))  # frozen: embeddings, pooler
    assert sum(int(m.sum()) for m in chosen.values()) == round(0.2 * sum(p.numel() for p in scored.values()))
    moved = changed(tiny_bert, before)
    for name, diff in moved.items():
        if "classifier" in name:
            assert diff.any(), name  # the head trains in full
        else:
            assert not (diff & ~chosen[name]).any(), f"{name} changed outside its child network"
    assert sum(int((moved[n] & m).sum()) for n, m in chosen.items()) > 0.9 * sum(int(m.sum()) for m in chosen.values())


def test_without_strict_weight_decay_moves_weights_outside_the_child(tiny_bert, tmp_path):
    """The authors' behaviour, and why strict exists: decoupled decay shrinks every decayed weight."""
    before = {n: p.detach().clone() for n, p in tiny_bert.named_parameters()}
    strategy = ChildTuningD(0.2)
    ChildTuningTrainer(model=tiny_bert, args=args(tmp_path), train_dataset=RandomTokens(),
                       strategy=strategy, strict=False).train()
    moved = changed(tiny_bert, before)
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    assert (moved[name] & ~strategy.final_masks(0)[name]).any()


def test_trainer_keeps_its_weight_decay_groups_and_hyperparameters(tiny_bert, tmp_path):
    trainer = ChildTuningTrainer(model=tiny_bert, args=args(tmp_path, adam_beta2=0.98, adam_epsilon=1e-7),
                                 train_dataset=RandomTokens(), strategy=ChildTuningF(0.3, seed=1))
    opt = trainer.create_optimizer()
    decay = set(trainer.get_decay_parameter_names(tiny_bert))
    for group in opt.param_groups:
        names = {opt_name for opt_name, p in opt.named.items() if any(p is q for q in group["params"])}
        assert group["weight_decay"] == (0.1 if names <= decay else 0.0)
        assert names <= decay or not names & decay
        assert group["lr"] == 1e-2 and group["betas"] == (0.9, 0.98) and group["eps"] == 1e-7


def test_plain_trainer_takes_create_optimizer_in_one_line(tiny_bert, tmp_path):
    before = {n: p.detach().clone() for n, p in tiny_bert.named_parameters()}
    data = RandomTokens()
    strategy = ChildTuningD(0.1)
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    opt = create_optimizer(tiny_bert, strategy, lr=1e-2, strict=True, batches=loader)
    Trainer(model=tiny_bert, args=args(tmp_path), train_dataset=data, optimizers=(opt, None)).train()
    moved = changed(tiny_bert, before)
    assert all(not (moved[n] & ~m).any() for n, m in strategy.final_masks(0).items())
    assert any((moved[n] & m).any() for n, m in strategy.final_masks(0).items())


def test_create_optimizer_needs_batches_for_child_tuning_d(tiny_bert):
    with pytest.raises(ValueError, match="pass batches="):
        create_optimizer(tiny_bert, ChildTuningD(0.3), lr=1e-3)


class CausalTokens(Dataset):
    """Random token sequences for a causal LM: the labels are the inputs (the model shifts them)."""

    def __init__(self, n: int = 24, length: int = 9, vocab: int = 24) -> None:
        self.ids = torch.randint(2, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def test_trainer_child_tunes_a_causal_lm_with_fisher_on_its_tokens(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_families import write_tiny_llama
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(write_tiny_llama(tmp_path / "llama", tied=True))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    strategy = ChildTuningD(0.2, rest="freeze")
    trainer = ChildTuningTrainer(model=model, args=args(tmp_path), train_dataset=CausalTokens(), strategy=strategy,
                                 strict=True)
    trainer.train()
    for name, diff in changed(model, before).items():
        assert not (diff & ~strategy.final_masks(0)[name]).any(), f"{name} changed outside its child network"
    assert any(changed(model, before)[n].any() for n in strategy.final_masks(0))


def test_sft_trainer_with_strict_child_tuning_changes_only_child_elements(tmp_path):
    pytest.importorskip("trl")
    import sys
    from pathlib import Path

    from datasets import Dataset as HFDataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from childtune import RandomMasking
    from childtune.hf import ChildTuningSFTTrainer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_families import write_tiny_llama

    folder = write_tiny_llama(tmp_path / "llama")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.eos_token
    data = HFDataset.from_list([{"text": f"the film was {w} and {v}"} for w, v in
                                zip(["good", "bad", "fun", "dull"] * 4, ["great", "awful", "smart", "flat"] * 4,
                                    strict=True)])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    strategy = RandomMasking(0.05, seed=1)
    config = SFTConfig(output_dir=str(tmp_path / "sft"), use_cpu=True, report_to=[], save_strategy="no", max_steps=4,
                       per_device_train_batch_size=4, learning_rate=1e-2, logging_strategy="no", disable_tqdm=True,
                       max_length=16, dataloader_num_workers=0, seed=0)
    trainer = ChildTuningSFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                                    strategy=strategy, strict=True)  # the one changed line
    trainer.train()
    moved = changed(model, before)
    for name, diff in moved.items():
        if name in strategy.final_masks(0):
            assert not (diff & ~strategy.final_masks(0)[name]).any(), f"{name} changed outside its child network"
    assert sum(int((moved[n] & m).sum()) for n, m in strategy.final_masks(0).items()) > 0
