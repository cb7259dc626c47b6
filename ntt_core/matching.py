"""Semantic-aware matching: proposal features, class scores and the overlap decay."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def upsampling_matrix(source: int, target: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(target, source) matrix of 1-D bilinear (antialiased, align_corners=False) resampling.

    Bilinear resampling is separable and linear, so a 2-D resize of a map X is ``U @ X @ U.T``.
    The weights are torch's own on ``device`` (its kernels there compute them).
    """
    # Width 2, not 1: torch's antialiased kernel mishandles a width-1 input (all mass on row 0).
    identity = torch.eye(source, device=device).reshape(source, 1, source, 1).expand(-1, -1, -1, 2)
    columns = F.interpolate(
        identity.contiguous(),
        size=(target, 2),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    return columns[:, 0, :, 0].T.contiguous()


def pooled_features(tokens: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the upsampled token map over each mask, L2-normalised.

    tokens: (h, w, C) DINOv2 patch tokens of the target; masks: (P, H, W) bool at the low-res
    mask size. Equals upsampling the tokens to (H, W) and averaging under each mask, but costs
    two small matrix products per proposal instead of an (H*W) x C map: the mask is pooled onto
    the token grid by the transpose of the upsampling, then one product with the tokens.
    Returns (features (P, C), valid (P,)); masks with no pixel have no feature (valid False).
    """
    grid_h, grid_w, channels = tokens.shape
    rows = upsampling_matrix(grid_h, masks.shape[1]).to(tokens.device)
    cols = upsampling_matrix(grid_w, masks.shape[2]).to(tokens.device)
    weights = masks.float()
    pooled = rows.T @ weights @ cols  # (P, h, w): each mask seen on the token grid
    sums = pooled.flatten(1) @ tokens.reshape(-1, channels).float()
    areas = weights.flatten(1).sum(dim=1)
    valid = areas > 0
    means = sums / areas.clamp(min=1)[:, None]
    return F.normalize(means, dim=1), valid


def semantic_scores(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """(P, K) scores ``max(0, cos(feature, prototype))`` for normalised inputs."""
    return (features @ prototypes.T).clamp(min=0)


def scores_with_negatives(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    negatives: torch.Tensor,
    negative_labels: torch.Tensor,
    sigma: float,
) -> torch.Tensor:
    """(P, K) class scores lowered where a proposal resembles a class's negative references.

    ``pos_k = max(0, f·p_k)``, ``neg_k = max over the negatives n of class k of max(0, f·n)``
    (0 when class k has none) and the score is ``pos_k * exp(-max(0, neg_k - pos_k) / sigma)``,
    as in the reference implementation's negative path. Unlike it, ``p_k`` stays our prototype
    (the mean of the instance features) instead of a token-weighted class mean, so a negative
    changes only the decay factor. ``negatives`` (M, C) are L2-normalised; ``negative_labels``
    (M,) index the classes. Without negatives this is ``semantic_scores`` exactly.
    """
    positive = semantic_scores(features, prototypes)
    if negatives.shape[0] == 0:
        return positive
    closest = closest_negatives(features, negatives, negative_labels, prototypes.shape[0])
    return positive * torch.exp(-(closest - positive).clamp(min=0) / sigma)


def closest_negatives(
    features: torch.Tensor, negatives: torch.Tensor, negative_labels: torch.Tensor, classes: int
) -> torch.Tensor:
    """(P, K) ``neg_k``: the highest ``max(0, f·n)`` over the negatives n of class k (0: none)."""
    closest = torch.zeros(features.shape[0], classes, dtype=features.dtype, device=features.device)
    if negatives.shape[0] == 0:
        return closest
    similarity = (features @ negatives.T).clamp(min=0)  # (P, M)
    index = negative_labels.to(features.device)[None].expand_as(similarity)
    return closest.scatter_reduce(1, index, similarity, reduce="amax", include_self=True)


FLOAT16_ROUNDING = 2.0**-11 + 1e-6
"""Bound on ``|f16(f)·v - f·v|`` for unit vectors f and v: float16 keeps each element within
2^-11 of itself relatively (within 2^-25 below its normal range: under 1e-6 over 1024 elements),
so by Cauchy-Schwarz the product moves by at most that times ``|f||v| = 1``."""


@dataclass(frozen=True)
class NegativesScreen:
    """Tells whether adding some negatives to a bank leaves a proposal set's results as they
    were (so its image's result cannot change).

    A new negative n of class k raises ``neg_k`` to ``max(neg_k, f·n)``, and the score's decay
    ``exp(-max(0, neg_k - pos_k) / sigma)`` moves only if ``f·n > max(neg_k, pos_k)``. Even then
    only the proposal's best class and score reach the result (``NTTPredictor.score`` keeps
    nothing else), and a negative only lowers class k's score: if k's score was already below
    another class's, the best stays. ``margin`` absorbs rounding between this computation and
    the scoring's; features given in float16 widen it by their rounding (``FLOAT16_ROUNDING``
    per product, scaled by how fast each test's quantity moves with a product). A proposal that
    comes within it counts as changed.
    """

    prototypes: torch.Tensor
    old_negatives: torch.Tensor
    old_labels: torch.Tensor
    added_negatives: torch.Tensor
    added_labels: torch.Tensor
    sigma: float
    """The scoring's ``negative_sigma``."""
    margin: float = 1e-4

    @classmethod
    def of(
        cls,
        prototypes: torch.Tensor,
        negatives: torch.Tensor,
        negative_labels: torch.Tensor,
        added: torch.Tensor,
        sigma: float,
    ) -> NegativesScreen:
        """For a bank's prototypes and negatives, ``added`` (M,) bool marking the new ones."""
        old = ~added
        return cls(
            prototypes,
            negatives[old],
            negative_labels[old],
            negatives[added],
            negative_labels[added],
            sigma,
        )

    def unchanged(
        self, features: torch.Tensor, counts: Sequence[int], chunk_rows: int = 4096
    ) -> list[bool]:
        """For images whose (P, C) proposal features are stacked in ``features`` (float32, or
        float16 with a wider margin), ``counts`` rows each, whether each image's proposals all
        keep their best class and score. The images go in chunks of about ``chunk_rows``
        proposals, on the new negatives' classes only: each chunk is converted to float32 and
        multiplied while it sits in the CPU's cache (a round's rows are gigabytes). The few
        proposals a chunk cannot clear get all their class scores."""
        if self.added_negatives.shape[0] == 0:
            return [True] * len(counts)
        verdicts: list[bool] = []
        start = 0
        for chunk in _chunks(counts, chunk_rows):
            moved = self._moved(features[start : start + sum(chunk)])
            verdicts += [not bool(part.any()) for part in moved.split(chunk)]
            start += sum(chunk)
        return verdicts

    def _moved(self, features: torch.Tensor) -> torch.Tensor:
        """(P,) whether a proposal may change its best class or score."""
        rounding = FLOAT16_ROUNDING if features.dtype == torch.float16 else 0.0
        features = features.float()
        # Each test compares two quantities that each move by at most ``rounding`` per product
        # (the second one's scores by (1 + 2 / sigma) products, their largest slope).
        moved = self._near_added(features, self.margin + 2 * rounding)
        rows = torch.nonzero(moved).flatten()
        slope = 1 + 2 / self.sigma
        moved[rows[self._keep_best(features[rows], self.margin + 2 * rounding * slope)]] = False
        return moved

    @functools.cached_property
    def _queries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """What ``_near_added`` multiplies the proposals by, as one matrix (the new negatives'
        classes' prototypes, their older negatives, the new negatives), with the class of each
        older negative and of each new one as an index into those classes, and those classes."""
        classes, added_index = torch.unique(self.added_labels, return_inverse=True)
        older = torch.isin(self.old_labels, classes)
        queries = torch.cat(
            [self.prototypes[classes], self.old_negatives[older], self.added_negatives]
        )
        older_index = torch.searchsorted(classes, self.old_labels[older])
        return queries.T.contiguous(), older_index, added_index, classes

    def _near_added(self, features: torch.Tensor, margin: float) -> torch.Tensor:
        """(P,) whether a new negative comes within ``margin`` of ``max(pos_k, neg_k)`` of its
        class k while ``pos_k`` is not 0 (a score ``0 * decay`` stays 0), computed for the new
        negatives' classes only, with one product."""
        queries, older_index, added_index, classes = self._queries
        products = features @ queries
        similarity, older, added = products.split(
            [len(classes), len(older_index), len(added_index)], dim=1
        )
        closest = torch.zeros_like(similarity)
        if len(older_index):
            index = older_index[None].expand_as(older)
            closest = closest.scatter_reduce(1, index, older.clamp(min=0), "amax")
        threshold = torch.maximum(similarity.clamp(min=0), closest)[:, added_index]  # (P, A)
        near = added >= threshold - margin
        return (near & (similarity[:, added_index] > -margin)).any(dim=1)

    def _keep_best(self, features: torch.Tensor, margin: float) -> torch.Tensor:
        """(P,) whether every new negative's class scored at least ``margin`` below another
        class before (so also after: negatives only lower a score)."""
        scores = scores_with_negatives(
            features, self.prototypes, self.old_negatives, self.old_labels, self.sigma
        )
        touched = torch.zeros(scores.shape[1], dtype=torch.bool)
        touched[self.added_labels] = True
        others = scores.masked_fill(touched, float("-inf")).max(dim=1).values
        return scores[:, touched].max(dim=1).values <= others - margin


def assign_classes(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best class per proposal: (score (P,), label (P,)); one class per mask."""
    best, labels = scores.max(dim=1)
    return best, labels


def overlap_decay(
    scores: torch.Tensor,
    labels: torch.Tensor,
    features: torch.Tensor,
    overlap_over_self: torch.Tensor,
) -> torch.Tensor:
    """Semantic-aware overlap decay, applied within each class in the given order: the scores
    times their ``decay_factors``."""
    return scores * decay_factors(labels, features, overlap_over_self)


def decay_factors(
    labels: torch.Tensor, features: torch.Tensor, overlap_over_self: torch.Tensor
) -> torch.Tensor:
    """The overlap decay's factor of each proposal, in the given order.

    For proposal i, ``ios_i = max_{j before i} |M_i ∩ M_j| / |M_i| * max(0, cos(f_i, f_j))`` and
    the score becomes ``score_i * sqrt(1 - ios_i)``. A proposal covered by an earlier, similar
    looking one of the same class (a part of the same object, typically) loses confidence.
    ``overlap_over_self[i, j]`` holds ``|M_i ∩ M_j| / |M_i|``; only same-class pairs j < i are read.
    The factors depend on the classes, features and masks, never on the scores.
    """
    same_class = labels[:, None] == labels[None, :]
    similarity = (features @ features.T).clamp(min=0)
    weighted = overlap_over_self.to(similarity) * similarity * same_class
    max_overlap = weighted.tril(diagonal=-1).max(dim=1).values.clamp(0, 1)
    return torch.sqrt(1 - max_overlap)


def _chunks(counts: Sequence[int], rows: int) -> Iterator[list[int]]:
    """Consecutive images' row counts, grouped until a group holds ``rows`` proposals (an
    image is never split: its verdict needs all its proposals)."""
    chunk: list[int] = []
    for count in counts:
        chunk.append(count)
        if sum(chunk) >= rows:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
