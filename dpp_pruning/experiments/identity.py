"""What a process would run a study's units with, as the check before a Dask run compares it
(executors.DaskPool.check): the project's source (a hash of the root modules and the
dpp_pruning package as this process imports them), the libraries' versions, a numerical probe
of the bits it computes, its memory, and whether it sees a run folder (a token file)."""
import functools
import hashlib
import importlib.metadata
import os
import socket

from dpp_pruning import ROOT
from dpp_pruning.base import cli


def source_files(root=ROOT):
    """The project's source as a worker imports it: every module at the root (models.py,
    dpp_sample_ts.py, the scripts) and every module of the dpp_pruning package, as paths
    relative to `root`, sorted."""
    found = [name for name in os.listdir(root) if name.endswith(".py")]
    for folder, _, names in os.walk(os.path.join(root, "dpp_pruning")):
        found += [os.path.relpath(os.path.join(folder, n), root) for n in names
                  if n.endswith(".py")]
    return sorted(found)


def source_hash(root=ROOT):
    """SHA-256 (16 hex digits) of the project's source files, names and contents."""
    digest = hashlib.sha256()
    for rel in source_files(root):
        with open(os.path.join(root, rel), "rb") as f:
            digest.update(rel.encode() + b"\0" + f.read() + b"\0")
    return digest.hexdigest()[:16]


LIBRARIES = ("torch", "numpy", "scipy", "numba", "dppy", "threadpoolctl")


def library_versions():
    return {name: importlib.metadata.version(name) for name in LIBRARIES}


@functools.lru_cache(maxsize=1)
def numeric_probe():
    """A hash of a tiny study's numbers, computed on one thread as units are: a teacher data
    set (labels and Gram matrix), a trained student (the numba SGD kernel), a dpp_edge
    kernel's eigendecomposition (LAPACK) and the batched test losses and hidden activations
    of pruned students (torch's float32 products). Two processes that disagree here would
    write other bytes for the same unit (another CPU type or math library)."""
    def compute():
        import numpy as np

        from dpp_pruning.base.data import generate_teacher
        from dpp_pruning.pipeline import workflow
        from dpp_sample_ts import edge_kernel, eig_kernel
        teacher = generate_teacher(24, 2, 4096, sig_w=0.25, seed=7)
        student = workflow.train(teacher, 3, seed=7)
        w1 = student.w1.weight.detach().double().numpy()                   # (3, 24)
        w2 = student.w2.weight.detach().double().numpy().ravel()
        eigvals, eigvecs = eig_kernel(edge_kernel(w1[0], teacher.gram.numpy()))
        masks = np.random.default_rng(7).random((4,) + w1.shape) < 0.5     # (4, 3, 24)
        losses = workflow.test_weights(teacher, w1 * masks, np.tile(w2, (4, 1)))
        digest = hashlib.sha256()
        for array in (teacher.labels.numpy(), teacher.gram.numpy(), w1, eigvals,
                      np.abs(eigvecs), losses, workflow.test_activations(teacher, student)):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()[:16]
    from dpp_pruning.experiments.executors import one_thread
    return one_thread(compute)


def code_identity():
    """The code this process imports: host, project root, source hash, library versions
    (what a Dask scheduler needs to agree on: it unpickles the units' task graphs)."""
    return dict(host=socket.gethostname(), root=ROOT, code=source_hash(),
                versions=library_versions())


def identity(folder=None, token=None):
    """What this process runs units with, before any computation: `code_identity`, the
    memory available, and whether it reads `token` from `folder`'s token file (None: not
    asked). `numeric_probe` is asked apart, once the code is known to be the same."""
    found = dict(code_identity(), memory=cli.available_memory())
    if folder is not None:
        try:
            with open(os.path.join(folder, TOKEN_FILE)) as f:
                found["sees_folder"] = f.read() == token
        except OSError:
            found["sees_folder"] = False
    return found


TOKEN_FILE = ".worker_check"


def compare_identity(who, theirs, ours):
    """The one-line problem of a process whose identity differs from this client's, or None."""
    if theirs["code"] != ours["code"]:
        return (f"{who} runs other code than this client (the project at {theirs['root']} on "
                f"{theirs['host']} hashes to {theirs['code']}, this checkout to {ours['code']}):"
                " install the same checkout on every node (pip install -e .)")
    differ = [f"{name} {theirs['versions'][name]} (here {version})"
              for name, version in ours["versions"].items()
              if theirs["versions"].get(name) != version]
    if differ:
        return (f"{who} on {theirs['host']} has other libraries than this client: "
                f"{', '.join(differ)}; install requirements.txt in every node's environment")
    return None


def compare_numbers(who, host, theirs, ours):
    """The one-line problem of a worker whose numerical probe differs from this client's."""
    if theirs != ours:
        return (f"{who} on {host} computes other bits than this client for the same "
                "numbers (another CPU type or math library), so its units would not be the "
                "bytes of a local run: use nodes of this machine's kind, or set "
                "MKL_CBWR=COMPATIBLE for the client and every worker (docs/reproducibility.md)")
    return None
