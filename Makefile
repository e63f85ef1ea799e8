PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS ?= test,onnx,openvino,int8,bench,triton,serving,lora,ui,docs,ray

.PHONY: demo test test-slow setup browser clean netns-deps docs gpu-wheels gpu-wheels-check peer-env

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

# The web page's browser tests drive Debian's chromium through its chromedriver (no browser download).
# Installed with apt where missing (as root, else with sudo); if that fails the browser tests skip and say why.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver \
	    || echo "chromium not installed: the browser tests will skip"; \
	fi

# The tests run as on a machine that never ran fastsd: a new, empty HOME and cache folders for Triton,
# torch.compile (Inductor), MII deployments, OpenVINO/ONNX exports and the hub (removed afterwards), so a
# warm cache on this machine can never hide a failure.
FRESH = T=$$(mktemp -d "$${TMPDIR:-/tmp}/fastsd-fresh.XXXXXX") && trap 'rm -rf "$$T"' EXIT && \
	export HOME=$$T/home XDG_CACHE_HOME=$$T/home/.cache TRITON_CACHE_DIR=$$T/triton \
	TORCHINDUCTOR_CACHE_DIR=$$T/inductor MII_CACHE_PATH=$$T/mii FASTSD_OPENVINO_CACHE=$$T/openvino && \
	mkdir -p $$HOME

# Two workers (pytest-xdist): most tests use one thread and much of the rest waits on deployments, so two
# workers keep both cores busy. tests/conftest.py keeps a module, and each shared deployment, on one worker.
TEST_WORKERS ?= 2
test: $(STAMP) browser
	$(FRESH) && $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# The multi-host test (network namespaces, an sshd per namespace) needs root and sshd: installed here
# when this is a Debian-like machine run as root; elsewhere the test skips and says why.
netns-deps:
	@command -v sshd >/dev/null || test -x /usr/sbin/sshd || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get install -y -q openssh-server >/dev/null; } || echo "sshd missing: the multi-host test will skip"

test-slow: $(STAMP) netns-deps
	$(FRESH) && $(BIN)/python -m pytest -q -m slow

# The docs site (mkdocs.yml, docs/): built offline; --strict turns every warning (a broken link, a page
# missing from the nav) into a failure.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d out/site

# The wheels fastsd's GPU self-check needs beyond a CUDA torch, for a GPU machine with no index (<= 60 MB,
# out/gpu-wheels; docs/gpu-check.md). GPU_PY: that machine's Python version (binary wheels are per version).
# GPU_WHEELS_MB: the size limit; optional groups (onnx + onnxruntime-gpu, triton) go in only while they fit.
GPU_PY ?= $(shell $(BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
GPU_WHEELS_MB ?= 60
gpu-wheels: $(STAMP)
	$(BIN)/python -m fastsd.bench.gpu_wheels --out out/gpu-wheels --python-version $(GPU_PY) --limit-mb $(GPU_WHEELS_MB)

# Installs out/gpu-wheels as the docs say into a new venv beside this machine's torch and runs fastsd there.
gpu-wheels-check: gpu-wheels
	$(BIN)/python -m fastsd.bench.gpu_wheels --check out/gpu-wheels --venv out/gpu-wheels-check

# The environment of the CPU peer's export (`fastsd bench --peer openvino-genai`, docs/benchmarks.md): optimum-intel
# with the transformers and diffusers it supports (constraints-peer.txt), apart from fastsd's. torch first, from the
# pinned CPU build. PyPI's torchvision (optimum-intel declares it) is a CUDA build whose ops fail to load beside the
# CPU torch and break transformers' imports; the SD export does not use it, so it is removed.
PEER_VENV ?= .venv-peer
$(PEER_VENV)/.installed: constraints-peer.txt
	test -x $(PEER_VENV)/bin/python || $(PY) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install -q -c constraints-peer.txt torch
	$(PEER_VENV)/bin/pip install -q -c constraints-peer.txt "optimum-intel[openvino,diffusers]"
	$(PEER_VENV)/bin/pip uninstall -q -y torchvision
	touch $@

peer-env: $(PEER_VENV)/.installed $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e ".[peer]"

clean:
	rm -rf $(VENV) $(PEER_VENV) out
