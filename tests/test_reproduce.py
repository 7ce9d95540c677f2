"""reproduce.py resumes an interrupted sweep, and every notebook runs on the smoke preset."""
import csv

import nbformat
import pytest
from nbclient import NotebookClient

import reproduce
import sweep


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    reproduce.main(["--preset", "smoke", "--out", str(out)])
    return out


def test_results_csv_has_one_row_per_cell_and_round(smoke_run):
    preset = sweep.PRESETS["smoke"]
    with open(smoke_run / "results.csv") as f:
        rows = list(csv.DictReader(f))
    cells = sweep.grid(preset)
    assert len(rows) == len(cells) * preset.rounds * len(preset.reweighting)
    assert set(rows[0]) == set(sweep.COLUMNS)
    for row in rows:
        assert 0 < float(row["fraction_kept"]) <= 1
        assert float(row["test_loss"]) > 0 and float(row["predicted_loss"]) > 0


def test_interrupted_sweep_resumes_without_redoing_cells(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    args = ["--preset", "smoke", "--out", out, "--methods", "random_node,importance_edge"]
    real_run_cell, calls = sweep.run_cell, []

    def interrupt_after_three(preset, out_, cell, seed):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(cell.name)
        return real_run_cell(preset, out_, cell, seed)

    monkeypatch.setattr(sweep, "run_cell", interrupt_after_three)
    with pytest.raises(KeyboardInterrupt):
        reproduce.main(args)
    done = sorted(p.name for p in (tmp_path / "run" / "cells").iterdir())
    assert len(done) == 3
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "cells").iterdir()}

    calls.clear()
    monkeypatch.setattr(sweep, "run_cell", lambda *a: calls.append(a[2].name) or real_run_cell(*a))
    reproduce.main(args)
    total = len(sweep.grid(sweep.PRESETS["smoke"], ["random_node", "importance_edge"]))
    assert len(calls) == total - 3 and not set(calls) & {d[:-4] for d in done}
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_reused_folder_of_another_preset_is_refused(smoke_run):
    from cli import UserError
    with pytest.raises(UserError, match="another preset"):
        reproduce.main(["--preset", "smoke", "--out", str(smoke_run), "--seed", "2"])


@pytest.mark.parametrize("name", ["1_test_loss_vs_parameters", "2_node_methods",
                                  "3_order_parameter_heatmaps", "4_theory_vs_simulation"])
def test_notebook_runs_on_smoke_preset(name, smoke_run, root, monkeypatch):
    monkeypatch.setenv("REPRO_PRESET", "smoke")
    monkeypatch.setenv("REPRO_OUT", str(smoke_run))
    nb = nbformat.read(root / "notebooks" / f"{name}.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(root / "notebooks")}}).execute()
    first = "".join(o.get("text", "") for o in nb.cells[0].outputs)
    assert "preset 'smoke'" in first
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]
    assert images
