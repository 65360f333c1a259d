"""The field's scores (HLR, IOR, LRS, ARS) against values worked out by hand from DD-Ranking's
definitions (docs/reference.md, "The field's scores")."""

import math

import pytest

from diffdistill.errors import DiffdistillError
from diffdistill.evaluation.field_scores import field_scores, normalized


def test_the_normalisation_maps_minus_one_zero_and_one_as_defined():
    # (e^a - e^-1) / (e - e^-1): 0 at a = -1, 1 at a = 1, (1 - 1/e) / (e - 1/e) = 0.268941... at 0.
    assert normalized(-1) == pytest.approx(0.0, abs=1e-15)
    assert normalized(1) == pytest.approx(1.0)
    assert normalized(0) == pytest.approx(0.2689414213699951)


def test_one_round_gives_the_hand_computed_scores():
    # HLR = 0.9 - 0.8 = 0.1, IOR = 0.8 - 0.7 = 0.1, alpha = 0.05 - 0.05 = 0: LRS = norm(0).
    scores = field_scores([0.8], [0.7], [0.9])
    assert (scores.hlr.mean, scores.ior.mean) == (pytest.approx(0.1), pytest.approx(0.1))
    assert scores.lrs.mean == pytest.approx(0.2689414213699951)
    assert scores.lrs.std == 0 and scores.ars is None


def test_scores_are_taken_per_round_then_averaged():
    # Round 1: HLR 0.1, IOR 0.3, alpha 0.1 -> 0.313687; round 2: HLR 0.3, IOR 0.1, alpha -0.1 -> 0.228454.
    # A score of the mean accuracies would give norm(0) = 0.268941 instead.
    scores = field_scores([0.8, 0.6], [0.5, 0.5], [0.9, 0.9])
    assert scores.hlr.mean == pytest.approx(0.2) and scores.hlr.std == pytest.approx(0.1)
    assert scores.ior.mean == pytest.approx(0.2) and scores.ior.std == pytest.approx(0.1)
    assert scores.lrs.mean == pytest.approx(0.2710704900277149)
    assert scores.lrs.std == pytest.approx(0.042616851719350896)  # population std, as the accuracies


def test_ars_weighs_the_improvement_with_and_without_augmentation_alike():
    # beta = 0.5 * IOR (0.3, 0.1) + 0.5 * (0.6 - 0.4, 0.5 - 0.5) = (0.25, 0.05) -> 0.389783, 0.290755.
    scores = field_scores([0.8, 0.6], [0.5, 0.5], [0.9, 0.9], synthetic_noaug=[0.6, 0.5],
                          random_real_noaug=[0.4, 0.5])
    assert scores.ars.mean == pytest.approx(0.3402688916953428)
    assert scores.ars.std == pytest.approx(0.04951371764481549)


def test_a_perfect_set_reaches_the_bound_of_equal_weights():
    # synthetic = full real = 1, random real 0: alpha = 0.5 * 1 - 0.5 * 0, LRS = norm(0.5) = 0.544946.
    assert field_scores([1.0], [0.0], [1.0]).lrs.mean == pytest.approx(
        (math.exp(0.5) - math.exp(-1)) / (math.e - math.exp(-1)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(synthetic=[0.8, 0.7], random_real=[0.6], full_real=[0.9, 0.9]), "rounds differ"),
    (dict(synthetic=[], random_real=[], full_real=[]), "rounds differ or are missing"),
    (dict(synthetic=[0.8], random_real=[0.6], full_real=[0.9], synthetic_noaug=[0.7]), "both"),
])
def test_unpaired_evaluations_are_refused(kwargs, message):
    with pytest.raises(DiffdistillError, match=message):
        field_scores(**kwargs)
