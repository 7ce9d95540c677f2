"""Foundations, importing nothing else of the package: flag names (choices), one-line errors
(cli), progress, safe files (storage), the teacher and its data (data) and online SGD
(training)."""
