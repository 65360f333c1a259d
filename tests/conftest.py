"""Shared test settings: one torch thread (CI has 2 cores), the GPU marker, miniature data sets."""

import pytest
import torch

# One thread per test process: tiny models gain nothing from more, and on a loaded 2-core machine
# two threads made small training loops many times slower (thread contention).
torch.set_num_threads(1)


# The files that take a minute or more, longest first. pytest-xdist hands a worker a whole file at a
# time (--dist loadfile), in collection order (--no-loadscope-reorder, pyproject.toml): started first,
# they run beside each other and the quick files fill the gaps, instead of one long file forming the
# tail. The SLURM runs mostly wait on the executor's status checks, so their worker costs little CPU.
LONG_FILES = ("test_rehearsal.py", "test_workflow_tiny.py", "test_slurm.py", "test_workflow_datasets.py",
              "test_workflow.py", "test_benchmarks.py", "test_gpu_check.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: the rest keep their order
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
