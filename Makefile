# Two commands set everything up on a fresh Linux machine:
#   make demo   - the sample slide in napari with the plugin (no display: a PNG rendered by napari
#                 in demo_output/tissue.png and demo_output/summary.json)
#   make test   - the whole test suite (viewer tests under a virtual X server) and the packaging check
# Both create .venv (torch first, pinned, then everything constrained to it) and install the system
# libraries Qt / OpenGL need when allowed to. Overrides, e.g.:
#   make test TORCH="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu126
#   make demo DEMO_ARGS="--sample starmap"        make test PYTEST_ARGS="-k reader -x"

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell echo '$(TORCH)' | tr -c 'A-Za-z0-9.=\n' '_')
PYTEST_ARGS ?=
DEMO_ARGS ?=

export PYTHON VENV TORCH TORCH_INDEX DEMO_ARGS

.PHONY: all demo test test-only install sysdeps check-package clean

all: test

# Re-run the install whenever pyproject.toml changes (new dependencies) or TORCH changes.
$(STAMP): pyproject.toml scripts/install_env.sh
	@bash scripts/install_env.sh
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

sysdeps:
	@bash scripts/system_deps.sh

test: install sysdeps
	@PY=$(PY) bash scripts/run_tests.sh $(PYTEST_ARGS)
	@PY=$(PY) bash scripts/check_package.sh

# the suite alone, without (re)installing anything
test-only:
	@PY=$(PY) bash scripts/run_tests.sh $(PYTEST_ARGS)

check-package: install
	@PY=$(PY) bash scripts/check_package.sh

demo: install sysdeps
	@PY=$(PY) bash scripts/run_demo.sh

clean:
	rm -rf $(VENV) build dist *.egg-info demo_output
