"""Mode guidance's modes: k-means on hand-made clusters, class modes, assignment in turn, the pull."""

import pytest
import torch

from diffdistill.data import LabeledImages, save_images
from diffdistill.diffusion import modes
from diffdistill.diffusion.modes import ModePull, balanced_mode_indices, class_modes, kmeans
from diffdistill.diffusion.sampler_settings import SamplerSettings
from diffdistill.errors import DiffdistillError

CENTERS = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])


def clusters(per_cluster=20, spread=0.5, seed=1):
    """Points around CENTERS (the cluster of point i is i // per_cluster)."""
    noise = torch.randn(3 * per_cluster, 2, generator=torch.Generator().manual_seed(seed)) * spread
    return CENTERS.repeat_interleave(per_cluster, dim=0) + noise


def test_kmeans_finds_hand_made_clusters_and_their_means():
    points = clusters()
    centers, assignment = kmeans(points, 3, seed=0)
    truth = torch.arange(60) // 20
    for j in range(3):  # each found cluster is exactly one hand-made cluster, its center that cluster's mean
        members = truth[assignment == j]
        assert members.numel() == 20 and (members == members[0]).all()
        assert torch.allclose(centers[j], points[truth == members[0]].mean(dim=0), atol=1e-5)
    assert torch.allclose(centers[centers[:, 0].argsort()][:, 0], torch.tensor([0.0, 0.0, 10.0]), atol=0.5)


def test_kmeans_is_seeded_and_copes_with_repeated_points():
    points = clusters()
    assert torch.equal(kmeans(points, 3, seed=4)[0], kmeans(points, 3, seed=4)[0])
    same = torch.ones(5, 2)  # one distinct point, three clusters: no division by zero, no empty draw
    centers, _ = kmeans(same, 3)
    assert torch.equal(centers, torch.ones(3, 2))
    with pytest.raises(ValueError, match="k="):
        kmeans(same, 6)


def labelled(per_class=(4, 4), value_of=lambda label, i: 0):
    images, labels = [], []
    for label, n in enumerate(per_class):
        for i in range(n):
            images.append(torch.full((1, 2, 2), value_of(label, i), dtype=torch.uint8))
            labels.append(label)
    return LabeledImages(torch.stack(images), torch.tensor(labels), [f"c{k}" for k in range(len(per_class))])


def test_class_modes_are_per_class_in_the_model_range():
    # Class 0: two images at 0 and two at 255 -> modes -1 and 1; class 1: all at 255 -> 1.
    data = labelled(value_of=lambda label, i: 255 if label or i % 2 else 0)
    found = class_modes(data, 2)
    assert found.shape == (2, 2, 1, 2, 2)
    assert sorted(found[0].flatten(1)[:, 0].tolist()) == [-1.0, 1.0]
    assert torch.all(found[1] == 1.0)


def test_more_modes_than_a_class_has_images_names_the_key():
    with pytest.raises(DiffdistillError, match=r"modes_per_class: 4 modes, but class 1 \('c1'\) has only 3"):
        class_modes(labelled(per_class=(5, 3)), 4)


def test_modes_for_is_none_without_guidance_and_needs_the_real_split_with(tmp_path):
    assert modes.modes_for(SamplerSettings(), None) is None
    on = SamplerSettings(mode_guidance=0.5, modes_per_class=2)
    with pytest.raises(DiffdistillError, match="mode_guidance > 0 needs the real training split"):
        modes.modes_for(on, None)
    save_images(labelled(), tmp_path / "train.pt")
    assert modes.modes_for(on, str(tmp_path / "train.pt")).shape == (2, 2, 1, 2, 2)


def test_images_of_a_class_take_the_modes_in_turn():
    labels = (torch.arange(12) + 1) % 3  # balanced_labels(3, 12, offset=1)
    index = balanced_mode_indices(3, 12, 2, offset=1)
    for label in range(3):
        assert index[labels == label].tolist() == [(i + (label == 0)) % 2 for i in range(4)]
    # From offset 0, image i of class c (pool position 3 i + c) gets mode i mod 2.
    assert balanced_mode_indices(3, 9, 2).tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0]


def test_the_pull_moves_x0_a_fraction_of_the_way_to_its_mode_until_the_stop():
    x0, target = torch.tensor([[4.0, -2.0]]), torch.tensor([[0.0, 2.0]])
    pull = ModePull(target, 0.25, evaluations=2)
    moved = x0 + pull(x0, 1)
    assert torch.allclose((moved - target).norm(), 0.75 * (x0 - target).norm())
    assert torch.equal(moved, torch.tensor([[3.0, -1.0]]))
    assert pull(x0, 2) is None
