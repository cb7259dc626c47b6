"""Cached proposals re-score to exactly what full inference gives, and stale entries are redone."""

import json
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from safetensors.torch import load, save

from ntt_core import NTTConfig, NTTPredictor, Reference
from ntt_core.cache import (
    FeatureFile,
    cached_features,
    cached_features_and_counts,
    entry_checksum,
    predict_cached,
    proposal_identity,
    proposals_from_bytes,
    proposals_to_bytes,
)
from ntt_core.matching import NegativesScreen, assign_classes, scores_with_negatives
from ntt_core.proposals import Proposals
from ntt_core.synthetic import make_scene

CLASSES = ["disc", "square", "triangle"]


class DictStore(dict):
    def set(self, key, value):
        self[key] = value


@pytest.fixture(scope="module")
def predictor():
    return NTTPredictor(NTTConfig.tiny(weights="random", device="cpu"))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    rng = np.random.default_rng(11)
    folder = tmp_path_factory.mktemp("cache-scenes")
    scenes = []
    for i in range(4):
        image, instances = make_scene(rng, 140, 180, CLASSES)
        path = folder / f"{i}.png"
        Image.fromarray(image).save(path)
        scenes.append((path, image, instances))
    return scenes


def _bank(predictor, scenes):
    return predictor.build_bank(
        [
            Reference(image, inst.mask, inst.label, f"{path.stem}:{j}", inst.box_xywh)
            for path, image, instances in scenes
            for j, inst in enumerate(instances)
        ]
    )


def test_rescoring_from_cache_equals_full_inference_with_the_new_bank(predictor, scenes):
    store = DictStore()
    target = scenes[3][0]
    first, hit = predict_cached(predictor, target, _bank(predictor, scenes[:1]), store, "s3")
    assert not hit and list(store) == ["s3"]
    assert first.rles == predictor.predict(target, _bank(predictor, scenes[:1])).rles

    new_bank = _bank(predictor, scenes[:3])  # a curator added references
    rescored, hit = predict_cached(predictor, target, new_bank, store, "s3")
    expected = predictor.predict(target, new_bank)
    assert hit
    assert rescored.rles == expected.rles and rescored.label_names == expected.label_names
    np.testing.assert_array_equal(rescored.scores, expected.scores)


def test_stale_or_damaged_entries_are_recomputed(predictor, scenes, tmp_path):
    store = DictStore()
    bank = _bank(predictor, scenes[:2])
    path = tmp_path / "target.png"
    Image.fromarray(scenes[3][1]).save(path)
    predict_cached(predictor, path, bank, store, "t")

    Image.fromarray(scenes[2][1]).save(path)  # the file changed under the same sample
    result, hit = predict_cached(predictor, path, bank, store, "t")
    assert not hit and result.rles == predictor.predict(path, bank).rles

    store["t"] = store["t"][:100]  # truncated entry
    _, hit = predict_cached(predictor, path, bank, store, "t")
    assert not hit
    _, hit = predict_cached(predictor, path, bank, store, "t")
    assert hit


def test_identity_covers_proposal_settings_only():
    config = NTTConfig.tiny(weights="random")
    assert proposal_identity(config) == proposal_identity(config.replace(max_detections=5))
    assert proposal_identity(config) != proposal_identity(config.replace(points_per_side=4))
    assert proposal_identity(config) != proposal_identity(
        config.replace(encoder_model="dinov2_vitb14")
    )


@pytest.mark.parametrize("count", [0, 3])
def test_an_entry_round_trips_and_a_tampered_one_is_refused(count):
    masks = np.zeros((count, 6, 8), dtype=np.uint8, order="F")
    for k in range(count):
        masks[k, : k + 1, : k + 2] = 1
    rles = [mask_utils.encode(np.asfortranarray(m)) for m in masks]
    proposals = Proposals(
        image_size=(6, 8),
        pred_iou=torch.rand(count),
        boxes=torch.rand(count, 4),
        features=torch.rand(count, 5),
        rles=rles,
    )
    blob = proposals_to_bytes(proposals, "sum", "id")
    back = proposals_from_bytes(blob, "sum", "id")
    assert back.image_size == (6, 8) and torch.equal(back.features, proposals.features)
    assert [r["counts"] for r in back.rles] == [r["counts"] for r in rles]
    assert [int(mask_utils.area(r)) for r in back.rles] == [(k + 1) * (k + 2) for k in range(count)]
    assert proposals_from_bytes(blob, "other sum", "id") is None
    # The fast read of what names the predictions (api.explain): the same, without Proposals.
    features, counts, size = cached_features_and_counts(blob, "sum", "id")
    assert np.array_equal(features, proposals.features.numpy()) and features.dtype == np.float32
    assert counts == [r["counts"] for r in rles] and size == [6, 8]
    assert cached_features_and_counts(blob, "other sum", "id") is None
    tampered = _with_tensors(blob, rle_lengths=torch.tensor([10**6] * max(count, 1)))
    assert proposals_from_bytes(tampered, "sum", "id") is None
    assert cached_features_and_counts(tampered, "sum", "id") is None
    assert cached_features_and_counts(blob[:50], "sum", "id") is None


def _with_tensors(blob: bytes, **replaced: torch.Tensor) -> bytes:
    """The entry with some tensors replaced, its header kept."""
    (length,) = struct.unpack("<Q", blob[:8])
    metadata = json.loads(blob[8 : 8 + length])["__metadata__"]
    return save({**load(blob), **replaced}, metadata=metadata)


def test_features_read_straight_from_an_entry_equal_the_full_read():
    proposals = Proposals(
        image_size=(4, 4),
        pred_iou=torch.rand(3),
        boxes=torch.rand(3, 4),
        features=torch.randn(3, 7),
        rles=[mask_utils.encode(np.asfortranarray(np.eye(4, dtype=np.uint8)))] * 3,
    )
    blob = proposals_to_bytes(proposals, "sum", "id")
    assert torch.equal(cached_features(blob, "sum", "id"), proposals.features)
    assert cached_features(blob, "sum", "other id") is None
    assert cached_features(blob[:50], "sum", "id") is None


def test_feature_rows_read_back_in_float16_and_a_torn_write_is_stepped_over(tmp_path):
    rows = FeatureFile(tmp_path / "features.f16", channels=4)
    first, second = torch.randn(3, 4), torch.randn(2, 4)
    assert rows.append(first) == 0 and rows.append(second) == 3
    both, present = rows.read_many([(0, 3), (3, 2)])  # back to back: one read
    assert present == [True, True] and torch.equal(both, torch.cat([first, second]).half())
    with open(rows.path, "ab") as handle:
        handle.write(b"torn")  # half a row from a write that stopped
    third = torch.randn(1, 4)
    assert rows.append(third) == 6
    found, present = FeatureFile(rows.path, 4).read_many([(6, 2), (6, 1), (1, 1)])
    assert present == [False, True, True]  # the file does not hold a second row at 6
    assert torch.equal(found, torch.cat([third, first[1:2]]).half())
    rows.path.unlink()
    assert rows.read_many([(0, 3)])[1] == [False]


def test_an_entrys_checksum_is_read_from_its_header():
    proposals = Proposals((4, 4), torch.rand(1), torch.rand(1, 4), torch.randn(1, 3), rles=[])
    proposals.rles = [mask_utils.encode(np.asfortranarray(np.eye(4, dtype=np.uint8)))]
    assert entry_checksum(proposals_to_bytes(proposals, "sum", "id")) == "sum"
    assert entry_checksum(b"not an entry") is None


def test_the_negatives_screen_on_float16_features_decides_as_full_precision_would():
    """Features stored in float16 move each product with a unit vector by at most
    ``FLOAT16_ROUNDING`` (about 5e-4), so the screen widens its margin by that bound, scaled by
    each test's slope. Over proposals crowding the screen's thresholds, in the large-score
    regime (similarities 0.3-0.9): whatever the float16 screen clears keeps its best class
    exactly and its best score within 1e-6 under a full-precision scoring with the new
    negatives, and it clears nothing the float32 screen does not."""
    generator = torch.Generator().manual_seed(0)
    channels, sigma = 1024, 0.8

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=generator), dim=-1)

    prototypes = unit(4, channels)
    negatives = F.normalize(prototypes[[1, 1, 2]] + 0.8 * unit(3, channels), dim=1)
    labels = torch.tensor([1, 1, 2])
    added = torch.tensor([False, True, False])
    # Each proposal mixes two prototypes and the new negative with random weights, plus noise.
    anchors = torch.cat([prototypes, negatives[added]])
    weights = torch.rand(20000, len(anchors), generator=generator) ** 3
    features = F.normalize(weights @ anchors + 0.05 * unit(20000, channels), dim=1)

    screen = NegativesScreen.of(prototypes, negatives, labels, added, sigma)
    one_per_image = [1] * len(features)
    full = screen.unchanged(features, one_per_image)
    half = screen.unchanged(features.half(), one_per_image)
    before = assign_classes(
        scores_with_negatives(features, prototypes, negatives[~added], labels[~added], sigma)
    )
    after = assign_classes(scores_with_negatives(features, prototypes, negatives, labels, sigma))
    kept_class = before[1] == after[1]
    kept_score = (before[0] - after[0]).abs() <= 1e-6
    cleared = torch.tensor(half)
    assert (kept_class & kept_score)[cleared].all()
    assert not (cleared & ~torch.tensor(full)).any()
    # The test exercises the thresholds: many proposals change, many are cleared, and the wider
    # margin costs only the proposals within it.
    assert 1000 < int(cleared.sum()) < 19000 and int((~(kept_class & kept_score)).sum()) > 1000
    assert sum(full) - sum(half) < 200
