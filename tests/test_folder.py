"""Folder data sets (diffdistill.data.folder, prepare_data --dataset folder): the ImageFolder layout read into
prepared splits (class order, val/, channels, resize, file formats) and bad input refused before anything
is written, each error naming the folder or file (docs/reference.md, "Folder data sets")."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, features

from datasets_fixtures import folder_colour, folder_grey, make_image_folder
from diffdistill.data import datasets, folder
from diffdistill.errors import DiffdistillError
from helpers import load_script


def read(root, **settings):
    return folder.read_folder(root, folder.FolderSettings(**settings))


def pixels_of(data, label: int, k: int) -> np.ndarray:
    """The k-th image (file order) of a class as (H, W, C)."""
    index = (data.labels == label).nonzero().flatten()[k]
    return data.images[index].permute(1, 2, 0).numpy()


def luma(rgb) -> float:
    """ITU-R 601-2 luma, Pillow's RGB -> L (docs/reference.md, "Folder data sets")."""
    r, g, b = rgb
    return r * 299 / 1000 + g * 587 / 1000 + b * 114 / 1000


# --- reading ---------------------------------------------------------------------------------------------


def test_classes_are_the_sorted_folder_names_and_labels_follow_them(tmp_path):
    splits = read(make_image_folder(tmp_path, classes=("cat", "ant", "bee"), n_train=3, n_test=2), side=16)
    train, test = splits["train"], splits["test"]
    assert train.classes == test.classes == ["ant", "bee", "cat"]
    assert train.counts() == [3, 3, 3] and test.counts() == [2, 2, 2]
    assert (train.name, train.split, test.split) == ("folder", "train", "test")
    for label in range(3):
        assert (pixels_of(train, label, 2) == folder_colour(label)).all()  # k = 2: an RGB PNG, exact
        assert (pixels_of(train, label, 0) == folder_grey(label)).all()  # k = 0: a grey PNG, in all 3 channels


def test_val_is_accepted_as_the_held_out_folder(tmp_path):
    test = read(make_image_folder(tmp_path, held_out="val"), side=16)["test"]
    assert test.split == "test" and test.extra["source"] == str(tmp_path / "val") and len(test) == 6


def test_channels_are_inferred_3_when_any_image_is_colour_else_1(tmp_path):
    mixed = read(make_image_folder(tmp_path / "mixed"), side=16)["train"]
    assert mixed.images.shape[1] == 3 and mixed.extra["channels_inferred"]
    grey = read(make_image_folder(tmp_path / "grey", n_train=1, n_test=1), side=16)  # k = 0 only: grey files
    assert grey["train"].images.shape == (3, 1, 16, 16) and grey["test"].images.shape[1] == 1
    assert (pixels_of(grey["train"], 1, 0) == folder_grey(1)).all()


def test_configured_channels_convert_colour_to_luma_and_repeat_grey(tmp_path):
    root = make_image_folder(tmp_path)
    one = read(root, side=16, channels=1)["train"]
    assert one.images.shape[1] == 1 and not one.extra["channels_inferred"]
    assert np.abs(pixels_of(one, 2, 2).astype(float) - luma(folder_colour(2))).max() <= 1
    three = read(root, side=16, channels=3)["train"]
    assert (pixels_of(three, 0, 0) == folder_grey(0)).all() and three.images.shape[1] == 3


def test_resize_takes_the_centred_square_and_resizes_it_to_the_side(tmp_path):
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :10], wide[:, 10:30], wide[:, 30:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    Image.fromarray(wide.transpose(1, 0, 2).copy()).save(tmp_path / "tall.png")
    for name in ("wide.png", "tall.png"):
        pixels, colour = folder.decode_image(tmp_path / name, 10, 0)
        assert pixels.shape == (10, 10, 3) and colour
        inner = pixels[1:-1, 1:-1] if name == "tall.png" else pixels[:, 1:-1]
        assert (inner == (0, 255, 0)).all()  # the left and right (top and bottom) quarters are cut off
    small, _ = folder.decode_image(tmp_path / "wide.png", 40, 3)  # upscaled: 20x20 centre -> 40x40
    assert small.shape == (40, 40, 3) and (small[5:35, 5:35] == (0, 255, 0)).all()


FORMATS = [("PNG", "png", {}, 0), ("JPEG", "jpg", {"quality": 95}, 3), ("BMP", "bmp", {}, 0),
           ("TIFF", "tif", {}, 0), ("TIFF", "tiff", {"compression": "tiff_lzw"}, 0)]
if features.check("webp"):
    FORMATS += [("WEBP", "webp", {"lossless": True}, 0)]


@pytest.mark.parametrize("fmt, suffix, options, tolerance", FORMATS)
def test_every_format_reads_in_colour_and_grey(tmp_path, fmt, suffix, options, tolerance):
    # WebP stores RGB only: its grey image comes back with R = G = B, which counts as grey.
    for mode, value in (("RGB", (200, 40, 90)), ("L", 123)):
        path = tmp_path / f"{mode}.{suffix.upper() if mode == 'L' else suffix}"  # suffixes in any case
        Image.new(mode, (12, 12), value).save(path, fmt, **options)
        assert folder._is_image_file(path)
        pixels, colour = folder.decode_image(path, 12, 0)
        assert colour == (mode == "RGB") and pixels.shape == (12, 12, 3)
        assert np.abs(pixels.astype(int) - np.array(value)).max() <= tolerance


def test_sixteen_bit_grey_keeps_its_high_byte_and_grey_content_stored_in_colour_is_grey(tmp_path):
    Image.fromarray((np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024 + 255)).save(tmp_path / "deep.png")
    pixels, colour = folder.decode_image(tmp_path / "deep.png", 8, 1)
    assert not colour and pixels[:, :, 0].flatten().tolist() == [4 * v for v in range(64)]
    grey_palette = Image.new("L", (8, 8), 77).convert("P")
    grey_palette.putpalette([v for v in range(256) for _ in range(3)])
    grey_palette.save(tmp_path / "palette.png")
    assert not folder.decode_image(tmp_path / "palette.png", 8, 0)[1]
    Image.new("RGB", (8, 8), (10, 200, 30)).convert("P").save(tmp_path / "colour_palette.png")
    assert folder.decode_image(tmp_path / "colour_palette.png", 8, 0)[1]
    Image.new("RGB", (8, 8), (90, 90, 90)).save(tmp_path / "grey_as_rgb.png")
    assert not folder.decode_image(tmp_path / "grey_as_rgb.png", 8, 0)[1]


def test_other_files_are_skipped_and_files_in_subfolders_are_found(tmp_path):
    root = make_image_folder(tmp_path)
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    (root / "train" / "ant" / ".hidden.png").write_bytes(b"junk")
    (root / "train" / "ant" / "more").mkdir()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(root / "train" / "ant" / "more" / "deep.png")
    listed = folder.list_split(root / "train")
    assert [p.name for p in listed.files[0]] == ["ant_000.png", "ant_001.jpg", "ant_002.png", "deep.png"]


def test_a_process_pool_decodes_the_same_images(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path, n_train=4, noise=True)
    paths, _ = folder.list_split(root / "train").paths_and_labels()
    monkeypatch.setattr(folder, "CHUNK", 5)  # several chunks, so the pool is used
    one, colour_one = folder.decode_images(paths, folder.FolderSettings(side=8), workers=1)
    two, colour_two = folder.decode_images(paths, folder.FolderSettings(side=8), workers=2)
    assert one.shape == (12, 3, 8, 8) and bool((one == two).all()) and colour_one == colour_two


def test_prepare_dataset_reads_a_folder_by_name(tmp_path):
    assert datasets.prepare_dataset("folder", make_image_folder(tmp_path), "test").classes == ["ant", "bee", "cat"]


# --- bad input: a clear error, nothing written --------------------------------------------------------------

FITS = {"img_size": 16, "patch_size": 4, "in_chans": 3}


def prepare_fails(tmp_path, root, *, side=16, ipc="2", overrides=FITS, extra=()) -> str:
    """prepare_data on a folder data set: the error it stops with; checks that it wrote nothing."""
    out = tmp_path / "out"
    argv = ["--dataset", "folder", "--root", str(root), "--side", str(side), "--ipc", ipc, "--presets", "uvit_digits",
            "--model-overrides", json.dumps(overrides), "--train-out", str(out / "train.pt"),
            "--test-out", str(out / "test.pt"), "--sidecar", str(out / "prepare.json"), *extra]
    with pytest.raises(DiffdistillError) as err:
        load_script("prepare_data").main(argv)
    assert not out.exists() or not any(out.iterdir())
    return str(err.value)


def test_prepare_writes_both_splits_when_the_data_fits(tmp_path):
    root = make_image_folder(tmp_path / "images")
    out = tmp_path / "out"
    load_script("prepare_data").main([
        "--dataset", "folder", "--root", str(root), "--side", "16", "--ipc", "2,3", "--presets", "uvit_digits",
        "--model-overrides", json.dumps(FITS), "--train-out", str(out / "train.pt"), "--test-out", str(out / "test.pt"),
        "--sidecar", str(out / "prepare.json")])
    sidecar = json.loads((out / "prepare.json").read_text())
    assert sidecar["classes"] == ["ant", "bee", "cat"] and sidecar["splits"]["train"]["shape"] == [9, 3, 16, 16]
    assert sidecar["settings"]["folder"]["channels"] == 3 and sidecar["settings"]["folder"]["channels_inferred"]


def test_a_class_folder_without_images_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "images")
    for path in (root / "train" / "bee").iterdir():
        path.unlink()
    (root / "train" / "bee" / "readme.txt").write_text("images to come")
    message = prepare_fails(tmp_path, root)
    assert str(root / "train" / "bee") in message and "without images" in message and "readme.txt" in message


def test_a_file_that_is_not_a_readable_image_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "images")
    (root / "test" / "cat" / "broken.jpg").write_bytes(b"this is not a JPEG")
    message = prepare_fails(tmp_path, root)
    assert str(root / "test" / "cat" / "broken.jpg") in message and "not a readable image" in message


def test_different_class_sets_in_train_and_test_are_refused(tmp_path):
    root = make_image_folder(tmp_path / "images")
    (root / "test" / "cat").rename(root / "test" / "dog")
    message = prepare_fails(tmp_path, root)
    assert str(root / "train") in message and str(root / "test") in message
    assert "only in train: ['cat']" in message and "only in test: ['dog']" in message


def test_a_class_with_fewer_images_than_the_largest_ipc_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "images", n_train=3)
    (root / "train" / "bee" / "bee_002.png").unlink()
    message = prepare_fails(tmp_path, root, ipc="1,3")
    assert str(root / "train" / "bee") in message and "2 images" in message and "IPC 3" in message
    listed = folder.list_split(root / "train")
    folder.check_images_per_class(listed, [1, 2])  # enough for every IPC listed
    with pytest.raises(DiffdistillError, match="bee"):
        folder.check_images_per_class(listed, [3, 1])


@pytest.mark.parametrize("side, overrides, expected", [
    (18, {**FITS, "img_size": 18}, "side 18 (data.side) is not a multiple of patch_size 4"),
    (16, {**FITS, "img_size": 32}, "img_size 32 but the images are 16x16"),
    (12, {**FITS, "img_size": 12}, "data.side 12 with data.channels 1"),  # the ConvNet: 1 channel, side 12
])
def test_a_side_the_networks_cannot_take_is_refused_before_reading(tmp_path, side, overrides, expected):
    channels = "1" if side == 12 else "3"
    overrides = {**overrides, "in_chans": int(channels)}
    message = prepare_fails(tmp_path, tmp_path / "no_such_root", side=side, overrides=overrides,
                            extra=["--channels", channels])
    assert expected in message


def test_a_channel_count_the_model_cannot_take_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "images")
    configured = prepare_fails(tmp_path, root, overrides={**FITS, "in_chans": 1}, extra=["--channels", "3"])
    assert "in_chans 1 but the images have 3 channel(s)" in configured
    inferred = prepare_fails(tmp_path, root, overrides={**FITS, "in_chans": 1})  # colour files: 3 inferred
    assert "model uvit_digits: in_chans 1 but the images have 3 channel(s)" in inferred


def test_an_empty_or_missing_root_and_a_wrong_layout_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    assert f"{tmp_path / 'empty'}: the data root is empty" in prepare_fails(tmp_path, tmp_path / "empty")
    assert "does not exist" in prepare_fails(tmp_path, tmp_path / "missing")
    root = make_image_folder(tmp_path / "images")
    (root / "test").rename(root / "testing")
    assert "expected a train/ folder and one test/ (or val/)" in prepare_fails(tmp_path, root)
    both = make_image_folder(tmp_path / "both")
    make_image_folder(both, held_out="val")
    assert "both test/ and val/" in prepare_fails(tmp_path, both)
