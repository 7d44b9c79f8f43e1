# tfq: `make demo` (set-up + main job) and `make test` (set-up + test suite) on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
FASHION_DIR ?= $(if $(TFQ_DATA_DIR),$(TFQ_DATA_DIR),/usr/share/datasets/fashion-mnist)
RUN_DIR ?= runs/demo
PYTEST_ARGS ?= -m "not slow"
ONLY ?=
export TF_CPP_MIN_LOG_LEVEL ?= 2
export TF_USE_LEGACY_KERAS := 1

.PHONY: install kernels data demo test test-all bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

KERNELS := tfq/kernels/_fused_ops.so

# tfq's fused LSQ kernels, compiled for the installed TensorFlow (TFQ_FUSED_KERNELS=0 skips them;
# tfq then trains through TensorFlow ops: same numbers, slower steps).
$(KERNELS): tfq/kernels/fake_quant.cc tfq/kernels/__init__.py $(VENV)/.installed
	$(PY) -m tfq.kernels

kernels: $(if $(filter 0,$(TFQ_FUSED_KERNELS)),,$(KERNELS))

install: $(VENV)/.installed kernels data

# Fashion-MNIST comes from Debian's dataset-fashion-mnist (no download at run time).
data:
	@if [ -f "$(FASHION_DIR)/t10k-labels-idx1-ubyte.gz" ]; then \
	  echo "Fashion-MNIST: $(FASHION_DIR)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "Installing Debian's dataset-fashion-mnist"; \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) ; \
	else \
	  echo "Fashion-MNIST is missing from $(FASHION_DIR): run 'sudo apt-get install dataset-fashion-mnist'"; \
	  echo "or put the four IDX .gz files in a folder and set TFQ_DATA_DIR to it. Tests that need it are skipped."; \
	fi

demo: install
	$(VENV)/bin/tfq train --dataset=fashion_mnist --model=mobile_swish --method=lsq+ \
	  --weight_bits=4 --activation_bits=4 --narrow_range_weights --float_epochs=3 --epochs=2 \
	  --run_dir=$(RUN_DIR) --cache_dir=runs/cache
	$(VENV)/bin/tfq export $(RUN_DIR) --format=tflite --int4_weights --integer_limit=1000
	$(VENV)/bin/tfq bench $(RUN_DIR)/model_fp32.tflite $(RUN_DIR)/model_int8.tflite \
	  $(RUN_DIR)/model_int4w.tflite --target=host --threads=1 --runs=30
	$(VENV)/bin/tfq report $(RUN_DIR)

test: install
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q -m ""

bench: install
	$(PY) -m benchmarks.run $(if $(ONLY),--only=$(ONLY),)

clean:
	rm -rf $(VENV) runs *.egg-info $(KERNELS) $(KERNELS).tfversion
