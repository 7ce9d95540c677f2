"""The generated tables of docs/, claims.md's title and vocabulary, and the shared figure style."""
import os
import subprocess
import sys

import matplotlib
import numpy as np
import pandas as pd
import pytest

import docs_tables
from dpp_pruning.experiments import claims

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "smoke_run")


@pytest.mark.parametrize("run, bench, docs", [
    ("tests/fixtures/smoke_run", "benchmarks/results.md", "docs/results"),
    ("docs/runs/student_width", None, "docs/student_width"),
    ("docs/runs/paper", None, "docs/paper"),
    ("docs/runs/finite_size", None, "docs/finite_size")])
def test_committed_tables_are_what_the_command_writes(tmp_path, run, bench, docs):
    regenerate = (f"python3 docs_tables.py {run}" + (f" --bench {bench}" if bench else "")
                  + f" --out {docs}")
    docs_tables.main([os.path.join(ROOT, run), "--out", str(tmp_path)]
                     + (["--bench", os.path.join(ROOT, bench)] if bench else []))
    written = sorted(os.listdir(tmp_path))
    assert written == sorted(os.listdir(os.path.join(ROOT, docs))), f"regenerate: `{regenerate}`"
    for name in (n for n in written if not n.endswith(".png")):     # figures: by name only
        with open(tmp_path / name, "rb") as new, open(os.path.join(ROOT, docs, name), "rb") as old:
            assert new.read() == old.read(), f"{docs}/{name} differs: `{regenerate}`"


def test_tables_are_headed_by_the_run():
    tables = docs_tables.build(FIXTURE)
    assert set(tables) == {"claims_K6_M2.md", "claims_K20_M2.md", "test_loss.md",
                           "expected_loss.md", "theory_loss.md"}
    with open(os.path.join(FIXTURE, "claims.md")) as f:
        date = claims.run_date(f.read())
    for text in tables.values():
        assert f"From study 'smoke': N = 20, P = 32000, 2 students, seed 1, run {date}." in text
        assert "not the paper-scale ones" in text
    grid = tables["claims_K6_M2.md"]
    assert "✓" not in grid and "?" not in grid and "FAILS" not in grid
    words = {cell.strip().rsplit(" ", 1)[0] for line in grid.splitlines()[10:]
             for cell in line.strip("|").split("|")[2:]}           # after claim, judged on
    assert words <= {"holds", "fails", "not resolved (2 students)"} and len(words) == 3


def test_loss_table_is_the_mean_over_students_of_the_means_over_rounds():
    results = pd.read_csv(os.path.join(FIXTURE, "results.csv"))
    cell = results[(results.noise == 0.25) & (results.student_h_size == 6)
                   & (results.method == "dpp_edge") & (results.reweighting == 1)
                   & (results.nodes_equivalent == 3) & (results.rescale == 1)]
    expected = cell.groupby("student").test_loss.mean().mean()
    lines = docs_tables.build(FIXTURE)["test_loss.md"].splitlines()
    header = next(line for line in lines if line.startswith("| σ |")).split("|")
    line = next(line for line in lines if line.startswith("| 0.25 | 6 | 2 | 1 | 1 | dpp_edge |"))
    assert line.split("|")[header.index(" 3 nodes ")].strip() == f"{expected:.4g}"


def test_a_folder_without_a_run_is_one_sentence(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "docs_tables.py"), str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith("results.csv is missing")
    assert len(done.stderr.strip().splitlines()) == 1


def test_claims_md_names_its_run_and_uses_one_vocabulary():
    rows = pd.read_csv(os.path.join(FIXTURE, "claims.csv")).to_dict("records")
    record = dict(name="paper", input_dim=500, num_data=800000, seed=3)
    text = claims.markdown(rows, record, "2030-01-31")
    first = text.splitlines()[0]
    assert first == ("# Claims of study 'paper': N = 500, P = 800000, 2 students, seed 3, "
                     "run 2030-01-31")
    assert claims.run_date(text) == "2030-01-31"
    assert "not the paper-scale ones" in text           # 2 students is below the paper's 5
    five = [dict(r, students=5) for r in rows]
    assert "not the paper-scale" not in claims.markdown(five, record, "2030-01-31")
    verdicts = {line.rsplit("|", 2)[1].strip() for line in text.splitlines()
                if line.startswith("| ") and "---" not in line and "claim" not in line}
    assert verdicts == {"holds", "fails", "not resolved (2 students)"}
    assert claims.label("not resolved at 1 student") == "not resolved (1 student)"
    assert claims.label("holds") == "holds"


def test_real_data_figure_has_the_shared_styles_and_percent_axes():
    from dpp_pruning.experiments import plots
    rows = pd.DataFrame([dict(method=m, reweighting=rw, fraction=f, test_error=e,
                              unpruned_test_error=2.4)
                         for m in plots.METHOD_STYLE for rw in (0, 1)
                         for f, e in ((0.1, 60.0), (0.5, 6.0), (0.9, 2.5))])
    fig = plots.figure_test_error(rows, "digits")
    ax = fig.axes[0]
    styles = {line.get_label(): (matplotlib.colors.to_hex(line.get_color()), line.get_marker())
              for line in ax.get_lines() if line.get_label() in plots.METHOD_STYLE}
    assert styles == {m: (matplotlib.colors.to_hex(c), mk)
                      for m, (c, mk) in plots.METHOD_STYLE.items()}
    # percent axes read as percent, never as powers of ten
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert labels and all(t.endswith("%") and "10^" not in t for t in labels)
    assert {"5%", "10%", "20%", "50%"} <= set(labels)
    assert all(t.get_text().endswith("%") for t in ax.get_xticklabels() if t.get_text())


def test_loss_figure_keeps_error_bars_inside_and_shares_the_styles(tmp_path):
    import shutil

    from dpp_pruning.experiments import figures, plots
    out = tmp_path / "run"
    shutil.copytree(FIXTURE, out)
    run = figures.Run(str(out))
    fig, ax = matplotlib.pyplot.subplots()
    figures.plot_loss_vs_budget(run, ax, 0.0, 6)
    low, high = ax.get_ylim()
    points = {c.get_label().split(": ")[0]: c for c in ax.containers}
    assert len(points) == 6
    for method, bars in points.items():
        data, _, (errors,) = bars.lines
        ys = np.concatenate([s[:, 1] for s in errors.get_segments()])
        assert ys.min() >= low * (1 - 1e-9) and ys.min() > 0     # cut at the log axis
        color, marker = plots.METHOD_STYLE[method]
        assert (matplotlib.colors.to_hex(data.get_color()), data.get_marker()) == \
            (matplotlib.colors.to_hex(color), marker)
    xs = {tuple(np.round(np.asarray(c.lines[0].get_xdata(), dtype=float), 6))
          for c in points.values()}
    assert len(xs) == 6                                  # shifted apart, none hides another


def test_fixture_holds_only_small_text_files():
    assert {os.path.splitext(f)[1] for f in os.listdir(FIXTURE)} <= {".csv", ".json", ".md"}
    assert sum(os.path.getsize(os.path.join(FIXTURE, f)) for f in os.listdir(FIXTURE)) < 400_000


def test_node_methods_sit_beside_their_budget_not_between_budgets():
    """Figure 2 shifts the node methods apart a little; the edge methods' budgets (tens of
    weights) must not widen that shift beyond a fraction of a node."""
    from dpp_pruning.experiments import figures
    fig = figures.figure_node_methods(figures.Run(FIXTURE))
    points = [c for c in fig.axes[0].containers if c.get_label().endswith("_node: simulation")]
    assert len(points) == 3
    for bars in points:
        xs = np.asarray(bars.lines[0].get_xdata(), dtype=float)
        assert np.all(np.abs(xs - np.round(xs)) < 0.1), (bars.get_label(), xs)


def test_tables_count_the_students_the_claims_were_judged_on(tmp_path):
    """A run with --students 1 on a folder of two judges one student: claims.md and every
    generated table say 1, though results.csv holds both."""
    import shutil

    import reproduce
    out = tmp_path / "run"
    shutil.copytree(FIXTURE, out)
    reproduce.main(["--preset", "smoke", "--students", "1", "--out", str(out),
                    "--methods", "random_node", "--rounds", "2"])
    assert (out / "claims.md").read_text().startswith(
        "# Claims of study 'smoke': N = 20, P = 32000, 1 student, seed 1, run ")
    for name, text in docs_tables.build(str(out)).items():
        assert ", 1 student, seed 1, run " in text.splitlines()[2], name
