"""Foundations: flag names (choices), one-line errors (cli), progress, safe files (storage),
the teacher and its data (data), online SGD (training) and the workflow steps (workflow)."""
