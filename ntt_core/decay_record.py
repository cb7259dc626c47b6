"""The mask-dependent part of a scoring, kept so that a re-score can leave the masks alone.

NMS, the empty-mask filter and the overlap decay read the proposals' masks, but the bank reaches
them only through each proposal's best class (NMS and the decay work class by class) and
whether a survivor's best score is above 0 (the scoring drops the others). A re-score under
any bank that leaves every proposal's class, and each survivor's sign, as they were keeps the
same proposals with the same decay factors: only the best scores move, and the new confidences
are the recorded factors times them, the very products a full scoring computes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

_FORMAT = "ntt-decay-record-1"


@dataclass(frozen=True)
class DecayRecord:
    """What one scoring of an image's proposals decided from their masks."""

    settings: tuple[float, int]
    """``(nms_iou_threshold, max_before_decay)`` of the scoring: they shape the survivors."""
    labels: np.ndarray
    """(P,) every proposal's best class."""
    survivors: np.ndarray
    """(S,) indices of NMS's survivors in rank order, at most ``max_before_decay``."""
    positive: np.ndarray
    """(S,) whether each survivor's best score was above 0."""
    kept: np.ndarray
    """(N,) indices of the proposals scored: positive survivors with a non-empty mask."""
    decay: np.ndarray
    """(N,) float32 overlap-decay factors ``sqrt(1 - ios)`` of ``kept``."""

    def holds(
        self, labels: torch.Tensor, scores: torch.Tensor, settings: tuple[float, int]
    ) -> bool:
        """Whether a scoring that found best classes ``labels`` and best scores ``scores`` (P,)
        keeps the recorded proposals with the recorded decay factors."""
        if settings != self.settings or len(labels) != len(self.labels):
            return False
        if not np.array_equal(labels.cpu().numpy(), self.labels):
            return False
        survivors = torch.from_numpy(self.survivors).to(scores.device)
        return np.array_equal((scores[survivors] > 0).cpu().numpy(), self.positive)

    def to_bytes(self) -> bytes:
        arrays = {
            "labels": _small(self.labels),
            "survivors": _small(self.survivors),
            "positive": self.positive.astype(np.bool_),
            "kept": _small(self.kept),
            "decay": self.decay.astype(np.float32),
        }
        header = {"format": _FORMAT, "settings": list(self.settings)}
        return save_arrays(arrays, metadata={"ntt": json.dumps(header)})

    @classmethod
    def from_bytes(cls, blob: bytes) -> DecayRecord | None:
        """The record, or None when the bytes are not one (a re-score then reads the masks)."""
        try:
            arrays = load_arrays(blob)
            length = int.from_bytes(blob[:8], "little")
            header = json.loads(json.loads(blob[8 : 8 + length])["__metadata__"]["ntt"])
            if header["format"] != _FORMAT:
                return None
            threshold, limit = header["settings"]
            record = cls(
                (float(threshold), int(limit)),
                *(arrays[k].astype(np.int64) for k in ("labels", "survivors")),
                arrays["positive"].astype(np.bool_),
                arrays["kept"].astype(np.int64),
                arrays["decay"].astype(np.float32),
            )
        except Exception:  # a damaged record costs a full scoring, never a wrong result
            return None
        proposals = len(record.labels)
        valid = (
            len(record.positive) == len(record.survivors)
            and len(record.kept) == len(record.decay)
            and all(((i >= 0) & (i < proposals)).all() for i in (record.survivors, record.kept))
        )
        return record if valid else None


def _small(indices: np.ndarray) -> np.ndarray:
    """Indices as int16 where they fit (a record is stored per image: half the bytes)."""
    fits = len(indices) == 0 or int(indices.max()) < np.iinfo(np.int16).max
    return indices.astype(np.int16 if fits else np.int32)
