"""The field's scores of a distilled set, from our own evaluations (docs/reference.md, "The field's scores").

DD-Ranking (Li et al., arXiv 2505.13300) sets a distilled set against random real images of the same
IPC, trained and tested alike:

- HLR (hard-label recovery) = Acc(full real) - Acc(synthetic): how much of the full set's accuracy is
  still missing (lower is better);
- IOR (improvement over random) = Acc(synthetic) - Acc(random real);
- LRS (label-robust score) = norm(w IOR - (1 - w) HLR), w = 0.5;
- ARS (augmentation-robust score) = norm(g (syn_aug - rdm_aug) + (1 - g)(syn_noaug - rdm_noaug)),
  g = 0.5, which needs the two sets evaluated without DSA as well;

with norm(a) = (e^a - e^-1) / (e - e^-1) and accuracies as fractions. As upstream, each score is
computed per evaluation round (round r of each evaluation together) and reported as mean and
population std over the rounds.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from diffdistill.errors import DiffdistillError
from diffdistill.records import FieldScores, MeanStd

LABEL_WEIGHT = 0.5  # w of LRS: IOR and HLR count alike (DD-Ranking's default)
AUGMENTATION_WEIGHT = 0.5  # gamma of ARS: with and without augmentation count alike


def normalized(value: float) -> float:
    """DD-Ranking's map of a weighted accuracy difference in [-1, 1] onto [0, 1]: (e^v - e^-1) / (e - e^-1)."""
    return (math.exp(value) - math.exp(-1)) / (math.e - math.exp(-1))


def score_text(key: str, value: MeanStd) -> str:
    """A score as people read it: HLR and IOR in accuracy points, 2 decimals; LRS and ARS as they are, 4."""
    scale, digits = (100, 2) if key in ("hlr", "ior") else (1, 4)
    return f"{scale * value.mean:.{digits}f} ± {scale * value.std:.{digits}f}"


def _paired(named: dict[str, Sequence[float]]) -> dict[str, np.ndarray]:
    """Per-round accuracies of each evaluation, refused unless every one has the same number of rounds."""
    counts = {name: len(values) for name, values in named.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise DiffdistillError(f"the field's scores pair the evaluations round by round; their rounds differ or are "
                               f"missing: {counts} (evaluate every set with the same evaluation.rounds)")
    return {name: np.asarray(values, dtype=np.float64) for name, values in named.items()}


def _score(per_round: np.ndarray) -> MeanStd:
    return MeanStd(float(per_round.mean()), float(per_round.std()))


def field_scores(synthetic: Sequence[float], random_real: Sequence[float], full_real: Sequence[float], *,
                 synthetic_noaug: Sequence[float] | None = None,
                 random_real_noaug: Sequence[float] | None = None) -> FieldScores:
    """The scores from per-round test accuracies (fractions) of the synthetic set, random real subsets of
    its IPC and the full real training set, all with DSA; ARS also needs the first two without it."""
    acc = _paired({"synthetic": synthetic, "random_real": random_real, "full_real": full_real})
    hlr = acc["full_real"] - acc["synthetic"]
    ior = acc["synthetic"] - acc["random_real"]
    lrs = np.vectorize(normalized)(LABEL_WEIGHT * ior - (1 - LABEL_WEIGHT) * hlr)
    scores = FieldScores(_score(hlr), _score(ior), _score(lrs))
    if (synthetic_noaug is None) != (random_real_noaug is None):
        raise DiffdistillError("ARS needs both the synthetic set and random real evaluated without augmentation")
    if synthetic_noaug is not None:
        plain = _paired({"synthetic": synthetic, "synthetic_noaug": synthetic_noaug,
                         "random_real_noaug": random_real_noaug})
        beta = (AUGMENTATION_WEIGHT * ior
                + (1 - AUGMENTATION_WEIGHT) * (plain["synthetic_noaug"] - plain["random_real_noaug"]))
        scores.ars = _score(np.vectorize(normalized)(beta))
    return scores
