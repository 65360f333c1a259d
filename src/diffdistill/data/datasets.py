"""The data sets by name: one split of ``digits``, ``mnist``, ``cifar100``, ``tinyimagenet`` or ``folder`` (your
own, in the ImageFolder layout) as a :class:`~diffdistill.data.LabeledImages`, from the reader module of each."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffdistill.data import cifar100, digits, folder, mnist, tinyimagenet
from diffdistill.data import LabeledImages, check_split
from diffdistill.errors import DiffdistillError
from diffdistill.settings import setting

DATASETS = ("digits", "mnist", "cifar100", "tinyimagenet", "folder")
EMBEDDED = ("digits", "mnist")  # shipped inside a Python package: no data root, nothing to download


@dataclass
class DataSource:
    """Where the raw data set is (the reading of a folder data set: :class:`~diffdistill.data.folder.FolderSettings`)."""

    root: str = setting(flag=False, description=(
        "folder holding cifar-100-python/, tiny-imagenet-200/ or a folder data set (unused for digits and mnist)"))
    download: bool = setting(flag=False, description="true: fetch the data set into root when missing (needs network)")


def prepare_dataset(name: str, root, split: str, download: bool = False) -> LabeledImages:
    """One split of a named data set (``DATASETS``); ``root`` is unused for the ``EMBEDDED`` ones; ``folder`` is read
    with the default :class:`~diffdistill.data.folder.FolderSettings` (the workflow uses ``folder.read_folder``)."""
    check_split(split)
    if name == "digits":
        return digits.load_digits_split(split)
    if name == "mnist":
        return mnist.load_mnist_split(split)
    if name == "folder":  # both splits are read: the inferred channel count is the data set's, not a split's
        return folder.read_folder(root)[split]
    if name not in DATASETS:
        raise DiffdistillError(f"data set {name!r}: expected one of {DATASETS}")
    if download:
        download_to = cifar100.download_cifar100 if name == "cifar100" else tinyimagenet.download_tiny_imagenet
        download_to(_require_download_root(root))
    reader = cifar100.read_cifar100 if name == "cifar100" else tinyimagenet.read_tiny_imagenet
    data = reader(root, split)
    data.name, data.split = name, split
    return data


def _require_download_root(root) -> Path:
    if root is None:
        raise DiffdistillError("--download needs a data root (the folder to download into)")
    return Path(root)
