"""Memory bank: aggregation, file round-trip, and the refusals that keep a bad bank out."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save as save_tensors

from ntt_core.bank import MemoryBank, Negatives
from ntt_core.errors import BankError, BankMismatchError, ReferenceInputError


def _bank(**changes) -> MemoryBank:
    values = dict(
        features=torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 5.0]]),
        labels=["cat", "cat", "dog"],
        ref_ids=["s1:a", "s2:b", "s3:c"],
        encoder="dinov2_vits14",
        encoder_image_size=224,
    )
    values.update(changes)
    return MemoryBank.from_features(**values)


def test_bank_groups_references_by_class():
    bank = _bank()
    assert bank.classes == ["cat", "dog"]
    assert bank.labels.tolist() == [0, 0, 1]
    assert bank.references_per_class == {"cat": 2, "dog": 1}
    assert torch.allclose(bank.prototypes[1], torch.tensor([0.0, 1.0]))


def test_reference_quality_compares_each_reference_with_the_others():
    quality = _bank().reference_quality()
    # cat refs [3,4] vs [1,0]: cos = 3/5 -> (0.6 + 1) / 2 = 0.8 both ways; dog has one ref.
    assert quality[:2].tolist() == pytest.approx([0.8, 0.8])
    assert torch.isnan(quality[2])


def test_requested_class_without_reference_is_reported():
    with pytest.raises(ReferenceInputError, match="horse"):
        _bank(classes=["cat", "horse"])


def test_requested_classes_select_references():
    bank = _bank(classes=["dog"])
    assert bank.classes == ["dog"] and bank.ref_ids == ["s3:c"]


def test_bytes_round_trip_keeps_everything(tmp_path):
    bank = _bank()
    again = MemoryBank.load(bank.save(tmp_path / "bank.safetensors"))
    assert again.classes == bank.classes and again.ref_ids == bank.ref_ids
    assert again.encoder == bank.encoder and again.encoder_image_size == 224
    assert torch.equal(again.features, bank.features)
    assert torch.equal(again.prototypes, bank.prototypes)
    assert not list(tmp_path.glob(".*tmp"))


def test_a_bank_costs_kilobytes_per_reference_at_vit_l_width():
    features = torch.randn(10, 1024)
    bank = _bank(features=features, labels=["a"] * 10, ref_ids=[f"r{i}" for i in range(10)])
    assert len(bank.to_bytes()) / 10 < 8 * 1024


@pytest.mark.parametrize(
    "blob",
    [b"", b"garbage bytes that are not a bank", pickle.dumps({"features": [1, 2]})],
)
def test_corrupt_bytes_are_refused(blob):
    with pytest.raises(BankError):
        MemoryBank.from_bytes(blob)


def test_truncated_bank_is_refused():
    blob = _bank().to_bytes()
    with pytest.raises(BankError):
        MemoryBank.from_bytes(blob[: len(blob) - 7])


def test_tampered_prototypes_are_refused():
    blob = bytearray(_bank().to_bytes())
    blob[-1] ^= 0x40  # the last tensor's bytes (prototypes) no longer match the features
    with pytest.raises(BankError):
        MemoryBank.from_bytes(bytes(blob))


def test_future_version_is_refused():
    blob = _bank().to_bytes().replace(b'\\"version\\": 2', b'\\"version\\": 9')
    with pytest.raises(BankError, match="version 9"):
        MemoryBank.from_bytes(blob)


def test_bank_from_another_encoder_is_refused():
    bank = _bank()
    bank.check_compatible("dinov2_vits14", 224)
    with pytest.raises(BankMismatchError, match="dinov2_vitl14"):
        bank.check_compatible("dinov2_vitl14", 224)
    with pytest.raises(BankMismatchError, match="518"):
        bank.check_compatible("dinov2_vits14", 518)


def _negatives() -> Negatives:
    return Negatives(
        features=torch.tensor([[0.0, 2.0], [6.0, 8.0]]),
        labels=["cat", "horse"],  # no horse in the bank: nothing to lower, left out
        ids=["s4:n", "s5:m"],
        added=["2026-11-29T10:00:00+00:00", None],
    )


def test_negatives_round_trip_with_their_ids_and_timestamps():
    bank = _bank(negatives=_negatives(), ref_added=["t1", "t2", "t3"])
    again = MemoryBank.from_bytes(bank.to_bytes())
    assert again.negative_ids == ["s4:n"] and again.negative_labels.tolist() == [0]
    assert again.negative_added == ["2026-11-29T10:00:00+00:00"]
    assert again.ref_added == ["t1", "t2", "t3"]
    assert torch.equal(again.negative_features, torch.tensor([[0.0, 2.0]]))
    assert torch.equal(again.negatives, torch.tensor([[0.0, 1.0]]))  # normalised for scoring
    assert again.negatives_per_class == {"cat": 1, "dog": 0}
    # Negatives never move the prototypes.
    assert torch.equal(again.prototypes, _bank().prototypes)


def test_a_version_1_bank_still_loads():
    """Banks written before negatives existed (datasets in the field hold them)."""
    features = torch.tensor([[3.0, 4.0], [0.0, 5.0]])
    labels = torch.tensor([0, 1])
    prototypes = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    header = {
        "format": "ntt-memory-bank",
        "version": 1,
        "encoder": "dinov2_vits14",
        "encoder_image_size": 224,
        "classes": ["cat", "dog"],
        "ref_ids": ["s1:a", "s3:c"],
    }
    blob = save_tensors(
        {"features": features, "labels": labels, "prototypes": prototypes},
        metadata={"ntt_bank": json.dumps(header)},
    )
    bank = MemoryBank.from_bytes(blob)
    assert bank.ref_ids == ["s1:a", "s3:c"] and bank.ref_added == [None, None]
    assert bank.negative_features.shape == (0, 2) and bank.negative_ids == []
    assert torch.allclose(bank.prototypes, prototypes)
    # Saved again, it is a version-2 bank with the same content.
    assert b'\\"version\\": 2' in bank.to_bytes()
    assert torch.equal(MemoryBank.from_bytes(bank.to_bytes()).features, features)
