"""The real-data sets in memory: scikit-learn's digits (offline) and torchvision's MNIST and
CIFAR-10 read from --data_root.

- `digits`: scikit-learn's bundled 8x8 digits (1797 images, offline), pixels scaled to
  [0, 1], a fixed stratified split of 1347 training / 450 test images; MLP 64-100-100-10.
- `mnist`, `cifar10`: torchvision's MNIST / CIFAR10 read from `data_root` (downloaded there
  with `download=True`), pixels scaled to [0, 1] (what `transforms.ToTensor` gives, no
  further normalisation), flattened in (C, H, W) order; MLPs 784-500-500-10 and
  3072-1000-1000-1000-10.
Everything is held in memory as float32 tensors and batched by index, not by a DataLoader.
A missing or unreadable data set is a UserError that says where to put the files.
"""
import os
from dataclasses import dataclass

import numpy as np
import torch

from dpp_pruning.base.cli import UserError
from models import MLP_SIZES

DATASETS = tuple(MLP_SIZES)                      # digits, mnist, cifar10

DIGITS_TEST_SIZE = 450
DIGITS_SPLIT_SEED = 0


@dataclass
class Data:
    """A dataset in memory: x (P, D) float32 in [0, 1], y (P,) int64 class labels."""
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def input_dim(self):
        return self.x_train.shape[1]


# The files torchvision reads (without download) and the folder it expects them in.
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                 "data_batch_5", "test_batch", "batches.meta")


def dataset_folder(name, data_root):
    """The folder under data_root where torchvision looks for the dataset's files."""
    if name == "mnist":
        return os.path.join(data_root, "MNIST", "raw")
    if name == "cifar10":
        return os.path.join(data_root, "cifar-10-batches-py")
    raise ValueError(f"{name} is not read from files")


def load_dataset(name, data_root="./data", download=False):
    """Load `name` (digits, mnist or cifar10) -> Data. Raises UserError for missing files."""
    if name not in DATASETS:
        raise UserError(f"--dataset must be one of {', '.join(DATASETS)}, got {name!r}")
    if name == "digits":
        return _load_digits()
    return _load_torchvision(name, data_root, download)


def _load_digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)                                   # (1797, 64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, bunch.target, test_size=DIGITS_TEST_SIZE, random_state=DIGITS_SPLIT_SEED,
        stratify=bunch.target)
    return Data("digits", torch.from_numpy(x_tr), torch.from_numpy(y_tr).long(),
                torch.from_numpy(x_te), torch.from_numpy(y_te).long())


def _where_to_put(name, data_root):
    folder = dataset_folder(name, data_root)
    files = MNIST_FILES if name == "mnist" else CIFAR10_FILES
    what = "MNIST idx-ubyte files (uncompressed)" if name == "mnist" else \
        "CIFAR-10 python batches"
    return (f"put the {what} {', '.join(files)} in {folder} (the folder torchvision expects "
            f"under --data_root {data_root})")


def _missing_message(name, data_root):
    return (f"{name} was not found: {_where_to_put(name, data_root)}, or add --download to "
            "fetch them")


def _load_torchvision(name, data_root, download):
    from torchvision import datasets
    cls = datasets.MNIST if name == "mnist" else datasets.CIFAR10
    folder = dataset_folder(name, data_root)
    files = MNIST_FILES if name == "mnist" else CIFAR10_FILES
    present = [f for f in files if os.path.isfile(os.path.join(folder, f))]
    if not download and len(present) < len(files):
        message = _missing_message(name, data_root)
        gz = [f for f in files if os.path.isfile(os.path.join(folder, f + ".gz"))]
        if name == "mnist" and gz:
            message += f" (found {gz[0]}.gz there: gunzip the .gz files in place)"
        raise UserError(message)
    try:
        train = cls(data_root, train=True, download=download)
        test = cls(data_root, train=False, download=download)
    except RuntimeError as e:
        if download and len(present) < len(files):
            raise UserError(f"downloading {name} into {data_root} failed ({_short(e)}); "
                            f"{_where_to_put(name, data_root)} by hand") from None
        if name == "cifar10":
            raise UserError(f"the CIFAR-10 files in {folder} fail torchvision's md5 check (not "
                            "the official batches, or corrupted); replace them with the "
                            "official cifar-10-batches-py or delete them and use "
                            "--download") from None
        raise UserError(f"torchvision cannot read {name} from {folder} ({_short(e)}); "
                        "replace the files or use --download") from None
    except OSError as e:  # URLError and friends: no network
        raise UserError(f"downloading {name} failed ({_short(e)}); "
                        f"{_where_to_put(name, data_root)} by hand") from None
    except (ValueError, TypeError, AssertionError, EOFError) as e:
        raise UserError(f"the {name} files in {folder} cannot be read ({type(e).__name__}); "
                        "replace them or use --download") from None
    return Data(name, *_tensors(name, train), *_tensors(name, test))


def _short(error):
    """One line of at most 100 characters describing an exception."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:100]}" if text else type(error).__name__


def _tensors(name, ds):
    """torchvision dataset -> x (P, D) float32 in [0, 1] (C, H, W order), y (P,) int64."""
    if name == "mnist":
        x = torch.as_tensor(ds.data).reshape(len(ds.data), -1)                   # (P, 784)
    else:
        x = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
        x = x.reshape(x.shape[0], -1)                                            # (P, 3072)
    return x.float().div_(255.0), torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)
