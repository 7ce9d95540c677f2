"""The library behind the paper's scripts, one sub-package per layer:

- base: flags and errors (choices, cli), progress, files (storage), the teacher's data and
  online SGD (training); it imports nothing above it;
- theory: order parameters, the expected loss over the mask distribution (expectations,
  mask_marginals) and the order-parameter ODEs of training;
- pipeline: the paper's workflow steps as functions (workflow), over base and theory;
- experiments: studies as data (study), their work units (sweep), where the units run
  (executors), and the run's tables, claims and figures;
- real_data: the MNIST / CIFAR-10 / digits experiments.

The scripts the paper's README names (teacher_dataset.py, teacher_student.py, evaluate.py)
and its two modules (models.py, dpp_sample_ts.py) stay at the repository's root.
"""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository's root
