# Everything a newcomer needs: `make demo` and `make test` work on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test lint bench evidence

$(PY):
	python3 -m venv $(VENV)

# torch first, pinned to the local CPU build: the package's own `torch>=2.4` is then already
# satisfied and pip never pulls a CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(STAMP)

# ruff for the code, lint-imports for the architecture (the contracts in pyproject.toml), mypy for the
# types ([tool.mypy] there: src/childtune, the core strictly).
lint: install
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

# pytest exits 5 when it collects nothing: that is a failure here too.
test: install lint
	$(PY) -m pytest -q

demo: install
	$(VENV)/bin/childtune compare --task mr --methods full,child-f,child-d --seeds 1 \
		--train-size 1000 --output runs/demo --overwrite

bench: install
	$(PY) benchmarks/bench.py --memory-scale --output benchmarks/RESULTS.md

# The evidence of docs/RESULTS.md, in the order the study issue asks for it. Every finished cell is a line
# of docs/ledger.jsonl (commit it); rerunning skips what the ledger holds, so this resumes anywhere.
# `make evidence EVIDENCE_FLAGS=--report-only` rebuilds every block of docs/RESULTS.md from the ledger alone.
EVIDENCE_FLAGS ?=
STUDY := $(VENV)/bin/childtune study --grid defaults --no-transfer --no-analysis \
	--ledger docs/ledger.jsonl --results docs/RESULTS.md $(EVIDENCE_FLAGS)
evidence: install
	$(STUDY) --name low-resource --seeds 1-5 --tasks mr --train-sizes 100,300,1000,3000 --methods full,child-f,child-d \
		--output runs/evidence/low-resource
	$(STUDY) --name low-resource-updates --seeds 1-5 --tasks mr --train-sizes 100,300,1000 --updates 189 \
		--methods full,child-f,child-d --output runs/evidence/low-resource-updates
	$(STUDY) --name task-driven --seeds 1-5 --tasks mr,subj --methods child-d,child-d-random --output runs/evidence/task-driven
	$(STUDY) --name presets-childtune --seeds 1-5 --tasks mr,subj --methods child-d,id3,random --output runs/evidence/presets
	$(STUDY) --name presets-authors --seeds 1-5 --tasks mr,subj --methods child-d,id3,random --preset authors \
		--output runs/evidence/presets-authors
	$(STUDY) --name tasks --seeds 1-5 --tasks subj,bbc-news,spam --methods full,child-f,child-d,random,id3,gradual,lora \
		--output runs/evidence/tasks
	# 2d, the LLM (SmolLM2-135M, 3 seeds), each cell sized to about 5 minutes on one thread of this CPU
	$(STUDY) --name llm-math --model smollm2-135m --tasks math --seeds 1-3 --train-size 96 --epochs 2 \
		--eval-size 40 --max-length 64 --max-new-tokens 8 --chat-template \
		--methods full,child-f,child-d,id3,random,lora,id3-lora --output runs/evidence/llm-math
	# the selective methods again at the causal-LM defaults of issue 29 (random, id3: bf16, fp32 child masters, step in
	# backward, child-only gradients; child-d: fp32, step after backward, child-only gradients, p 0.05), beside the
	# fp32 cells above
	$(STUDY) --name llm-math-lean --model smollm2-135m --tasks math --seeds 1-3 --train-size 96 --epochs 2 \
		--eval-size 40 --max-length 64 --max-new-tokens 8 --chat-template \
		--methods child-d,random,id3 --output runs/evidence/llm-math-lean
	# child-d's causal-LM settings, one factor at a time and together (weights x step placement x p), and lr
	# at the leanest (how its default was chosen: training/methods.py, _CAUSAL_CHILD_D)
	$(STUDY) --name llm-child-d-settings --model smollm2-135m --tasks math --seeds 1-3 --train-size 96 --epochs 2 \
		--grid '{"child-d": {"dtype": ["bf16", "fp32"], "optimizer_in_backward": [true, false], "reserve_p": [0.05, 0.1, 0.3]}}' \
		--eval-size 40 --max-length 64 --max-new-tokens 8 --chat-template --methods child-d \
		--output runs/evidence/llm-child-d-settings
	$(STUDY) --name llm-child-d-lr --model smollm2-135m --tasks math --seeds 1-3 --train-size 96 --epochs 2 \
		--grid '{"child-d": {"lr": [0.001, 0.003], "dtype": ["bf16"], "optimizer_in_backward": [true], "reserve_p": [0.05]}}' \
		--eval-size 40 --max-length 64 --max-new-tokens 8 --chat-template --methods child-d \
		--output runs/evidence/llm-child-d-lr
	$(STUDY) --name llm-snli --model smollm2-135m --tasks snli --seeds 1-3 --train-size 200 --epochs 2 \
		--eval-size 200 --max-length 96 --methods full,child-f,child-d,lora --output runs/evidence/llm-snli
	# issue 30.4a: a moving child network against fixed ones of the same size (1% of the weights), and BitFit beside
	# them; each method's lr chosen on dev from three (the same rule for all). Three seeds on two tasks: 102 cells,
	# about 4 hours on 2 CPU cores (bbc-news, at 4 minutes a cell, was dropped for time)
	$(STUDY) --name moving --seeds 1-3 --tasks mr,spam --train-size 1000 \
		--grid '{"child-dyn": {"dyn_start": ["random", "fisher"], "lr": [0.001, 0.003, 0.01]}, "child-d": {"reserve_p": [0.01], "lr": [0.001, 0.003, 0.01]}, "random": {"lr": [0.001, 0.003, 0.01]}, "pafi": {"reserve_p": [0.01], "lr": [0.001, 0.003, 0.01]}, "bitfit": {"lr": [0.001, 0.003, 0.01]}}' \
		--methods child-dyn,child-d,random,pafi,bitfit --baseline random --output runs/evidence/moving
	# issue 31.4: EasyOCR's pretrained CRNN on Fashion-MNIST, 1,000 images, 2 epochs, 5 seeds; each method's lr chosen
	# on dev from three (the same rule for all: its sparse ones, random masking's 1%, one step larger), a fourth for
	# random masking and LoRA, which chose the top of their three. About a minute a cell on one thread of this CPU
	$(STUDY) --name vision --model easyocr-crnn --tasks fashion-mnist --seeds 1-5 --train-size 1000 --epochs 2 \
		--grid '{"full": {"lr": [0.0003, 0.001, 0.003]}, "child-f": {"lr": [0.0003, 0.001, 0.003]}, "child-d": {"lr": [0.0003, 0.001, 0.003]}, "random": {"lr": [0.001, 0.003, 0.01, 0.03]}, "lora": {"lr": [0.0003, 0.001, 0.003, 0.01]}}' \
		--methods full,child-f,child-d,random,lora --output runs/evidence/vision
	# issue 31.4, the vision-language model (EasyOCR's CRNN -> a new MLP connector -> SmolLM2-135M), 3 seeds: where a
	# multimodal task puts its child network. child-d at 1% in the vision tower alone, the language tower alone, both
	# (one joint top 1%, or 1% of each), the connector alone (the towers frozen), LoRA on both towers; the connector
	# trains whole in every cell; lr 1e-3 for all (not tuned: one cell is about 5 minutes on one thread)
	$(STUDY) --name vlm --model crnn-smollm2 --tasks fashion-mnist --seeds 1-3 --train-size 256 --epochs 2 \
		--batch-size 8 --eval-size 100 --fisher-samples 64 --max-new-tokens 6 --methods full,child-d,lora \
		--baseline lora --rows-by child_scope,child_budget \
		--grid '{"full": {"child_scope": ["connector"], "lr": [0.001]}, "child-d": [{"reserve_p": [0.01], "lr": [0.001], "child_scope": ["vision", "language"]}, {"reserve_p": [0.01], "lr": [0.001], "child_scope": ["vision,language"], "child_budget": ["joint", "per-part"]}], "lora": {"lr": [0.001]}}' \
		--output runs/evidence/vlm
	# issue 30.4b: the four tasks at once, 1,000 examples each, a shared child network of 1% by each rule, alone
	# and with each task's own 0.5%, beside single-task child-d of the same size and lr (the baseline its rows are
	# paired with) and full fine-tuning on each task; the report adds the bytes stored for all four
	$(STUDY) --name multitask --seeds 1-5 --tasks mr+subj+spam+bbc-news,mr,subj,spam,bbc-news --train-size 1000 \
		--methods child-d,full --baseline child-d \
		--grid '{"child-d": {"reserve_p": [0.01], "lr": [0.001], "shared_child": ["fisher-sum", "fisher-intersection", "union"], "task_child": [0, 0.005]}}' \
		--output runs/evidence/multitask
	# issue 30.4c: the single-task child-d runs merged by TIES and DARE (density 0.5), each task scored on the merge
	$(STUDY) --name multitask-merged --seeds 1-5 --tasks mr+subj+spam+bbc-news --train-size 1000 --methods child-d \
		--grid '{"child-d": {"reserve_p": [0.01], "lr": [0.001], "merge": ["ties", "dare"], "merge_density": [0.5]}}' \
		--output runs/evidence/multitask-merged
	# issue 32.3: the LLM comparison at about 200 updates (400 math questions, 4 epochs of batch 8), scored on 100 dev
	# and 100 test questions, 3 seeds. Every method's lr is chosen on dev from three values a factor of ~3 apart around
	# its default (the same rule for all); LoRA at r=8 and at r=24 (1.38M adapter weights, random masking's 1% is
	# 1.35M); random masking at 1% and at LoRA r=8's 460,800 weights (p 0.003426 of the model); child-d and LoRA
	# also on a 4-bit base (QLoRA); id3-lora's budget chosen on dev with its lr. 108 cells of up to ~15 minutes on
	# one thread of this CPU: a background study of about a day
	$(STUDY) --name llm-fair --model smollm2-135m --tasks math --seeds 1-3 --train-size 400 --epochs 4 --batch-size 8 \
		--eval-size 100 --max-length 64 --max-new-tokens 8 --chat-template \
		--methods full,child-f,child-d,id3,random,lora,id3-lora --baseline lora --rows-by base_bits,reserve_p,lora_rank \
		--grid '{"full": {"lr": [3e-05, 0.0001, 0.0003]}, "child-f": {"lr": [3e-05, 0.0001, 0.0003]}, "child-d": [{"lr": [0.0001, 0.0003, 0.001]}, {"lr": [0.0001, 0.0003, 0.001], "base_bits": [4]}], "id3": {"lr": [0.002, 0.005, 0.01]}, "random": [{"lr": [0.003, 0.01, 0.03]}, {"lr": [0.003, 0.01, 0.03], "reserve_p": [0.003426], "random_budget": ["model"]}], "lora": [{"lr": [0.0003, 0.001, 0.003], "lora_rank": [8, 24]}, {"lr": [0.0003, 0.001, 0.003], "lora_rank": [8], "base_bits": [4]}], "id3-lora": {"lr": [0.0003, 0.001, 0.003], "id3_budget": [0.1, 0.5]}}' \
		--output runs/evidence/llm-fair
