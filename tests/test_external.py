"""Sets you bring and the image-folder export: a package written as PNGs and read back (as a set you
bring, by torchvision's ImageFolder and by our folder reader) is the same tensor, and every bad input
is refused before any training with the file and what was expected."""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from diffdistill import atomic
from diffdistill.data import LabeledImages
from diffdistill.data.folder import FolderSettings, decode_images, list_split
from diffdistill.data.normalize import channel_stats, normalize
from diffdistill.errors import DiffdistillError
from diffdistill.evaluation import external
from diffdistill.packaging.image_folder import export_image_folder


def labelled(classes, per_class, channels=1, side=8, seed=0):
    """Random uint8 images, ``per_class`` of each class, class-major."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (len(classes) * per_class, channels, side, side), generator=g, dtype=torch.uint8)
    labels = torch.arange(len(classes)).repeat_interleave(per_class)
    return LabeledImages(images, labels, list(classes), "test", "test")


@pytest.fixture
def grey():
    """A 1-channel 8x8 test split and a package of IPC 3 made from other images, normalised like ours."""
    test = labelled([str(i) for i in range(4)], 5)
    mean, std = channel_stats(test.images)
    package = normalize(labelled(test.classes, 3, seed=1).images, mean, std)
    return test, mean, std, package


@pytest.mark.parametrize("channels", [1, 3])
def test_a_package_exported_as_pngs_reads_back_as_the_same_tensor(tmp_path, channels):
    test = labelled(["cat", "dog", "ant"], 2, channels=channels)  # not in sorted order: read by name
    mean, std = channel_stats(test.images)
    package = normalize(labelled(test.classes, 4, channels=channels, seed=1).images, mean, std)
    assert export_image_folder(package, test.classes, mean, std, tmp_path / "images") == 12
    assert sorted(p.name for p in (tmp_path / "images" / "train").iterdir()) == ["ant", "cat", "dog"]
    x, ipc, form = external.read_external_set(tmp_path / "images", test, mean, std)
    assert (ipc, form) == (4, "folder")
    assert torch.equal(x, package)


def test_the_export_loads_with_imagefolder_and_our_folder_reader(tmp_path, grey):
    from torchvision.datasets import ImageFolder

    test, mean, std, package = grey
    export_image_folder(package, test.classes, mean, std, tmp_path / "images")
    pixels = ((package * torch.tensor(std) + torch.tensor(mean)) * 255).round().to(torch.uint8)  # (N, 1, 8, 8)
    folder = ImageFolder(tmp_path / "images" / "train")
    assert folder.classes == test.classes
    assert [label for _, label in folder.samples] == torch.arange(4).repeat_interleave(3).tolist()
    first = np.asarray(Image.open(folder.samples[0][0]))
    assert np.array_equal(first, pixels[0, 0].numpy())
    listed = list_split(tmp_path / "images" / "train")
    images, colour = decode_images(listed.paths_and_labels()[0], FolderSettings(side=8, channels=1))
    assert torch.equal(images, pixels) and not colour


def test_a_rerun_replaces_the_export_and_leaves_no_temporary_folder(tmp_path, grey):
    test, mean, std, package = grey
    export_image_folder(package, test.classes, mean, std, tmp_path / "images")
    export_image_folder(package[:4], test.classes, mean, std, tmp_path / "images")  # IPC 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]
    assert len(list((tmp_path / "images").rglob("*.png"))) == 4


def test_a_package_file_is_read_as_it_is_with_its_ipc(tmp_path, grey):
    test, mean, std, package = grey
    torch.save(package, tmp_path / "set.pt")
    x, ipc, form = external.read_external_set(tmp_path / "set.pt", test, mean, std)
    assert (ipc, form) == (3, "package") and torch.equal(x, package)
    assert atomic.sha256_of(tmp_path / "set.pt") == hashlib.sha256((tmp_path / "set.pt").read_bytes()).hexdigest()


class Runs:
    """Unpickling this runs code: torch.load(weights_only=True) must refuse it."""

    def __reduce__(self):
        return (print, ("ran",))


@pytest.mark.parametrize("content, message", [
    (lambda p: p[:7], "7 images, not a positive multiple of the data set's 4 classes"),
    (lambda p: p.repeat(1, 3, 1, 1), "3 channel"),
    (lambda p: p[:, :, :4, :4], "images of 4x4 pixels; the data set's are 8x8"),
    (lambda p: {"images": p}, "a dict; expected a bare float tensor"),
    (lambda p: (p * 100).to(torch.uint8), "torch.uint8 tensor"),
    (lambda p: Runs(), "weights_only=True"),
])
def test_a_bad_package_file_is_refused_naming_it(tmp_path, grey, content, message):
    test, mean, std, package = grey
    torch.save(content(package), tmp_path / "bad.pt")
    with pytest.raises(DiffdistillError, match="bad.pt") as err:
        external.read_external_set(tmp_path / "bad.pt", test, mean, std)
    assert message in str(err.value)


def _broken_folder(tmp_path, grey, damage):
    test, mean, std, package = grey
    export_image_folder(package, test.classes, mean, std, tmp_path / "images")
    damage(tmp_path / "images" / "train")
    return test, mean, std


@pytest.mark.parametrize("damage, message", [
    (lambda root: (root / "3").rename(root / "three"), "differ from the data set's classes"),
    (lambda root: (root / "2" / "0.png").unlink(), "different numbers of images"),
    (lambda root: Image.new("L", (9, 9)).save(root / "1" / "0.png"), "0.png: images of 9x9 pixels"),
    (lambda root: Image.new("RGB", (8, 8), (200, 10, 10)).save(root / "1" / "0.png"), "0.png: 3 channel(s)"),
    (lambda root: (root / "1" / "0.png").write_bytes(b"not an image"), "0.png: not a readable image"),
])
def test_a_bad_folder_is_refused_naming_what_is_wrong(tmp_path, grey, damage, message):
    test, mean, std = _broken_folder(tmp_path, grey, damage)
    with pytest.raises(DiffdistillError) as err:
        external.read_external_set(tmp_path / "images", test, mean, std)
    assert message in str(err.value)


def test_a_missing_path_is_refused_naming_it(tmp_path, grey):
    test, mean, std, _ = grey
    with pytest.raises(DiffdistillError, match="nowhere.pt: no such file or folder"):
        external.read_external_set(tmp_path / "nowhere.pt", test, mean, std)
