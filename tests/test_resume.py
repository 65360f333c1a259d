"""The one rule for resume state (diffdistill.resume): a state fits a job with the same settings and data."""

from __future__ import annotations

import logging

import torch

from diffdistill.resume import JobKey, data_fingerprint

IMAGES = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).reshape(2, 3, 4, 4)
LABELS = torch.tensor([0, 1])
KEY = JobKey.of({"lr": 1e-3, "betas": (0.9, 0.99)}, IMAGES, LABELS, ["a", "b"])


def test_the_same_settings_and_data_fit_whatever_the_key_order():
    same = JobKey.of({"betas": [0.9, 0.99], "lr": 1e-3}, IMAGES.clone(), LABELS.clone(), ["a", "b"])
    assert same == KEY and KEY.differs(same.to_dict()) is None


def test_the_part_that_differs_is_named(caplog):
    other_settings = JobKey.of({"lr": 2e-3, "betas": (0.9, 0.99)}, IMAGES, LABELS, ["a", "b"])
    other_data = JobKey.of({"lr": 1e-3, "betas": (0.9, 0.99)}, IMAGES, LABELS, ["a", "c"])
    assert KEY.differs(other_settings.to_dict()) == "settings"
    assert KEY.differs(other_data.to_dict()) == "data"
    assert KEY.differs(JobKey(other_settings.settings, other_data.data).to_dict()) == "settings and data"
    assert KEY.differs(None) == KEY.differs({}) == "settings and data"  # a state without a key fits nothing
    with caplog.at_level(logging.WARNING):
        assert not KEY.fits(other_data.to_dict(), "state.pt") and KEY.fits(KEY.to_dict(), "state.pt")
    assert caplog.messages == ["state.pt was made with other data than this job's: not resumed, starting afresh"]


def test_data_fingerprint_sees_one_changed_pixel_and_the_dtype():
    changed = IMAGES.clone()
    changed[1, 2, 3, 3] += 1
    assert data_fingerprint(IMAGES) == data_fingerprint(IMAGES.clone())
    assert data_fingerprint(IMAGES) != data_fingerprint(changed)
    assert data_fingerprint(IMAGES) != data_fingerprint(IMAGES.long())
