"""A re-score that reuses a previous scoring's survivors and decay factors (``DecayRecord``)
gives exactly what a full scoring gives, and reads no mask where the record holds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from ntt_core import MemoryBank, NTTConfig, NTTPredictor
from ntt_core.decay_record import DecayRecord
from ntt_core.masks import RLEMasks
from ntt_core.models import encoder_identity
from ntt_core.proposals import Proposals

CONFIG = NTTConfig(weights="random", device="cpu")
HEIGHT, WIDTH, CHANNELS = 96, 128, 64


def _bank(prototypes: torch.Tensor, negatives=None, negative_labels=None) -> MemoryBank:
    """One reference per class, equal to the class's prototype."""
    classes = len(prototypes)
    return MemoryBank(
        classes=[f"c{k}" for k in range(classes)],
        features=prototypes,
        labels=torch.arange(classes),
        ref_ids=[f"s:r{k}" for k in range(classes)],
        encoder=encoder_identity(CONFIG),
        encoder_image_size=CONFIG.encoder_image_size,
        negative_features=negatives,
        negative_labels=negative_labels,
        negative_ids=[f"s:n{i}" for i in range(0 if negatives is None else len(negatives))],
    )


def _proposals(masks: list[np.ndarray], features: torch.Tensor, pred_iou) -> Proposals:
    rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]
    boxes = torch.from_numpy(mask_utils.toBbox(rles).astype(np.float32))
    boxes[:, 2:] += boxes[:, :2]
    return Proposals(
        image_size=(HEIGHT, WIDTH),
        pred_iou=torch.tensor(pred_iou, dtype=torch.float32),
        boxes=boxes,
        features=features,
        rles=rles,
    )


def _rectangle(top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


@pytest.fixture
def mask_reads(monkeypatch) -> list[int]:
    """How many times a scoring computed the masks' overlaps."""
    calls: list[int] = []
    original = RLEMasks.overlap_over_self

    def counted(self, labels):
        calls.append(len(self))
        return original(self, labels)

    monkeypatch.setattr(RLEMasks, "overlap_over_self", counted)
    return calls


def test_a_moved_prototype_rescales_the_recorded_decay_by_hand(mask_reads):
    """Two proposals of class 0: B (pred IoU lower) lies half inside A, and cos(f_A, f_B) = 0.6,
    so B's factor is sqrt(1 - 0.5 * 0.6). A new prototype changes both scores; the re-score
    multiplies the new ones by the recorded factors, without computing an overlap."""
    f_a = torch.tensor([1.0, 0.0, 0.0])
    f_b = torch.tensor([0.6, 0.8, 0.0])
    masks = [_rectangle(10, 10, 50, 50), _rectangle(30, 10, 70, 50)]  # B: half of it in A
    proposals = _proposals(masks, torch.stack([f_a, f_b]), [0.95, 0.9])
    predictor = NTTPredictor(CONFIG, load=False)
    before = predictor.score(proposals, _bank(torch.tensor([[1.0, 0.0, 0.0]])))
    record = before.decay_record
    assert record.kept.tolist() == [0, 1]
    assert record.decay.tolist() == pytest.approx([1.0, math.sqrt(1 - 0.5 * 0.6)])
    assert len(mask_reads) == 1

    moved = F.normalize(torch.tensor([[0.8, 0.6, 0.0]]), dim=1)  # f_A: 0.8, f_B: 0.96
    again = predictor.score(proposals, _bank(moved), record)
    assert len(mask_reads) == 1  # the record held: no overlap computed
    full = predictor.score(proposals, _bank(moved))
    assert again.scores.tolist() == pytest.approx([0.96 * math.sqrt(0.7), 0.8])  # B now first
    _assert_same(again, full)


def _scene(seed: int) -> tuple[Proposals, torch.Tensor]:
    """Objects seen by several overlapping proposals (whole, halves, shifted), each object of a
    class, features near its class direction (cosines 0.5-0.95, the large-score regime), plus
    background proposals, one with an empty mask; and the class directions (K, C)."""
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    directions = F.normalize(torch.randn(6, CHANNELS, generator=generator), dim=1)
    masks, features, pred_iou = [], [], []
    for _ in range(5):
        label = int(rng.integers(0, 6))
        top, left = int(rng.integers(0, HEIGHT - 40)), int(rng.integers(0, WIDTH - 40))
        h, w = int(rng.integers(15, 40)), int(rng.integers(15, 40))
        parts = [
            (top, left, top + h, left + w),
            (top, left, top + h // 2, left + w),
            (top, left, top + h, left + w // 2),
            (top + 2, left + 3, top + h + 2, left + w + 3),
        ]
        for part in parts:
            masks.append(_rectangle(*part))
            noise = torch.randn(CHANNELS, generator=generator)
            features.append(F.normalize(directions[label] + 0.4 * F.normalize(noise, dim=0), dim=0))
            pred_iou.append(float(rng.uniform(0.7, 1.0)))
    for _ in range(12):  # background: weakly like a class, or unlike every class
        top, left = int(rng.integers(0, HEIGHT - 20)), int(rng.integers(0, WIDTH - 20))
        masks.append(_rectangle(top, left, top + 20, left + 20))
        lean = directions[int(rng.integers(0, 6))] * float(rng.choice([0.3, -2.0]))
        noise = F.normalize(torch.randn(CHANNELS, generator=generator), dim=0)
        features.append(F.normalize(lean + noise, dim=0))
        pred_iou.append(float(rng.uniform(0.7, 1.0)))
    masks.append(np.zeros((HEIGHT, WIDTH), dtype=bool))
    features.append(directions[0])
    pred_iou.append(0.99)
    return _proposals(masks, torch.stack(features), pred_iou), directions


def _changes(directions: torch.Tensor, generator: torch.Generator) -> dict[str, MemoryBank]:
    """Banks the correction loop makes from a 6-class bank with 3 references per class."""
    labels = torch.arange(6).repeat_interleave(3)
    noise = F.normalize(torch.randn(len(labels), CHANNELS, generator=generator), dim=1)
    references = F.normalize(directions[labels] + 0.5 * noise, dim=1)
    extra = F.normalize(directions[2] + 0.5 * F.normalize(torch.randn(CHANNELS), dim=0), dim=0)

    def bank(features, ref_labels, negatives=None, negative_labels=None, classes=6):
        return MemoryBank(
            classes=[f"c{k}" for k in range(classes)],
            features=features,
            labels=ref_labels,
            ref_ids=[f"s:r{i}" for i in range(len(ref_labels))],
            encoder=encoder_identity(CONFIG),
            encoder_image_size=CONFIG.encoder_image_size,
            negative_features=negatives,
            negative_labels=negative_labels,
            negative_ids=[] if negatives is None else [f"s:n{i}" for i in range(len(negatives))],
        )

    keep = torch.arange(len(labels)) != 3
    seventh = F.normalize(torch.randn(1, CHANNELS, generator=generator), dim=1)
    return {
        "before": bank(references, labels),
        "new reference": bank(
            torch.cat([references, extra[None]]), torch.cat([labels, labels[6:7]])
        ),
        "new negative": bank(references, labels, extra[None], torch.tensor([2])),
        "new class": bank(
            torch.cat([references, seventh]), torch.cat([labels, torch.tensor([6])]), classes=7
        ),
        "a reference removed": bank(references[keep], labels[keep]),
    }


@pytest.mark.parametrize("seed", range(6))
def test_a_rescore_with_the_record_equals_a_full_scoring(seed, mask_reads):
    """For every bank change of the loop, scoring with the previous scoring's record gives the
    same instances, bit for bit, as scoring from the masks. Where every proposal keeps its
    class (most changes here), no overlap is computed."""
    proposals, directions = _scene(seed)
    banks = _changes(directions, torch.Generator().manual_seed(100 + seed))
    predictor = NTTPredictor(CONFIG, load=False)
    record = predictor.score(proposals, banks.pop("before")).decay_record
    assert 0 < len(record.kept) < len(proposals)  # NMS, the zero scores or the empty mask drop some
    assert (record.decay < 1).any()  # overlapping parts decay
    held = 0
    for name, bank in banks.items():
        reads = len(mask_reads)
        again = predictor.score(proposals, bank, record)
        held += len(mask_reads) == reads
        _assert_same(again, predictor.score(proposals, bank), name)
    assert held >= 2


def test_a_record_that_no_longer_holds_is_not_used(mask_reads):
    """A bank whose prototype takes a proposal into another class changes NMS's groups: the
    scoring reads the masks again and records anew."""
    proposals, directions = _scene(0)
    predictor = NTTPredictor(CONFIG, load=False)
    first = predictor.score(proposals, _bank(directions))
    swapped = _bank(directions[[1, 0, 2, 3, 4, 5]])
    reads = len(mask_reads)
    again = predictor.score(proposals, swapped, first.decay_record)
    assert len(mask_reads) == reads + 1
    _assert_same(again, predictor.score(proposals, swapped))
    assert not np.array_equal(again.decay_record.labels, first.decay_record.labels)
    other = NTTConfig(weights="random", device="cpu", nms_iou_threshold=0.3)
    assert not first.decay_record.holds(
        torch.from_numpy(first.decay_record.labels),
        torch.ones(len(proposals)),
        (other.nms_iou_threshold, other.max_before_decay),
    )


def test_a_record_survives_its_bytes_and_a_damaged_one_is_refused():
    proposals, directions = _scene(1)
    record = NTTPredictor(CONFIG, load=False).score(proposals, _bank(directions)).decay_record
    back = DecayRecord.from_bytes(record.to_bytes())
    assert back.settings == record.settings
    for name in ("labels", "survivors", "positive", "kept", "decay"):
        assert np.array_equal(getattr(back, name), getattr(record, name))
    blob = record.to_bytes()
    assert DecayRecord.from_bytes(blob[: len(blob) // 2]) is None
    assert DecayRecord.from_bytes(b"not a record") is None
    wrong = DecayRecord(
        record.settings,
        record.labels,
        record.survivors + 1000,
        record.positive,
        record.kept,
        record.decay,
    )
    assert DecayRecord.from_bytes(wrong.to_bytes()) is None  # indices past the proposals


def _assert_same(left, right, case: str = "") -> None:
    assert np.array_equal(left.scores, right.scores), case
    assert np.array_equal(left.labels, right.labels), case
    assert np.array_equal(left.boxes, right.boxes), case
    assert left.rles == right.rles, case
    assert left.explanation.rows() == right.explanation.rows(), case
