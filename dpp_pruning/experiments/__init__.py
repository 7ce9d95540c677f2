"""Studies: the grid as data (study), its work units and seeds (sweep), where they run
(executors), and the run's tables (run_tables), claims and figures (figures, plots)."""
