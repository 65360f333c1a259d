"""Checkpoints: our round trip, and transfer from public U-ViT state_dicts (docs/reference.md, "U-ViT")."""

import collections
import pickle

import pytest
import torch

from diffdistill.diffusion import checkpoint, uvit
from diffdistill.errors import DiffdistillError

N_PATCHES = 16  # uvit_tiny_test: 8x8 image, patch 2


def _model(seed: int, **overrides) -> uvit.UViT:
    torch.manual_seed(seed)
    return uvit.build("uvit_tiny_test", **overrides)


def _snapshot(model) -> dict:
    return {key: value.clone() for key, value in model.state_dict().items()}


def _save_public(tmp_path, model, name="public.pth", wrap=None, prefix=""):
    state = {prefix + key: value for key, value in model.state_dict().items()}
    path = tmp_path / name
    torch.save({wrap: state} if wrap else state, path)
    return path


def test_unconditional_source_into_conditional_model(tmp_path):
    source = _model(1, num_classes=0)  # like cifar10_uvit_small.pth
    path = _save_public(tmp_path, source)
    target = _model(2, num_classes=5)
    before = _snapshot(target)
    report = checkpoint.load_pretrained(target, path)
    after, src = target.state_dict(), source.state_dict()
    assert src["pos_embed"].shape == (1, 1 + N_PATCHES, 32) and after["pos_embed"].shape == (1, 2 + N_PATCHES, 32)
    assert torch.equal(after["pos_embed"][:, 1:], src["pos_embed"])  # old row 0 (time) -> new row 1, ...
    assert torch.equal(after["pos_embed"][:, 0], before["pos_embed"][:, 0])  # label row: fresh init kept
    assert torch.equal(after["label_emb.weight"], before["label_emb.weight"])
    assert after["label_emb.weight"].shape == (6, 32)  # 5 classes + null
    for key in src:
        if key != "pos_embed":
            assert torch.equal(after[key], src[key]), key
    assert set(report.loaded) == set(src)
    assert report.skipped == []
    assert set(report.initialised) == {"label_emb.weight", "pos_embed[0]"}
    assert "label_emb.weight" in report.summary()


@pytest.mark.parametrize("wrap,prefix", [(None, ""), ("state_dict", ""), ("model", "module.")])
def test_conditional_source_drops_label_layer(tmp_path, wrap, prefix):
    source = _model(3, num_classes=7, null_class=False)  # like imagenet64_uvit_mid.pth
    path = _save_public(tmp_path, source, wrap=wrap, prefix=prefix)
    target = _model(4, num_classes=5)
    before = _snapshot(target)
    report = checkpoint.load_pretrained(target, path)
    after, src = target.state_dict(), source.state_dict()
    assert torch.equal(after["label_emb.weight"], before["label_emb.weight"])
    assert torch.equal(after["pos_embed"], src["pos_embed"])  # same extras: 1:1
    for key in src:
        if key != "label_emb.weight":
            assert torch.equal(after[key], src[key]), key
    assert report.skipped == ["label_emb.weight"]
    assert report.initialised == ["label_emb.weight"]
    assert "label_emb.weight" not in report.loaded


@pytest.mark.parametrize("overrides", [dict(embed_dim=64, num_heads=2), dict(patch_size=4)])
def test_mismatched_file_lists_every_key_and_leaves_model(tmp_path, overrides):
    source = _model(5, num_classes=0, **overrides)
    path = _save_public(tmp_path, source, name="other_size.pth")
    target = _model(6, num_classes=5)
    before = _snapshot(target)
    with pytest.raises(DiffdistillError) as info:
        checkpoint.load_pretrained(target, path)
    message = str(info.value)
    assert "other_size.pth" in message
    src, tgt = source.state_dict(), target.state_dict()
    mismatched = [k for k in src if k != "pos_embed" and src[k].shape != tgt[k].shape]
    assert len(mismatched) >= 3
    for key in mismatched + ["pos_embed"]:
        assert key in message, key
        assert str(tuple(src[key].shape)) in message and str(tuple(tgt[key].shape)) in message, key
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} modified despite the error"


def test_missing_and_extra_keys_are_listed(tmp_path):
    state = _model(7, num_classes=0).state_dict()
    del state["out_blocks.0.skip_linear.weight"]
    state["something.extra"] = torch.zeros(2)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(DiffdistillError, match="partial.pth") as info:
        checkpoint.load_pretrained(_model(8, num_classes=5), path)
    assert "out_blocks.0.skip_linear.weight" in str(info.value)
    assert "something.extra" in str(info.value)


def test_truncated_file_names_the_file(tmp_path):
    path = _save_public(tmp_path, _model(9, num_classes=0), name="cut.pth")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    target = _model(10, num_classes=5)
    before = _snapshot(target)
    with pytest.raises(DiffdistillError, match="cut.pth"):
        checkpoint.load_pretrained(target, path)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    for mmap in (False, True):
        with pytest.raises(DiffdistillError, match="cut.pth"):
            checkpoint.load_checkpoint(path, mmap=mmap)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(DiffdistillError, match="nothing_here.pth"):
        checkpoint.load_pretrained(_model(0, num_classes=5), tmp_path / "nothing_here.pth")
    with pytest.raises(DiffdistillError, match="nothing_here.pt"):
        checkpoint.load_checkpoint(tmp_path / "nothing_here.pt")


def test_missing_pretrained_weights_say_where_the_public_files_come_from_and_go(tmp_path):
    with pytest.raises(DiffdistillError) as err:
        checkpoint.load_pretrained(_model(0, num_classes=5), tmp_path / "cifar10_uvit_small.pth")
    message = str(err.value)
    for needle in ("github.com/baofff/U-ViT", "cifar10_uvit_small.pth", "imagenet64_uvit_mid.pth",
                   "resources/weights/", "pretrained.path", str(tmp_path)):
        assert needle in message, needle


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_non_tensor_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    # An arbitrary Python object: only a full (unsafe) unpickle could rebuild it.
    torch.save({"pos_embed": torch.zeros(1), "payload": collections.Counter("abc")}, path)
    with pytest.raises(DiffdistillError, match="evil.pth"):
        checkpoint.load_pretrained(_model(0, num_classes=5), path)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"a": 1}))  # not a torch file at all
    with pytest.raises(DiffdistillError, match="plain.pkl"):
        checkpoint.load_pretrained(_model(0, num_classes=5), plain)
    strings = tmp_path / "strings.pth"
    torch.save({"pos_embed": "not a tensor"}, strings)  # readable, but not a state_dict
    with pytest.raises(DiffdistillError, match="strings.pth"):
        checkpoint.load_pretrained(_model(0, num_classes=5), strings)


def _trained(seed=11):
    model, ema = _model(seed, num_classes=5), _model(seed + 1, num_classes=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.99, 0.999), weight_decay=0.03)
    x, t, y = torch.randn(4, 3, 8, 8), torch.rand(4) * 999, torch.tensor([0, 1, 2, 5])
    model(x, t, y).square().mean().backward()
    optimizer.step()
    return model, ema, optimizer


def test_round_trip_is_exact(tmp_path):
    model, ema, optimizer = _trained()
    config = {"training": {"lr": 1e-3, "steps": 10, "betas": [0.99, 0.999]}, "seed": 3}
    extra = {"fid": [12.5, 11.0], "rng": torch.arange(3)}
    path = tmp_path / "ckpt" / "step_7.pt"
    checkpoint.save_checkpoint(path, model=model, step=7, config=config, ema=ema, optimizer=optimizer, extra=extra)
    raw = torch.load(path, weights_only=True)  # must be loadable without full pickle
    assert raw["format"] == "diffdistill-checkpoint" and raw["version"] == 1
    ckpt = checkpoint.load_checkpoint(path)
    assert ckpt["step"] == 7
    assert ckpt["config"]["model"] == model.config
    assert ckpt["config"]["training"] == config["training"] and ckpt["config"]["seed"] == 3
    assert ckpt["extra"]["fid"] == [12.5, 11.0] and torch.equal(ckpt["extra"]["rng"], torch.arange(3))
    for saved, original in ((ckpt["model"], model.state_dict()), (ckpt["ema"], ema.state_dict())):
        assert list(saved) == list(original)
        assert all(torch.equal(saved[k], original[k]) for k in original)
    _assert_optimizer_states_equal(ckpt["optimizer"], optimizer.state_dict())
    mapped = checkpoint.load_checkpoint(path, mmap=True)  # scoring and sampling read it so
    assert all(torch.equal(mapped["ema"][k], v) for k, v in ema.state_dict().items())
    rebuilt = checkpoint.model_from_checkpoint(mapped, weights="ema")
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in ema.state_dict().items())


def _assert_optimizer_states_equal(saved, original):
    assert saved["param_groups"] == original["param_groups"]
    assert saved["state"].keys() == original["state"].keys()
    for index, state in original["state"].items():
        for name, value in state.items():
            assert torch.equal(saved["state"][index][name], value), (index, name)


def test_optimizer_state_restores(tmp_path):
    model, _, optimizer = _trained()
    path = tmp_path / "c.pt"
    checkpoint.save_checkpoint(path, model=model, step=1, config={}, optimizer=optimizer)
    resumed = checkpoint.model_from_checkpoint(path, weights="model")
    fresh = torch.optim.AdamW(resumed.parameters(), lr=5.0)
    fresh.load_state_dict(checkpoint.load_checkpoint(path)["optimizer"])
    _assert_optimizer_states_equal(fresh.state_dict(), optimizer.state_dict())


def test_model_from_checkpoint_rebuilds_equal_model(tmp_path):
    model, ema, _ = _trained()
    path = tmp_path / "c.pt"
    checkpoint.save_checkpoint(path, model=model, step=2, config={}, ema=ema)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([5.0, 700.0]), torch.tensor([1, 5])
    for weights, reference in (("ema", ema), ("model", model)):
        rebuilt = checkpoint.model_from_checkpoint(path, weights=weights)
        assert isinstance(rebuilt, uvit.UViT) and rebuilt.config == model.config
        assert all(torch.equal(v, reference.state_dict()[k]) for k, v in rebuilt.state_dict().items())
        with torch.no_grad():
            assert torch.equal(rebuilt.eval()(x, t, y), reference.eval()(x, t, y))
    from_dict = checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(path), weights="model")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in from_dict.state_dict().items())


def test_missing_ema_is_a_clear_error(tmp_path):
    model = _model(0, num_classes=5)
    path = tmp_path / "no_ema.pt"
    checkpoint.save_checkpoint(path, model=model, step=0, config={})
    with pytest.raises(DiffdistillError, match="(?i)ema"):
        checkpoint.model_from_checkpoint(path)
    assert checkpoint.model_from_checkpoint(path, weights="model").config == model.config


def test_foreign_file_is_not_a_checkpoint(tmp_path):
    path = _save_public(tmp_path, _model(0, num_classes=0), name="flat.pth")
    with pytest.raises(DiffdistillError, match="flat.pth"):
        checkpoint.load_checkpoint(path)


def test_own_checkpoint_as_pretrained_uses_ema(tmp_path):
    model, ema, _ = _trained()
    path = tmp_path / "ours.pt"
    checkpoint.save_checkpoint(path, model=model, step=3, config={}, ema=ema)
    target = _model(20, num_classes=3)  # a different class count: label layer not transferred
    before = _snapshot(target)
    report = checkpoint.load_pretrained(target, path)
    after = target.state_dict()
    assert torch.equal(after["in_blocks.0.attn.qkv.weight"], ema.state_dict()["in_blocks.0.attn.qkv.weight"])
    assert torch.equal(after["label_emb.weight"], before["label_emb.weight"])
    assert report.initialised == ["label_emb.weight"]


def test_config_must_be_plain(tmp_path):
    with pytest.raises(DiffdistillError, match="config"):
        checkpoint.save_checkpoint(tmp_path / "x.pt", model=_model(0), step=0, config={"bad": object()})
    assert not (tmp_path / "x.pt").exists()
