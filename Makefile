# The two commands of the README: `make demo` and `make test`.
# Both build their own virtual environment (.venv) from setup.cfg on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# 2 cores here: two pytest workers keep both busy while XLA compiles. Each
# starts with half the tests and takes from the other's queue when idle
# (worksteal), so neither waits at the end on the other's long tests.
PYTEST_WORKERS ?= 2

.PHONY: venv test test-slow demo bench clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,test]'
	touch $(STAMP)

test: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m pytest -n $(PYTEST_WORKERS) --dist worksteal -q tests

# Tests marked @pytest.mark.slow (the multi-worker runs: graph mode ~1 min,
# XLA ~4 min, SyncBN ~1 min, gradient accumulation ~1 min; the cascade and
# RetinaNet overfits; the LVIS recipe and
# bin/eval --tta program tests; the whole model evaluated on two CPUs; the
# mask and keypoint heads' XLA switch_case of RoiHeads.mask_buckets > 1, ~1 min; the
# federated-loss, Detectron2-import and visualize_data programs and the GPU
# matrix's process-per-case mode, ~1.5 min; the GPU matrix's real and served
# cases and bin/bench's training and inference cases (run before a GPU session), the FLOP
# count of the model, the bfloat16 Predictor and export, the GroupNorm and
# box-only model checks, ~1.5 min; exit 5 = none collected).
test-slow: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m pytest -q -m slow tests || [ $$? -eq 5 ]

# The shapes demo: data, training from scratch, COCO eval, pictures.
DEMO_DIR ?= runs/shapes_demo
# TF 2.21 leaves its oneDNN kernels off on this AMD EPYC (AVX2, no AVX-512)
# unless asked; they make the demo's training step 7-13% faster here.
DEMO_ENV := TF_CPP_MIN_LOG_LEVEL=2 TF_ENABLE_ONEDNN_OPTS=1
demo: $(STAMP)
	@test -f data/shapes/annotations/instances_val2017.json || \
		$(DEMO_ENV) $(PY) bin/make_shapes --out=data/shapes
	$(DEMO_ENV) $(PY) bin/train --gin_file=gin/shapes_demo.gin --model_dir=$(DEMO_DIR)
	$(DEMO_ENV) $(PY) bin/eval --gin_file=gin/shapes_demo.gin --model_dir=$(DEMO_DIR)
	$(DEMO_ENV) $(PY) bin/predict --gin_file=gin/shapes_demo.gin --model_dir=$(DEMO_DIR) \
		--out_dir=$(DEMO_DIR)/pictures --max_images=8 data/shapes/val2017

bench: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) bin/bench --op=all

clean:
	rm -rf $(VENV) build *.egg-info
