"""Minimax Diffusion's two fine-tuning terms on the predicted clean image (docs/reference.md, "Minimax
fine-tuning terms").

Similarity is the cosine similarity of flattened [-1, 1] images (pixel space). For row i of class c,
with p_i its predicted clean image as a unit vector:

- representativeness_i = 1 - min_j cos(p_i, r_j) over the real images r_j of class c in the step's
  global batch other than row i's own image (0 when there is none);
- diversity_i = max_k cos(p_i, g_k) over the generated (predicted) images g_k of class c: the
  class's memory of earlier predictions and the other rows of class c in the same micro-batch, all
  detached (0 when there is none).

Each term is averaged over the micro-batch's rows, so a row without a partner adds 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def unit_rows(images: torch.Tensor) -> torch.Tensor:
    """Each image flattened to a unit vector (fp32): (b, C, H, W) -> (b, D)."""
    return F.normalize(images.flatten(1).float(), dim=1)


def _extreme(similarity: torch.Tensor, allowed: torch.Tensor, largest: bool) -> torch.Tensor:
    """Per row, the max (``largest``) or min of ``similarity`` over the ``allowed`` columns; rows with
    no allowed column get NaN (the caller turns them into 0)."""
    fill = -torch.inf if largest else torch.inf
    masked = similarity.masked_fill(~allowed, fill)
    value = masked.amax(1) if largest else masked.amin(1)
    return torch.where(allowed.any(1), value, torch.nan)


def representativeness(pred: torch.Tensor, labels: torch.Tensor, active: torch.Tensor, real: torch.Tensor,
                       real_labels: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Per row 1 - (least cosine similarity to the other real images of its class), 0 without any.

    ``pred`` (b, D) and ``real`` (B, D) are unit rows; ``own`` (b,) is each row's index into ``real``
    (its own clean image, left out); ``active`` (b,) bool marks the rows the term applies to.
    """
    similarity = pred @ real.T  # (b, B)
    others = torch.arange(real.shape[0], device=real.device) != own.view(-1, 1)  # (b, B)
    allowed = (labels.view(-1, 1) == real_labels.view(1, -1)) & others & active.view(-1, 1)
    least = _extreme(similarity, allowed, largest=False)  # (b,)
    return torch.nan_to_num(1.0 - least, nan=0.0)


class ClassMemory:
    """Per class, the newest ``size`` unit vectors pushed (a ring buffer), on the training device."""

    def __init__(self, num_classes: int, size: int, dim: int, device: torch.device):
        self.size = size
        self.vectors = torch.zeros(num_classes, size, dim, device=device)  # (K, M, D)
        self.filled = torch.zeros(num_classes, dtype=torch.long, device=device)  # (K,) entries held
        self.next = torch.zeros(num_classes, dtype=torch.long, device=device)  # (K,) slot written next

    def valid(self) -> torch.Tensor:
        """(K, M) bool: the slots that hold an entry."""
        return torch.arange(self.size, device=self.filled.device) < self.filled.view(-1, 1)

    @torch.no_grad()
    def push(self, vectors: torch.Tensor, labels: torch.Tensor) -> None:
        """Append ``vectors`` (n, D) to their classes' queues in row order; per class only the newest
        ``size`` survive."""
        num_classes = self.vectors.shape[0]
        onehot = F.one_hot(labels, num_classes)  # (n, K)
        rank = onehot.cumsum(0).gather(1, labels.view(-1, 1)).squeeze(1) - 1  # (n,) order within its class
        count = onehot.sum(0)  # (K,) pushed per class
        keep = rank >= count[labels] - self.size  # the newest `size` of each class: distinct slots
        slot = (self.next[labels] + rank) % self.size  # (n,)
        # Out of place: this micro-batch's graph still holds the old entries for its backward pass.
        self.vectors = self.vectors.index_put((labels[keep], slot[keep]), vectors[keep].to(self.vectors.dtype))
        self.next = (self.next + count) % self.size
        self.filled = torch.clamp(self.filled + count, max=self.size)


def diversity(pred: torch.Tensor, labels: torch.Tensor, active: torch.Tensor,
              memory: ClassMemory | None) -> torch.Tensor:
    """Per row the largest cosine similarity to the generated images of its class (``memory`` and the
    other active rows of ``pred``, detached), 0 without any. ``pred`` (b, D) unit rows."""
    same = (labels.view(-1, 1) == labels.view(1, -1)) & active.view(-1, 1) & active.view(1, -1)  # (b, b)
    same &= ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    similarity, allowed = pred @ pred.detach().T, same  # (b, b)
    if memory is not None:
        num_classes, size, dim = memory.vectors.shape
        to_memory = (pred @ memory.vectors.view(-1, dim).T).view(-1, num_classes, size)  # (b, K, M)
        to_memory = to_memory[torch.arange(len(labels), device=labels.device), labels]  # (b, M)
        in_memory = memory.valid()[labels] & active.view(-1, 1)  # (b, M)
        similarity, allowed = torch.cat([similarity, to_memory], 1), torch.cat([allowed, in_memory], 1)
    return torch.nan_to_num(_extreme(similarity, allowed, largest=True), nan=0.0)


class MinimaxTerms:
    """The weighted sum of the two terms for one micro-batch, and the diversity memory of this process."""

    def __init__(self, representativeness_weight: float, diversity_weight: float, memory_size: int,
                 num_classes: int, image_shape, device: torch.device):
        self.representativeness_weight, self.diversity_weight = representativeness_weight, diversity_weight
        dim = math.prod(image_shape)
        self.memory = ClassMemory(num_classes, memory_size, dim, device) if diversity_weight > 0 else None

    def __call__(self, x0_pred: torch.Tensor, labels: torch.Tensor, active: torch.Tensor, real: torch.Tensor,
                 real_labels: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """Weighted mean terms of the rows ``x0_pred`` (b, C, H, W); then the active rows join the memory."""
        pred = unit_rows(x0_pred)  # (b, D)
        total = torch.zeros((), device=pred.device)
        if self.representativeness_weight > 0:
            terms = representativeness(pred, labels, active, unit_rows(real), real_labels, own)
            total = total + self.representativeness_weight * terms.mean()
        if self.diversity_weight > 0:
            total = total + self.diversity_weight * diversity(pred, labels, active, self.memory).mean()
            self.memory.push(pred.detach()[active], labels[active])
        return total
