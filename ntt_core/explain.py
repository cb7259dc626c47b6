"""Why a prediction was made: its reasons, from its proposal's feature and the bank.

Every number is a cosine similarity between L2-normalised DINOv2 features, the quantity the
method's class score is built from (``matching.semantic_scores`` clamps it at 0, the negatives'
decay compares it with the nearest negative's). They are reported unclamped so that two
dissimilar candidates still rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .bank import MemoryBank

ATTRIBUTES = (
    "sam_iou",
    "class_similarity",
    "runner_up",
    "margin",
    "nearest_reference",
    "nearest_reference_similarity",
    "nearest_negative_similarity",
)
"""The names a prediction's reasons carry, in the order ``Explanation.rows`` gives them."""


@dataclass
class Explanation:
    """Per predicted instance (parallel to ``Instances``), why it was predicted."""

    sam_iou: np.ndarray
    """(N,) SAM2's predicted IoU of the proposal."""
    class_similarity: np.ndarray
    """(N,) cosine of the proposal's feature to its class's prototype."""
    runner_up: list[str | None]
    """The other class whose prototype is most similar (None: the bank has one class)."""
    margin: np.ndarray
    """(N,) ``class_similarity`` minus the runner-up's; NaN where there is no runner-up.
    Negative where the bank's negatives lowered the most similar class below another."""
    nearest_reference: list[str]
    """The label id of the most similar reference of the class (its bank id's last part)."""
    nearest_reference_similarity: np.ndarray
    nearest_negative_similarity: np.ndarray
    """(N,) cosine to the most similar negative of the class; NaN where it has none."""

    def __len__(self) -> int:
        return len(self.sam_iou)

    def select(self, index: np.ndarray) -> Explanation:
        index = np.asarray(index, dtype=np.int64)
        return Explanation(
            **{
                name: (value[index] if isinstance(value, np.ndarray) else [value[i] for i in index])
                for name, value in self.__dict__.items()
            }
        )

    def rows(self) -> list[dict[str, float | str | None]]:
        """One ``{attribute: value}`` per instance, JSON-ready: floats, str, None for NaN."""
        columns = [_plain(getattr(self, name)) for name in ATTRIBUTES]
        return [dict(zip(ATTRIBUTES, values)) for values in zip(*columns)]


def explain(
    features: torch.Tensor, labels: torch.Tensor, sam_iou: torch.Tensor, bank: MemoryBank
) -> Explanation:
    """The reasons of predictions with L2-normalised ``features`` (N, C) of classes ``labels``
    (N,) and SAM2's ``sam_iou`` (N,). A few (N, R) products; in numpy, since on arrays of a few
    rows each torch call costs more than its work (this runs once per scored image)."""
    features = features.detach().float().cpu().numpy()
    labels = labels.cpu().numpy()
    rows = np.arange(len(labels))
    to_prototypes = features @ bank.prototypes.numpy().T  # (N, K)
    class_similarity = to_prototypes[rows, labels]
    if len(bank.classes) > 1:
        to_prototypes[rows, labels] = -np.inf
        runner_up = to_prototypes.argmax(axis=1)
        margin = class_similarity - to_prototypes[rows, runner_up]
        runner_up_names = [bank.classes[k] for k in runner_up.tolist()]
    else:
        margin = np.full(len(labels), np.nan, dtype=np.float32)
        runner_up_names = [None] * len(labels)
    reference_similarity, nearest = _nearest_of_class(
        features, labels, bank.unit_references, bank.labels.numpy()
    )
    negative_similarity, _ = _nearest_of_class(
        features, labels, bank.negatives.numpy(), bank.negative_labels.numpy()
    )
    return Explanation(
        sam_iou=sam_iou.detach().float().cpu().numpy(),
        class_similarity=class_similarity,
        runner_up=runner_up_names,
        margin=margin,
        nearest_reference=[label_id(bank.ref_ids[j]) for j in nearest.tolist()],
        nearest_reference_similarity=reference_similarity,
        nearest_negative_similarity=negative_similarity,
    )


def label_id(ref_id: str) -> str:
    """The label id part of a bank id ``sample_id:label_id``."""
    return ref_id.rsplit(":", 1)[-1]


def _nearest_of_class(
    features: np.ndarray, labels: np.ndarray, members: np.ndarray, member_labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each feature, the highest cosine to a member of its own class and that member's
    index; NaN and -1 where the class has no member. Class by class: each row meets only its
    own class's members (a bank of 80 classes holds 80 times more)."""
    best = np.full(len(labels), np.nan, dtype=np.float32)
    index = np.full(len(labels), -1)
    rows_by_class = _groups(labels)
    for label, own in _groups(member_labels).items():
        rows = rows_by_class.get(label)
        if rows is None:
            continue
        similarity = features[rows] @ members[own].T
        nearest = similarity.argmax(axis=1)
        best[rows] = similarity[np.arange(len(rows)), nearest]
        index[rows] = own[nearest]
    return best, index


def _groups(labels: np.ndarray) -> dict[int, np.ndarray]:
    """The positions of each label, in one sort."""
    order = np.argsort(labels, kind="stable")
    values, starts = np.unique(labels[order], return_index=True)
    return dict(zip(values.tolist(), np.split(order, starts[1:])))


def _plain(values: np.ndarray | list) -> list:
    if isinstance(values, list):
        return values
    return [None if math.isnan(v) else v for v in values.tolist()]
