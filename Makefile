# Two commands set everything up on a fresh Linux machine:
#   make demo   - the main job on the shipped sample data (napari when there is a display, else headless PNG)
#   make test   - the whole test suite (viewer tests under a virtual X server)
# Override the torch requirement, e.g.  make test TORCH="torch==2.13.0"

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell echo '$(TORCH)' | tr -c 'A-Za-z0-9.=\n' '_')
PYTEST_ARGS ?=

.PHONY: all demo test install sysdeps clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first (the pinned CPU build by default), then everything else constrained to that torch,
# so that no other package can pull a different (CUDA) torch in.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[all]"
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

sysdeps:
	@bash scripts/system_deps.sh

test: install sysdeps
	@bash scripts/run_tests.sh $(PYTEST_ARGS)

demo: install sysdeps
	@bash scripts/run_demo.sh

clean:
	rm -rf $(VENV) build dist *.egg-info demo_output
