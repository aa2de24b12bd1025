# `make demo`: set up from nothing and run a short SpFDE run on Fashion-MNIST.
# `make test`: set up and run the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= runs/demo
# a local CPU wheel of torch, where the machine has one (keeps pip off the multi-GB CUDA build)
FIND := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: setup data demo test lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned, so pip never resolves a multi-GB CUDA build here.
	$(BIN)/python -m pip install -q $(FIND) "torch==2.13.0" \
	  || $(BIN)/python -m pip install -q --index-url https://download.pytorch.org/whl/cpu "torch>=2.2" \
	  || $(BIN)/python -m pip install -q "torch>=2.2"
	$(BIN)/python -m pip install -q $(FIND) -e ".[test,lightning,hf]"
	# the optional native sparse-conv kernel; a failed build is not fatal (dense fallback)
	# (through main(), not `-m`: the package imports the module first, which runpy warns about)
	-$(BIN)/python -c "import sys; from spfde.sparsity.kernels.native import main; sys.exit(main())"
	touch $(STAMP)

setup: $(STAMP)

data: $(STAMP)
	$(BIN)/spfde data fashion_mnist

demo: $(STAMP)
	$(BIN)/spfde data fashion_mnist
	$(BIN)/spfde demo --out $(OUT) --force

test: $(STAMP)
	$(BIN)/spfde data fashion_mnist
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) runs
