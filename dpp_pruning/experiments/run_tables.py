"""The CSV tables of a reproduce.py run, rebuilt from its finished work units.

- results.csv: one row per cell, reweighting and round (measured and predicted test loss of
  that round's masks, and the expected test loss over the mask distribution);
- expectations.csv: one row per student, dataset, panel, rescaling, method, budget and
  reweighting (the expected test loss, its first-order value and its spread over masks);
- specialisation.csv: per student, dataset and panel, how many student nodes serve each
  teacher node and their outgoing weights;
- theory.csv: one row per student, dataset, panel, rescaling, method (all six), budget and
  reweighting: the test loss at N → ∞ from the training ODEs and the pruning theory alone.
results.csv and expectations.csv carry two theory columns beside `expected`: `theory` (that
N → ∞ prediction) and `theory_trained` (the pruning theory at the trained student's own
order parameters, without the training ODEs), so that a gap between simulation and theory
can be told apart as the pruning theory's or the training ODEs'.
Finished files are parsed once and kept, so rewriting the tables after every unit stays cheap.
"""
import csv
import glob
import io
import math
import os
import zipfile

import numpy as np

from dpp_pruning.base.storage import atomic_open
from dpp_pruning.experiments import sweep

RESULT_COLUMNS = ("student", "noise", "teacher_h_size", "student_h_size", "rescale", "method",
                  "reweighting", "k", "nodes_equivalent", "fraction_kept", "round", "test_loss",
                  "predicted_loss", "test_loss_std", "expected", "expected_first_order",
                  "theory_trained", "theory", "unpruned_test_loss", "unpruned_predicted_loss")
EXPECTATION_COLUMNS = ("student", "noise", "teacher_h_size", "student_h_size", "rescale",
                       "method", "reweighting", "k", "nodes_equivalent", "fraction_kept",
                       "expected", "expected_first_order", "expected_sd", "theory_trained",
                       "theory", "unpruned_expected")
THEORY_COLUMNS = ("student", "noise", "teacher_h_size", "student_h_size", "rescale", "method",
                  "reweighting", "k", "nodes_equivalent", "fraction_kept", "theory",
                  "unpruned_theory")
SPECIALISATION_COLUMNS = ("student", "noise", "teacher_h_size", "student_h_size", "rescale",
                          "teacher_node", "student_nodes", "summed_v", "effective_v")


def _order(unit):
    """Sort key: student, noise, teacher size, then (cells) panel, method, budget, rescaling."""
    if isinstance(unit, sweep.Dataset):
        return (unit.student, unit.noise, unit.teacher_h_size or 0)
    return (_order(unit.dataset) + (unit.student_h_size, sweep.ALL_METHODS.index(unit.method),
                                    unit.k, -unit.rescale))


def _group_fields(study, group):
    d = group.dataset
    return dict(student=d.student, noise=d.noise, teacher_h_size=sweep.teacher_size(study, d),
                student_h_size=group.student_h_size, rescale=group.rescale)


class UnitFileError(ValueError):
    """A unit's file in the run folder that cannot be read or does not hold its unit."""


class RunTables:
    """The tables of one run folder, from every finished unit in it (whatever invocation
    made it: more students, the other rescaling, another teacher size); `add` a unit that
    has just finished, then `write`.

    Every unit file is verified when it is read: one that cannot be read (truncated, say, by
    a disk that filled up) or that holds another unit than its name says is not used, and
    `unusable` says why (path -> reason), so that its unit runs again. A file whose name
    would also name a unit of another setting (an earlier release named σ = 0.25 and
    0.2500001 alike) raises UnitFileError: the folder cannot be used."""

    def __init__(self, study, out):
        self.study, self.out = study, out
        self._cell_rows = {}        # cell -> list of row dicts (without the expectation)
        self._group_rows = {}       # group -> list of expectation row dicts
        self._special = {}          # group -> list of specialisation row dicts
        self._theory_rows = {}      # theory unit -> list of theory row dicts
        self.unusable = {}          # path -> why its unit runs again
        for kind in ("cells", "expectations", "theory"):
            for path in sorted(glob.glob(os.path.join(out, "student_*", kind, "*.npz"))):
                try:
                    self._parse(path)
                except UnitFileError as e:
                    self.unusable[path] = str(e)

    @property
    def cells(self):
        return sorted(self._cell_rows, key=_order)

    @property
    def groups(self):
        return sorted(self._group_rows,
                      key=lambda g: _order(g.dataset) + (g.student_h_size, -g.rescale))

    def done(self, unit):
        """Whether `unit` is finished: its file was read, and a group's or theory unit's file
        holds every row the study asks of it (a grown panel asks more)."""
        if isinstance(unit, sweep.Cell):
            return unit in self._cell_rows
        if isinstance(unit, sweep.Theory):
            held = {(r["rescale"], sweep.ALL_METHODS.index(r["method"]), r["nodes_equivalent"],
                     r["reweighting"]) for r in self._theory_rows.get(unit, ())}
            return bool(held) and set(sweep.theory_wanted(self.study, unit)) <= held
        if unit not in self._group_rows:
            return False
        held = {(sweep.ALL_METHODS.index(r["method"]), r["k"], r["nodes_equivalent"],
                 r["reweighting"]) for r in self._group_rows[unit]}
        return set(sweep.group_rows(self.study, unit)) <= held

    def add(self, unit):
        """Parse the file of a unit that has just finished."""
        self._parse(_KINDS[type(unit)][0](self.out, unit))

    def _parse(self, path):
        """Read one unit file into the tables, verifying it; UnitFileError if it cannot be
        used (a name clash with another unit's setting is raised as is, with its own
        message)."""
        kind = os.path.basename(os.path.dirname(path))
        unit_path, from_meta, read, _ = next(v for v in _KINDS.values() if v[3] == kind)
        try:
            with np.load(path) as z:
                unit = from_meta(z["meta"])
                rows = read(self, unit, z)
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
            raise UnitFileError(f"it cannot be read ({type(e).__name__}: truncated, damaged or "
                                "written by an earlier release)") from None
        name = os.path.basename(path)[:-len(".npz")]
        if os.path.abspath(unit_path(self.out, unit)) != os.path.abspath(path):
            if kind == "cells" and name.startswith(unit.group.name + "_"):
                raise UnitFileError(f"it holds {unit.name}, named otherwise by an earlier "
                                    "release")
            raise sweep.RunFolderError(
                f"{path} holds the unit {unit.name} of another setting than its name says "
                "(an earlier release gave two noise levels one name); use another --out")
        if kind == "cells":
            self._cell_rows[unit] = rows
        elif kind == "theory":
            self._theory_rows[unit] = rows
        else:
            self._group_rows[unit], self._special[unit] = rows

    def _cell_file_rows(self, cell, z):
        study = self.study
        rows = []
        for rw in study.reweighting:
            for rnd in range(study.rounds):
                losses = z[f"losses_rw{rw}_round{rnd}"]
                rows.append(dict(
                    **_group_fields(study, cell.group), method=cell.method, reweighting=rw,
                    k=cell.k, nodes_equivalent=cell.nodes_equivalent,
                    fraction_kept=sweep.fraction_kept(cell.method, cell.k, study.input_dim,
                                                      cell.student_h_size),
                    round=rnd, test_loss=float(losses.mean()),
                    predicted_loss=float(z[f"predicted_rw{rw}_round{rnd}"].mean()),
                    test_loss_std=float(losses.std()),
                    unpruned_test_loss=float(z["unpruned_loss"]),
                    unpruned_predicted_loss=float(z["unpruned_predicted"])))
        return rows

    def _group_file_rows(self, group, z):
        study = self.study
        fields = _group_fields(study, group)
        rows = [dict(**fields, method=sweep.ALL_METHODS[int(m)], reweighting=int(rw), k=int(k),
                     nodes_equivalent=int(nodes),
                     fraction_kept=sweep.fraction_kept(sweep.ALL_METHODS[int(m)], int(k),
                                                       study.input_dim, group.student_h_size),
                     expected=value, expected_first_order=first, expected_sd=sd,
                     theory_trained=trained, unpruned_expected=float(z["unpruned_expected"]))
                for m, k, nodes, rw, value, first, sd, trained in z["rows"]]
        special = [dict(**fields, teacher_node=n, student_nodes=int(c), summed_v=float(s),
                        effective_v=float(e))
                   for n, (c, s, e) in enumerate(zip(z["counts"], z["summed"], z["effective"],
                                                     strict=True))]
        return rows, special

    def _theory_file_rows(self, unit, z):
        study, size = self.study, unit.student_h_size
        unpruned = float(z["unpruned_theory"])
        rows = []
        for rescale, m, nodes, rw, value in z["rows"]:
            method = sweep.ALL_METHODS[int(m)]
            k = sweep.budget(method, int(nodes), study.input_dim, size)
            rows.append(dict(**_group_fields(study, sweep.Group(unit.dataset, size,
                                                                int(rescale))),
                             method=method, reweighting=int(rw), k=k,
                             nodes_equivalent=int(nodes),
                             fraction_kept=sweep.fraction_kept(method, k, study.input_dim, size),
                             theory=value, unpruned_theory=unpruned))
        return rows

    def theory_rows(self):
        """Rows of every theory unit, by data set and panel; within a unit, by rescaling
        (1 first), method, budget and reweighting, as its file holds them."""
        units = sorted(self._theory_rows, key=lambda u: _order(u.dataset) + (u.student_h_size,))
        return [row for u in units for row in self._theory_rows[u]]

    def _theory_lookup(self):
        """(student, noise, M, K, rescale, method, nodes kept, reweighting) -> theory."""
        return {_setting(row): row["theory"] for rows in self._theory_rows.values()
                for row in rows}

    def expectation_rows(self):
        theory = self._theory_lookup()
        return [dict(row, theory=theory.get(_setting(row), math.nan))
                for g in self.groups if g in self._group_rows for row in self._group_rows[g]]

    def specialisation_rows(self):
        return [row for g in self.groups if g in self._special for row in self._special[g]]

    def result_rows(self):
        lookup = {_setting(row): row for rows in self._group_rows.values() for row in rows}
        theory = self._theory_lookup()
        out = []
        for cell in self.cells:
            for row in self._cell_rows.get(cell, ()):
                found = lookup.get(_setting(row), {})
                out.append(dict(row, **{key: found.get(key, math.nan) for key in (
                    "expected", "expected_first_order", "theory_trained")},
                    theory=theory.get(_setting(row), math.nan)))
        return out

    def write(self):
        """Rewrite the four tables (atomically); returns the path of results.csv."""
        for name, columns, rows in (("results.csv", RESULT_COLUMNS, self.result_rows()),
                                    ("expectations.csv", EXPECTATION_COLUMNS,
                                     self.expectation_rows()),
                                    ("specialisation.csv", SPECIALISATION_COLUMNS,
                                     self.specialisation_rows()),
                                    ("theory.csv", THEORY_COLUMNS, self.theory_rows())):
            write_csv(os.path.join(self.out, name), columns, rows)
        return os.path.join(self.out, "results.csv")


def _setting(row):
    """The key of a row's setting: student, noise, M, K, rescale, method, nodes, reweighting."""
    return tuple(row[k] for k in ("student", "noise", "teacher_h_size", "student_h_size",
                                  "rescale", "method", "nodes_equivalent", "reweighting"))


_KINDS = {   # unit type -> (its file's path, its unit from the file's meta, its rows, folder)
    sweep.Cell: (sweep.cell_path, sweep.cell_from_meta, RunTables._cell_file_rows, "cells"),
    sweep.Group: (sweep.group_path, sweep.group_from_meta, RunTables._group_file_rows,
                  "expectations"),
    sweep.Theory: (sweep.theory_path, sweep.theory_from_meta, RunTables._theory_file_rows,
                   "theory"),
}


def write_csv(path, columns, rows):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    with atomic_open(path, "w") as f:
        f.write(buffer.getvalue())
