PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS ?= test,onnx,openvino,int8,bench,triton,serving

.PHONY: demo test test-slow setup clean

# Creates .venv when missing and reuses it when present; reinstalls when the project files change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, from the pinned CPU build, so nothing else pulls a CUDA wheel.
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	# MII without its declared deps (they pull CUDA libraries); the serving extra holds what it needs.
	$(BIN)/pip install -q -c constraints.txt --no-deps deepspeed-mii
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/fastsd generate "a red circle on a blue background" --steps 25 --seed 0 --out out/demo.png
	$(BIN)/fastsd verify --steps 25 --seed 0

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) out
