"""Studies: the grid as data (study), its work units and seeds (sweep), where they run
(executors), a run of a study (runner), and its tables (run_tables), claims and figures
(figures, plots)."""
