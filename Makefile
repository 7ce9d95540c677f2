# The README's two commands: `make demo` (set-up + the main job at a small size) and
# `make test` (set-up + the test suite). Set-up is `pip install -r requirements.txt` and
# `pip install -e .` (the project itself, importable from any working directory), redone
# only when requirements.txt or pyproject.toml changes.
PYTHON ?= python3

.PHONY: install demo test lint bench reproduce clean

install: .installed

.installed: requirements.txt pyproject.toml
	$(PYTHON) -m pip install -r requirements.txt
	$(PYTHON) -m pip install --no-deps -e .
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

# what `make`, the README's commands and the notebooks write into the checkout
clean:
	rm -rf demo_out runs .installed *.egg-info
	rm -f teacher*.pkl student_*.pth student_masks_*.pkl dpp_edge_kernels_*.pkl \
	    order_params_*.png training_curve_*.csv *_mlp.pth real_data_results.csv
