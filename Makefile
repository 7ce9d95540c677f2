# The README's two commands: `make demo` (set-up + the main job at a small size) and
# `make test` (set-up + the test suite). Set-up is `pip install -r requirements.txt`,
# redone only when requirements.txt changes.
PYTHON ?= python3

.PHONY: install demo test lint bench reproduce clean

install: .installed

.installed: requirements.txt
	$(PYTHON) -m pip install -r requirements.txt
	touch .installed

demo: install
	$(PYTHON) demo.py

test: install
	$(PYTHON) -m pytest -q

lint: install
	$(PYTHON) -m ruff check .

bench: install
	$(PYTHON) benchmarks/run.py

reproduce: install
	$(PYTHON) reproduce.py --preset small --out runs/small

clean:
	rm -rf demo_out runs .installed
