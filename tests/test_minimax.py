"""Minimax fine-tuning terms: values on hand-built unit vectors, the direction gradient steps move the
similarities, the per-class memory queue (docs/reference.md, "Minimax fine-tuning terms")."""

from __future__ import annotations

import math

import pytest
import torch

from diffdistill.diffusion import minimax

E1, E2, E3 = torch.eye(3)
DIAGONAL = (E1 + E2) / math.sqrt(2)  # cos 1/sqrt(2) to e1 and to e2


def max_pairwise(x: torch.Tensor) -> float:
    """The largest cosine similarity between two different rows."""
    unit = minimax.unit_rows(x)
    similarity = unit @ unit.T - 2 * torch.eye(len(x))
    return similarity.max().item()


def test_unit_rows_are_flattened_unit_vectors():
    images = torch.tensor([[[[3.0, 4.0]]], [[[0.0, -2.0]]]])  # (2, 1, 1, 2)
    assert torch.equal(minimax.unit_rows(images), torch.tensor([[0.6, 0.8], [0.0, -1.0]]))


def test_diversity_is_the_largest_similarity_to_another_prediction_of_the_class():
    pred = torch.stack([E1, DIAGONAL, E2, E3])
    labels = torch.tensor([0, 0, 0, 1])
    terms = minimax.diversity(pred, labels, torch.ones(4, dtype=torch.bool), None)
    # e1-d and d-e2 have 1/sqrt(2), e1-e2 0; e3 is alone in its class: 0.
    torch.testing.assert_close(terms, torch.tensor([1 / math.sqrt(2)] * 3 + [0.0]))
    inactive_middle = torch.tensor([True, False, True, True])  # its label was dropped: not a partner
    terms = minimax.diversity(pred, labels, inactive_middle, None)
    torch.testing.assert_close(terms, torch.zeros(4))


def test_representativeness_uses_the_least_similar_other_real_image_of_the_class():
    real = torch.stack([E1, E2, DIAGONAL, -E1])
    real_labels = torch.tensor([0, 0, 0, 1])
    pred = torch.stack([E1, DIAGONAL])
    own = torch.tensor([0, 2])  # their own clean images are real rows 0 and 2: left out
    terms = minimax.representativeness(pred, torch.tensor([0, 0]), torch.ones(2, dtype=torch.bool), real,
                                       real_labels, own)
    # e1 vs {e2, d}: least 0 -> 1; d vs {e1, e2}: least 1/sqrt(2). -e1 is another class.
    torch.testing.assert_close(terms, torch.tensor([1.0, 1 - 1 / math.sqrt(2)]))
    alone = minimax.representativeness(E3[None], torch.tensor([1]), torch.ones(1, dtype=torch.bool), real,
                                       real_labels, torch.tensor([3]))
    assert alone.tolist() == [0.0]  # class 1 has no other real image in the batch


def test_diversity_steps_lower_the_largest_pairwise_similarity():
    torch.manual_seed(0)
    base = torch.randn(1, 3, 4, 4)
    x = (base + 0.3 * torch.randn(6, 3, 4, 4)).requires_grad_(True)  # six similar predictions, one class
    labels, active = torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.bool)
    before = max_pairwise(x.detach())
    optimizer = torch.optim.SGD([x], lr=20.0)  # |x| ~ 7: the cosine gradient is small
    for _ in range(20):
        optimizer.zero_grad()
        minimax.diversity(minimax.unit_rows(x), labels, active, None).mean().backward()
        optimizer.step()
    assert max_pairwise(x.detach()) < before - 0.05, (before, max_pairwise(x.detach()))


def test_representativeness_steps_raise_the_least_similarity_to_the_real_images():
    torch.manual_seed(1)
    real = torch.randn(5, 3, 4, 4)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    labels, active = torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.bool)
    real_unit, own = minimax.unit_rows(real), torch.tensor([-1, -1])  # no own image among them

    def least() -> float:
        return (minimax.unit_rows(x.detach()) @ real_unit.T).min().item()

    before = least()
    optimizer = torch.optim.SGD([x], lr=20.0)  # |x| ~ 7: the cosine gradient is small
    for _ in range(20):
        optimizer.zero_grad()
        terms = minimax.representativeness(minimax.unit_rows(x), labels, active, real_unit,
                                           torch.zeros(5, dtype=torch.long), own)
        terms.mean().backward()
        optimizer.step()
    assert least() > before + 0.05, (before, least())


def test_rows_without_partners_get_zero_gradients():
    x = torch.randn(3, 4, requires_grad=True)
    labels = torch.tensor([0, 1, 2])
    pred = minimax.unit_rows(x)
    total = minimax.diversity(pred, labels, torch.ones(3, dtype=torch.bool), None).sum()
    total = total + minimax.representativeness(pred, labels, torch.ones(3, dtype=torch.bool), pred.detach(),
                                               labels, torch.arange(3)).sum()
    total.backward()
    assert total.item() == 0.0 and torch.equal(x.grad, torch.zeros(3, 4))


def test_memory_keeps_the_newest_entries_per_class():
    memory = minimax.ClassMemory(num_classes=2, size=3, dim=1, device=torch.device("cpu"))
    assert not memory.valid().any()
    memory.push(torch.tensor([[1.0], [2.0], [10.0]]), torch.tensor([0, 0, 1]))
    memory.push(torch.tensor([[3.0], [4.0]]), torch.tensor([0, 0]))  # class 0 wraps: 1 goes
    held = lambda c: sorted(memory.vectors[c, memory.valid()[c], 0].tolist())  # noqa: E731
    assert held(0) == [2.0, 3.0, 4.0] and held(1) == [10.0]
    memory.push(torch.arange(5.0, 10.0).view(5, 1), torch.zeros(5, dtype=torch.long))  # more than it holds
    assert held(0) == [7.0, 8.0, 9.0] and held(1) == [10.0]
    assert memory.filled.tolist() == [3, 1]


def test_memory_entries_count_for_diversity_and_the_terms_fill_it():
    terms = minimax.MinimaxTerms(0.0, 2.0, memory_size=4, num_classes=2, image_shape=(3,), device=torch.device("cpu"))
    own = torch.tensor([0])
    first = terms(E1[None], torch.tensor([1]), torch.tensor([True]), E1[None], torch.tensor([1]), own)
    assert first.item() == 0.0  # empty memory, no partner in the batch: off
    assert terms.memory.filled.tolist() == [0, 1]
    second = terms(DIAGONAL[None], torch.tensor([1]), torch.tensor([True]), E1[None], torch.tensor([1]), own)
    assert second.item() == pytest.approx(2.0 / math.sqrt(2))  # weight x cos(d, e1 in memory)
    terms(E2[None], torch.tensor([0]), torch.tensor([False]), E1[None], torch.tensor([0]), own)
    assert terms.memory.filled.tolist() == [0, 2]  # a row with a dropped label does not join
