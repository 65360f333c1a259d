"""Shared test settings: one torch thread (CI has 2 cores), the GPU marker, miniature data sets."""

import pytest
import torch

# One thread per test process: tiny models gain nothing from more, and on a loaded 2-core machine
# two threads made small training loops many times slower (thread contention).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# --- miniature data sets (tests/datasets_fixtures.py), built once per test session ----------------


@pytest.fixture(scope="session")
def mini_cifar100(tmp_path_factory):
    """Root folder holding a miniature ``cifar-100-python/`` (100 classes, 2 train / 1 test each)."""
    from datasets_fixtures import make_cifar100

    root = tmp_path_factory.mktemp("cifar100")
    make_cifar100(root)
    return root


@pytest.fixture(scope="session")
def mini_tiny_imagenet(tmp_path_factory):
    """Root folder holding a miniature ``tiny-imagenet-200/`` (3 classes, 2 train / 1 val each)."""
    from datasets_fixtures import make_tiny_imagenet

    root = tmp_path_factory.mktemp("tinyimagenet")
    make_tiny_imagenet(root)
    return root


@pytest.fixture(scope="session")
def digits_files(tmp_path_factory):
    """Prepared digits splits on disk: ``{"train": Path, "test": Path}`` (1,257 / 540 images)."""
    from diffdistill import data
    from diffdistill.data import digits

    folder = tmp_path_factory.mktemp("digits")
    paths = {split: folder / f"{split}.pt" for split in data.SPLITS}
    for split, path in paths.items():
        data.save_images(digits.load_digits_split(split), path)
    return paths
