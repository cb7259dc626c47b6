"""The memory bank: per-reference features, class prototypes, and their file format.

A bank is a safetensors blob whose header metadata holds one JSON document (format version,
encoder identity and input size, classes, and per entry its provenance id and when it was added).
Version 2 holds positive references (tensors ``features``, ``labels``, ``prototypes``) and
negative ones (``negative_features``, ``negative_labels``); version-1 files, which have no
negatives and no timestamps, still load. Loading parses JSON and raw tensors only; nothing is
unpickled.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .errors import BankError, BankMismatchError, ReferenceInputError

BANK_FORMAT = "ntt-memory-bank"
BANK_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_HEADER_KEY = "ntt_bank"
_V1_TENSORS = {"features", "labels", "prototypes"}
_V2_TENSORS = _V1_TENSORS | {"negative_features", "negative_labels"}


@dataclass
class MemoryBank:
    """Reference features grouped by class; ``prototypes`` is what scoring uses."""

    classes: list[str]
    features: torch.Tensor
    """(N, C) float32 mask-weighted mean DINOv2 features, one per reference, not normalised."""
    labels: torch.Tensor
    """(N,) int64 index into ``classes``."""
    ref_ids: list[str]
    encoder: str
    """Identity of the encoder that made the features (registry name, plus weights kind)."""
    encoder_image_size: int
    negative_features: torch.Tensor | None = None
    """(M, C) float32 features of negative references (false positives), encoded like
    ``features``; None or empty: no negatives."""
    negative_labels: torch.Tensor | None = None
    """(M,) int64 index into ``classes``: the class each negative must not be taken for."""
    negative_ids: list[str] = field(default_factory=list)
    ref_added: list[str | None] | None = None
    """When each positive entry joined the bank (ISO 8601 UTC); None where unknown (version 1)."""
    negative_added: list[str | None] | None = None
    prototypes: torch.Tensor = field(init=False)
    """(K, C) float32 L2-normalised mean feature of each class (positives only)."""
    negatives: torch.Tensor = field(init=False)
    """(M, C) float32 L2-normalised negative features, what scoring uses."""

    def __post_init__(self) -> None:
        self.features = self.features.float().cpu()
        self.labels = self.labels.long().cpu()
        if self.negative_features is None:
            self.negative_features = torch.zeros(0, self.features.shape[-1])
        if self.negative_labels is None:
            self.negative_labels = torch.zeros(0, dtype=torch.int64)
        self.negative_features = self.negative_features.float().cpu()
        self.negative_labels = self.negative_labels.long().cpu()
        self.negative_ids = list(self.negative_ids)
        if self.ref_added is None:
            self.ref_added = [None] * len(self.ref_ids)
        if self.negative_added is None:
            self.negative_added = [None] * len(self.negative_ids)
        _validate(self)
        self.prototypes = class_prototypes(self.features, self.labels, len(self.classes))
        self.negatives = F.normalize(self.negative_features, dim=1)

    @functools.cached_property
    def unit_references(self) -> np.ndarray:
        """(N, C) the references' features, L2-normalised (what explanations compare with),
        worked out once per bank rather than once per scored image."""
        features = self.features.numpy()
        return features / np.linalg.norm(features, axis=1, keepdims=True)

    @classmethod
    def from_features(
        cls,
        features: torch.Tensor,
        labels: Sequence[str],
        ref_ids: Sequence[str],
        encoder: str,
        encoder_image_size: int,
        classes: Sequence[str] | None = None,
        negatives: Negatives | None = None,
        ref_added: Sequence[str | None] | None = None,
    ) -> MemoryBank:
        """Groups reference features by class name; every requested class needs a reference.

        Negatives of a class the bank does not hold are left out (nothing to lower).
        """
        classes = list(classes) if classes is not None else sorted(set(labels))
        missing = [name for name in classes if name not in set(labels)]
        if missing:
            raise ReferenceInputError(
                f"No reference for class(es) {missing}: tag at least one instance of each, "
                f"or leave them out of the requested classes"
            )
        index = {name: i for i, name in enumerate(classes)}
        keep = [i for i, name in enumerate(labels) if name in index]
        added = list(ref_added) if ref_added is not None else [None] * len(labels)
        negatives = negatives or Negatives.empty(features.shape[-1])
        keep_neg = [i for i, name in enumerate(negatives.labels) if name in index]
        return cls(
            classes=classes,
            features=features[keep],
            labels=torch.tensor([index[labels[i]] for i in keep], dtype=torch.int64),
            ref_ids=[ref_ids[i] for i in keep],
            encoder=encoder,
            encoder_image_size=encoder_image_size,
            negative_features=negatives.features[keep_neg],
            negative_labels=torch.tensor(
                [index[negatives.labels[i]] for i in keep_neg], dtype=torch.int64
            ),
            negative_ids=[negatives.ids[i] for i in keep_neg],
            ref_added=[added[i] for i in keep],
            negative_added=[negatives.added[i] for i in keep_neg],
        )

    def __len__(self) -> int:
        return len(self.ref_ids)

    @property
    def references_per_class(self) -> dict[str, int]:
        counts = torch.bincount(self.labels, minlength=len(self.classes)).tolist()
        return dict(zip(self.classes, counts))

    @property
    def negatives_per_class(self) -> dict[str, int]:
        counts = torch.bincount(self.negative_labels, minlength=len(self.classes)).tolist()
        return dict(zip(self.classes, counts))

    def reference_quality(self) -> torch.Tensor:
        """Each reference's similarity to the mean of the other references of its class, in [0, 1].

        ``(cos + 1) / 2``; NaN for a class's only reference. Low values flag references that look
        unlike the rest of their class (wrong label, occluded, odd crop).
        """
        quality = torch.full((len(self),), float("nan"))
        for k in range(len(self.classes)):
            members = torch.nonzero(self.labels == k).flatten()
            if members.numel() < 2:
                continue
            feats = self.features[members]
            others = (feats.sum(0, keepdim=True) - feats) / (members.numel() - 1)
            cosine = F.cosine_similarity(feats, others, dim=1)
            quality[members] = (cosine + 1) / 2
        return quality

    def check_compatible(self, encoder: str, encoder_image_size: int) -> None:
        """Refuses a bank made by another encoder or at another input size."""
        if (self.encoder, self.encoder_image_size) != (encoder, encoder_image_size):
            raise BankMismatchError(
                f"This memory bank was built with encoder {self.encoder!r} at "
                f"{self.encoder_image_size}px, but the predictor uses {encoder!r} at "
                f"{encoder_image_size}px. Rebuild the bank with the predictor's encoder, or "
                f"configure encoder_model/encoder_image_size to match the bank."
            )

    def header(self) -> dict:
        return {
            "format": BANK_FORMAT,
            "version": BANK_VERSION,
            "encoder": self.encoder,
            "encoder_image_size": self.encoder_image_size,
            "classes": self.classes,
            "ref_ids": self.ref_ids,
            "ref_added": self.ref_added,
            "negative_ids": self.negative_ids,
            "negative_added": self.negative_added,
        }

    def to_bytes(self) -> bytes:
        tensors = {
            "features": self.features.contiguous(),
            "labels": self.labels.contiguous(),
            "prototypes": self.prototypes.contiguous(),
            "negative_features": self.negative_features.contiguous(),
            "negative_labels": self.negative_labels.contiguous(),
        }
        return save_tensors(tensors, metadata={_HEADER_KEY: json.dumps(self.header())})

    @classmethod
    def from_bytes(cls, blob: bytes) -> MemoryBank:
        header = _read_header(blob)
        try:
            tensors = load_tensors(blob)
        except Exception as error:  # safetensors raises its own error types
            raise BankError(f"Memory bank tensors are corrupt: {error}") from error
        expected = _V1_TENSORS if header["version"] == 1 else _V2_TENSORS
        if set(tensors) != expected:
            raise BankError(f"Memory bank holds unexpected tensors {sorted(tensors)}")
        bank = cls(
            classes=list(header["classes"]),
            features=tensors["features"],
            labels=tensors["labels"],
            ref_ids=list(header["ref_ids"]),
            encoder=str(header["encoder"]),
            encoder_image_size=int(header["encoder_image_size"]),
            negative_features=tensors.get("negative_features"),
            negative_labels=tensors.get("negative_labels"),
            negative_ids=list(header.get("negative_ids", [])),
            ref_added=header.get("ref_added"),
            negative_added=header.get("negative_added"),
        )
        if not torch.allclose(bank.prototypes, tensors["prototypes"], atol=1e-5):
            raise BankError("Memory bank prototypes do not match its features: the file is corrupt")
        return bank

    def save(self, path: str | Path) -> Path:
        """Writes the bank atomically (a reader never sees a half-written file)."""
        path = Path(path)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_bytes(self.to_bytes())
        os.replace(temporary, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> MemoryBank:
        path = Path(path)
        if not path.is_file():
            raise BankError(f"Memory bank file not found: {path}")
        return cls.from_bytes(path.read_bytes())


@dataclass
class Negatives:
    """Negative references before they join a bank: features, class names, ids, timestamps."""

    features: torch.Tensor
    labels: list[str]
    ids: list[str]
    added: list[str | None]

    @classmethod
    def empty(cls, channels: int) -> Negatives:
        return cls(torch.zeros(0, channels), [], [], [])


def class_prototypes(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """L2-normalised mean feature per class: (K, C)."""
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float32)
    sums.index_add_(0, labels, features.float())
    counts = torch.bincount(labels, minlength=num_classes).clamp(min=1)
    return F.normalize(sums / counts[:, None], dim=1)


def _validate(bank: MemoryBank) -> None:
    n = bank.features.shape[0]
    if bank.features.ndim != 2 or bank.labels.shape != (n,) or len(bank.ref_ids) != n:
        raise BankError(
            f"Memory bank is inconsistent: features {tuple(bank.features.shape)}, "
            f"labels {tuple(bank.labels.shape)}, {len(bank.ref_ids)} reference ids"
        )
    if len(set(bank.classes)) != len(bank.classes):
        raise BankError(f"Memory bank has duplicate classes: {bank.classes}")
    if n and (int(bank.labels.min()) < 0 or int(bank.labels.max()) >= len(bank.classes)):
        raise BankError("Memory bank labels point outside its class list")
    if not bool(torch.isfinite(bank.features).all()):
        raise BankError("Memory bank features contain NaN or infinite values")
    m = bank.negative_features.shape[0]
    if (
        bank.negative_features.shape[1:] != bank.features.shape[1:]
        or bank.negative_labels.shape != (m,)
        or len(bank.negative_ids) != m
        or len(bank.ref_added) != n
        or len(bank.negative_added) != m
    ):
        raise BankError(
            f"Memory bank negatives are inconsistent: features "
            f"{tuple(bank.negative_features.shape)}, labels {tuple(bank.negative_labels.shape)}, "
            f"{len(bank.negative_ids)} ids"
        )
    if m and (
        int(bank.negative_labels.min()) < 0 or int(bank.negative_labels.max()) >= len(bank.classes)
    ):
        raise BankError("Memory bank negative labels point outside its class list")
    if not bool(torch.isfinite(bank.negative_features).all()):
        raise BankError("Memory bank negative features contain NaN or infinite values")
    missing = [
        c
        for c, count in zip(bank.classes, torch.bincount(bank.labels, minlength=len(bank.classes)))
        if count == 0
    ]
    if missing:
        raise ReferenceInputError(f"Memory bank has no reference for class(es) {missing}")


def _read_header(blob: bytes) -> dict:
    """The bank's JSON header, from the safetensors metadata (format: u64 length + JSON)."""
    try:
        (length,) = struct.unpack("<Q", blob[:8])
        metadata = json.loads(blob[8 : 8 + length])["__metadata__"]
        header = json.loads(metadata[_HEADER_KEY])
    except Exception as error:
        raise BankError(
            f"Not an NTT memory bank, or a corrupt one ({type(error).__name__}: {error})"
        ) from error
    if header.get("format") != BANK_FORMAT:
        raise BankError(f"Not an NTT memory bank (format {header.get('format')!r})")
    if header.get("version") not in _READABLE_VERSIONS:
        raise BankError(
            f"Memory bank format version {header.get('version')} is not supported by this version "
            f"(expects {BANK_VERSION}); rebuild the bank"
        )
    return header
