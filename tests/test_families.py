"""Every common model family's blocks and head found from parameter names; decoder classifiers and
sentence pairs trained end to end on tiny random models."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
import transformers

from childtune import ChildOptimizer, GradualUnfreezing
from childtune.cli import main
from childtune.layers import HEAD, blocks, in_layer, matches, parameter_type

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_resume import FILLER, NEGATIVE, POSITIVE, write_task

SMALL = dict(vocab_size=40, hidden_size=16, num_attention_heads=2, intermediate_size=32, num_labels=2)

FAMILIES = {  # config, stacks and their block prefixes as the family names them
    "llama": (transformers.LlamaConfig(**SMALL, num_hidden_layers=3, num_key_value_heads=2), ["model.layers."]),
    "qwen2": (transformers.Qwen2Config(**SMALL, num_hidden_layers=3, num_key_value_heads=2), ["model.layers."]),
    "mistral": (transformers.MistralConfig(**SMALL, num_hidden_layers=3, num_key_value_heads=2),
                ["model.layers."]),
    "gpt2": (transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=3, n_head=2, n_positions=32, num_labels=2),
             ["transformer.h."]),
    "opt": (transformers.OPTConfig(vocab_size=40, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                   ffn_dim=32, word_embed_proj_dim=16, max_position_embeddings=32, num_labels=2),
            ["model.decoder.layers."]),
    "gpt_neox": (transformers.GPTNeoXConfig(**SMALL, num_hidden_layers=3, max_position_embeddings=32),
                 ["gpt_neox.layers."]),
    "t5": (transformers.T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=3, num_decoder_layers=2,
                                 num_heads=2, num_labels=2, decoder_start_token_id=0),
           ["transformer.encoder.block.", "transformer.decoder.block."]),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_has_its_blocks_and_head_found(family):
    config, stacks = FAMILIES[family]
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    names = [n for n, _ in model.named_parameters()]
    depth = {"transformer.encoder.block.": 3, "transformer.decoder.block.": 2}
    found = [g for g in blocks(names) if in_layer(g[0])]
    expected = sum(depth.get(s, 3) for s in stacks)
    assert len(found) == expected, [g[0] for g in found]
    for group, (stack, index) in zip(found, [(s, i) for s in stacks for i in range(depth.get(s, 3))], strict=True):
        assert all(n.startswith(f"{stack}{index}.") for n in group), (family, group[:2])
    head = [n for n in names if matches(n, HEAD)]
    assert head and not any(in_layer(n) for n in head)
    assert all(parameter_type(n) == "head" for n in head)
    types = {parameter_type(n) for n in names if in_layer(n)}
    assert {"attention", "ffn"} <= types, types
    # gradual unfreezing walks the stacks top-down: the head first, then the last block of the last stack
    strategy = GradualUnfreezing(1)
    ChildOptimizer(model.named_parameters(), strategy)
    frozen_at_1 = {n for n, m in strategy.masks(1).items() if not m.any()}
    top_block = found[-1]
    assert not (set(top_block) & frozen_at_1) and set(found[0]) <= frozen_at_1


def write_tiny_llama(folder: Path, tied: bool = False) -> Path:
    """A random 2-block Llama classifier folder whose tokenizer has no pad token (as Llama's has none)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", *POSITIVE, *NEGATIVE, *FILLER])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>",
                                               model_max_length=32)
    assert tok.pad_token is None
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, intermediate_size=32,
                                      max_position_embeddings=64, tie_word_embeddings=tied)  # SmolLM2 ties
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_a_decoder_lm_trains_as_a_classifier_with_pad_from_eos(tmp_path, capsys):
    model = write_tiny_llama(tmp_path / "llama")
    train, dev = write_task(tmp_path, n_train=80, n_dev=20)
    out = tmp_path / "run"
    assert main(["train", "--model", str(model), "--train", str(train), "--dev", str(dev),
                 "--method", "child-d", "--reserve-p", "0.5", "--epochs", "8", "--batch-size", "8", "--lr", "5e-3",
                 "--no-progress", "--checkpoint-every", "0",
                 "--output", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dev"]["accuracy"] >= 0.7, metrics["dev"]  # chance is 0.5; padded batches score the last token
    assert (out / "delta").is_dir()  # strict child-d: a sparse delta against the Llama base
    from childtune.data.types import TaskSpec
    from childtune.training.config import TrainConfig
    from childtune.training.models import load_model

    tokenizer, classifier = load_model(TrainConfig(model=str(model)), TaskSpec("t", "classification", 2, ("0", "1"),
                                                                                "accuracy"))
    assert tokenizer.pad_token == "</s>" and classifier.config.pad_token_id == tokenizer.eos_token_id


def test_sentence_pairs_from_user_files_and_an_eval_cap(tmp_path, capsys):
    from test_train import WORDS, write_tiny_task

    model = write_tiny_task(tmp_path / "bert")  # a tiny random BERT whose vocabulary holds good/bad
    rng = random.Random(0)
    rows = ["premise,hypothesis,label"]
    for i in range(192):  # the cue sits in the hypothesis: the premise alone says nothing about the label
        premise = " ".join(rng.choice(WORDS) for _ in range(4))
        hypothesis = " ".join([*(rng.choice(WORDS) for _ in range(3)), "good" if i % 2 else "bad"])
        rows.append(f"{premise},{hypothesis},{i % 2}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    assert main(["train", "--model", str(model), "--train", str(tmp_path / "pairs.csv"), "--dev",
                 str(tmp_path / "pairs.csv"), "--text-col", "premise", "--text-pair-col", "hypothesis",
                 "--method", "full", "--epochs", "4", "--batch-size", "16", "--lr", "3e-3", "--eval-size", "25",
                 "--no-progress", "--checkpoint-every", "0", "--output", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dev_examples"] == 25
    assert metrics["dev"]["accuracy"] >= 0.8, metrics["dev"]
    from childtune.data.batching import make_collate

    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    batch = make_collate(tokenizer)([(("good", "bad"), 0)])
    ids = batch["input_ids"][0].tolist()
    assert ids.count(tokenizer.sep_token_id) == 2 and batch["token_type_ids"][0].tolist()[-1] == 1  # a real pair
