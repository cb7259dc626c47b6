"""End to end through the real SAM2 and DINOv2 code, with random-initialised tiny models."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from ntt_core import MemoryBank, NTTConfig, NTTPredictor, Proposals, Reference
from ntt_core.cache import proposal_identity
from ntt_core.errors import BankMismatchError
from ntt_core.images import imagenet_normalize, resize_bicubic, resize_square_pil, to_float_chw
from ntt_core.postprocess import mask_boxes
from ntt_core.synthetic import make_scene

CLASSES = ["disc", "square", "triangle"]


@pytest.fixture(scope="module")
def predictor() -> NTTPredictor:
    return NTTPredictor(NTTConfig.tiny(weights="random", device="cpu"))


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(7)
    return [make_scene(rng, 150 + 10 * i, 200 - 10 * i, CLASSES) for i in range(4)]


@pytest.fixture(scope="module")
def bank(predictor, scenes) -> MemoryBank:
    references = [
        Reference(image, inst.mask, inst.label, f"scene{i}:{j}", inst.box_xywh)
        for i, (image, instances) in enumerate(scenes[:3])
        for j, inst in enumerate(instances)
    ]
    return predictor.build_bank(references)


def test_prediction_is_well_formed(predictor, bank, scenes):
    image, _ = scenes[3]
    result = predictor.predict(image, bank)
    height, width = image.shape[:2]
    assert result.image_size == (height, width)
    assert 0 < len(result) <= predictor.config.max_detections
    masks = result.masks()
    assert masks.shape == (len(result), height, width) and masks.any(axis=(1, 2)).all()
    # boxes are the tight boxes of the masks
    for box, mask in zip(result.boxes, masks):
        ys, xs = np.nonzero(mask)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert np.all(np.diff(result.scores) <= 0) and np.all(
        (result.scores > 0) & (result.scores <= 1)
    )
    assert set(result.label_names) <= set(bank.classes)


def test_prediction_is_deterministic(predictor, bank, scenes):
    first = predictor.predict(scenes[3][0], bank)
    second = predictor.predict(scenes[3][0], bank)
    assert first.rles == second.rles
    np.testing.assert_array_equal(first.scores, second.scores)


def test_prompt_chunk_size_does_not_change_answers(predictor, bank, scenes):
    small_chunks = NTTPredictor(predictor.config.replace(points_per_batch=7))
    expected = predictor.predict(scenes[3][0], bank)
    result = small_chunks.predict(scenes[3][0], bank)
    assert result.rles == expected.rles
    np.testing.assert_allclose(result.scores, expected.scores, atol=1e-5)


def test_compacted_proposals_rescore_to_the_same_answer(predictor, bank, scenes):
    proposals = predictor.propose(scenes[3][0])
    direct = predictor.score(proposals, bank)
    cached = predictor.score(predictor.compact(proposals), bank)
    assert cached.rles == direct.rles
    np.testing.assert_array_equal(cached.scores, direct.scores)


def test_proposal_features_equal_the_straightforward_computation(predictor, scenes):
    """Upsample the target's token map to mask size and average under each mask, L2-normalise."""
    image = scenes[3][0]
    proposals = predictor.propose(image)
    config = predictor.config
    square = resize_square_pil(image, config.sam_image_size)
    with torch.inference_mode():
        pixels = resize_bicubic(to_float_chw(square)[None], config.encoder_image_size)
        tokens = predictor.encoder(imagenet_normalize(pixels))[0]
    mask_size = proposals.logits.shape[1:]
    upsampled = F.interpolate(
        tokens.permute(2, 0, 1)[None],
        size=mask_size,
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )[0]
    for i in range(len(proposals)):
        mask = proposals.logits[i] > 0
        expected = F.normalize(upsampled[:, mask].mean(dim=1), dim=0)
        torch.testing.assert_close(proposals.features[i], expected, atol=1e-4, rtol=1e-4)


def test_reference_feature_with_a_full_mask_is_the_mean_token_of_the_crop(predictor):
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(56, 56, 3), dtype=np.uint8)
    mask = np.ones((56, 56), bool)
    bank = predictor.build_bank([Reference(image, mask, "thing", "r0")])
    size = predictor.config.encoder_image_size
    with torch.inference_mode():
        tokens = predictor.encoder(
            imagenet_normalize(resize_bicubic(to_float_chw(image)[None], size))
        )
    torch.testing.assert_close(bank.features[0], tokens[0].mean(dim=(0, 1)), atol=1e-5, rtol=1e-5)


def test_bank_from_another_encoder_is_refused(predictor, bank, scenes):
    foreign = MemoryBank.from_features(
        bank.features, [bank.classes[i] for i in bank.labels], bank.ref_ids, "dinov2_vitl14", 518
    )
    with pytest.raises(BankMismatchError, match="dinov2_vitl14"):
        predictor.predict(scenes[3][0], foreign)


def test_box_prompt_gives_a_mask_of_the_image_size(predictor, scenes):
    image, instances = scenes[0]
    x, y, w, h = instances[0].box_xywh
    (mask,) = predictor.masks_from_boxes(image, [[x, y, x + w, y + h]])
    assert mask.shape == image.shape[:2] and mask.dtype == bool


def test_coco_results_round_trip(predictor, bank, scenes):
    image = scenes[3][0]
    result = predictor.predict(image, bank)
    ids = {name: 10 + i for i, name in enumerate(bank.classes)}
    entries = result.to_coco(image_id=5, category_ids=ids)
    assert len(entries) == len(result)
    for entry, box, rle in zip(entries, result.boxes, result.rles):
        assert entry["segmentation"] == rle
        assert entry["image_id"] == 5 and entry["category_id"] in ids.values()
        # The paper's box: width = last foreground column - first, one less than the box that
        # contains the mask (FiftyOne's, and pycocotools' toBbox).
        x, y, w, h = entry["bbox"]
        assert [x, y, x + w + 1, y + h + 1] == box.tolist()
        assert (mask_utils.toBbox(entry["segmentation"]) - [0, 0, 1, 1]).tolist() == entry["bbox"]


def grid_of_square_proposals(count: int, channels: int) -> Proposals:
    """``count`` 2x2-pixel proposals on a 96x96 logit grid, none overlapping another's box."""
    logits = torch.full((count, 96, 96), -10.0)
    for k in range(count):
        row, col = divmod(k, 32)
        logits[k, 3 * row : 3 * row + 2, 3 * col : 3 * col + 2] = 10.0
    features = F.normalize(torch.randn(count, channels, generator=torch.Generator().manual_seed(0)))
    return Proposals(
        image_size=(192, 192),
        pred_iou=torch.linspace(0.9, 0.5, count),
        boxes=mask_boxes(logits > 0),
        features=features,
        logits=logits,
    )


@pytest.mark.parametrize("count", [300, 800])
def test_score_takes_hundreds_of_kept_proposals(predictor, bank, count):
    """pycocotools 2.0.11's area() overflows for 256 or more RLEs; the paper keeps up to 800."""
    proposals = grid_of_square_proposals(count, bank.prototypes.shape[1])
    for given in (proposals, predictor.compact(proposals)):
        result = predictor.score(given, bank)
        assert len(result) == predictor.config.max_detections
        assert (result.masks().sum(axis=(1, 2)) == 16).all()  # 2x2 low-res px -> 4x4 full-res


def test_no_mem_embed_is_opt_in_and_part_of_the_cache_identity(predictor, scenes):
    with_embed = predictor.config.replace(add_no_mem_embed=True)
    assert proposal_identity(with_embed) != proposal_identity(predictor.config)
    default = predictor.propose(scenes[3][0])
    added = NTTPredictor(with_embed).propose(scenes[3][0])
    assert len(added) != len(default) or not torch.equal(added.logits, default.logits)
