"""The method's arithmetic on tiny tensors whose answers can be worked out by hand."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from ntt_core.bank import class_prototypes
from ntt_core.masks import masks_from_logits
from ntt_core.matching import (
    NegativesScreen,
    assign_classes,
    overlap_decay,
    pooled_features,
    scores_with_negatives,
    semantic_scores,
    upsampling_matrix,
)
from ntt_core.postprocess import nms_order, rle_boxes_xyxy
from ntt_core.proposals import point_grid
from ntt_core.references import context_crop, mask_box_xywh, masked_mean_features


def _rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def test_context_crop_by_hand():
    # box (10, 20, 30, 40): corners 10,20,40,60; centre (25, 40); side 40 * 1.2 = 48.
    assert context_crop((10, 20, 30, 40), (100, 100), 0.2) == (1, 16, 49, 64)
    # At a border the crop is clipped, so it is no longer square.
    assert context_crop((0, 0, 10, 10), (100, 100), 0.2) == (0, 0, 11, 11)


def test_context_crop_recovers_pixel_values_before_truncating():
    # 123 px through FiftyOne's relative coordinates: (123 / 480) * 480 = 122.99999999999999.
    height = (123 / 480) * 480
    assert height < 123
    # Corners 10, 0, 40, 123; centre (25, 61.5); half side 123 * 1.2 / 2 = 73.8.
    assert context_crop((10, 0, 30, height), (200, 200), 0.2) == (0, 0, 98, 135)
    assert context_crop((10, 0, 30, 123), (200, 200), 0.2) == (0, 0, 98, 135)
    # A genuinely fractional COCO box still truncates: int(10.34 + 30.5) = 40.
    assert context_crop((10.34, 0, 30.5, 123), (200, 200), 0.2) == (0, 0, 98, 135)


def test_mask_box_is_pixel_inclusive():
    mask = np.zeros((10, 10), bool)
    mask[2:5, 3:9] = True
    assert mask_box_xywh(mask) == (3.0, 2.0, 6.0, 3.0)


def test_masked_mean_uses_soft_weights_on_the_token_grid():
    tokens = torch.tensor([[[1.0, 0.0], [3.0, 0.0]], [[0.0, 2.0], [0.0, 4.0]]])[None]  # (1,2,2,2)
    soft = torch.tensor([[1.0, 0.5], [0.0, 0.0]])[None]  # already at the token grid
    # (1 * [1, 0] + 0.5 * [3, 0]) / 1.5 = [2.5 / 1.5, 0]
    assert torch.allclose(masked_mean_features(tokens, soft), torch.tensor([[2.5 / 1.5, 0.0]]))


def test_prototype_is_normalised_class_mean():
    features = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 5.0]])
    labels = torch.tensor([0, 0, 1])
    protos = class_prototypes(features, labels, 2)
    assert torch.allclose(protos, torch.tensor([[math.sqrt(0.5), math.sqrt(0.5)], [0.0, 1.0]]))


def test_semantic_scores_clip_negative_similarity():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    protos = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scores = semantic_scores(features, protos)
    assert torch.allclose(scores, torch.tensor([[1.0, 0.6], [0.0, 0.8], [0.0, 0.0]]))
    best, labels = assign_classes(scores)
    assert best.tolist() == pytest.approx([1.0, 0.8, 0.0])
    assert labels.tolist()[:2] == [0, 1]


def test_negatives_lower_a_class_score_by_hand():
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    negatives = torch.tensor([[0.6, 0.8], [0.8, 0.6]])  # both of class 0; class 1 has none
    features = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.75, math.sqrt(1 - 0.75**2)]])
    scores = scores_with_negatives(features, protos, negatives, torch.tensor([0, 0]), 0.8)
    # [1, 0]: pos_0 = 1 beats its closest negative (0.8): no decay.
    # [0.6, 0.8]: pos_0 = 0.6, neg_0 = max(1.0, 0.96) = 1.0 -> 0.6 * exp(-0.4 / 0.8).
    # [0.75, 0.661]: pos_0 = 0.75, neg_0 = max(0.979, 1.0) = 1.0 (f · [0.8, 0.6])
    #                -> 0.75 * exp(-(1.0 - 0.75) / 0.8) = 0.548 < pos_1 = 0.661: class 1 wins.
    third = 0.75 * 0.8 + math.sqrt(1 - 0.75**2) * 0.6
    expected = [
        [1.0, 0.0],
        [0.6 * math.exp(-0.4 / 0.8), 0.8],
        [0.75 * math.exp(-(third - 0.75) / 0.8), math.sqrt(1 - 0.75**2)],
    ]
    assert scores.tolist() == [pytest.approx(row, abs=1e-6) for row in expected]
    assert assign_classes(scores)[1].tolist() == [0, 1, 1]
    assert assign_classes(semantic_scores(features, protos))[1].tolist() == [0, 1, 0]


def test_without_negatives_scores_are_bit_identical():
    features = F.normalize(torch.randn(50, 16), dim=1)
    protos = F.normalize(torch.randn(3, 16), dim=1)
    plain = semantic_scores(features, protos)
    none = torch.zeros(0, 16)
    assert torch.equal(
        scores_with_negatives(features, protos, none, torch.zeros(0, dtype=torch.int64), 0.8),
        plain,
    )
    # A negative of class 2 leaves classes 0 and 1 exactly as they were.
    negative = F.normalize(torch.randn(1, 16), dim=1)
    lowered = scores_with_negatives(features, protos, negative, torch.tensor([2]), 0.8)
    assert torch.equal(lowered[:, :2], plain[:, :2])


def test_upsampling_matrix_matches_interpolate():
    tokens = torch.randn(5, 7)
    direct = F.interpolate(
        tokens[None, None], size=(20, 31), mode="bilinear", align_corners=False, antialias=True
    )[0, 0]
    separable = upsampling_matrix(5, 20) @ tokens @ upsampling_matrix(7, 31).T
    assert torch.allclose(direct, separable, atol=1e-5)


def test_pooled_features_equal_mean_of_upsampled_tokens():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(4, 4, 3, generator=generator)
    masks = torch.rand(3, 16, 16, generator=generator) > 0.6
    masks[2] = False  # an empty proposal has no feature
    features, valid = pooled_features(tokens, masks)
    upsampled = F.interpolate(
        tokens.permute(2, 0, 1)[None],
        size=(16, 16),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )[0].permute(1, 2, 0)
    for i in range(2):
        expected = F.normalize(upsampled[masks[i]].mean(0), dim=0)
        assert torch.allclose(features[i], expected, atol=1e-5)
    assert valid.tolist() == [True, True, False]


def overlap_over_self(rles: list[dict]) -> torch.Tensor:
    masks = torch.from_numpy(mask_utils.decode(rles)).permute(2, 0, 1).flatten(1).double()
    return (masks @ masks.T) / masks.sum(dim=1)[:, None]


def test_overlap_decay_by_hand():
    big = np.zeros((8, 8), bool)
    big[0:4, 0:4] = True  # 16 px
    part = np.zeros((8, 8), bool)
    part[0:2, 0:4] = True  # 8 px, all inside `big`
    other = np.zeros((8, 8), bool)
    other[6:8, 6:8] = True
    rles = [_rle(big), _rle(part), _rle(other), _rle(part)]
    features = F.normalize(
        torch.tensor([[1.0, 0.0], [0.5, math.sqrt(0.75)], [1.0, 0.0], [1.0, 0.0]]), dim=1
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([0, 0, 0, 1])
    decayed = overlap_decay(scores, labels, features, overlap_over_self(rles))
    # `part` lies wholly in `big` (ios 1) with cos 0.5 -> 0.8 * sqrt(1 - 0.5);
    # `other` overlaps nothing; the class-1 proposal has nothing before it in its class.
    assert decayed.tolist() == pytest.approx([0.9, 0.8 * math.sqrt(0.5), 0.7, 0.6])


def test_overlap_decay_is_order_dependent():
    big = np.zeros((8, 8), bool)
    big[0:4, 0:4] = True
    part = np.zeros((8, 8), bool)
    part[0:2, 0:4] = True
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # big after part: |big ∩ part| / |big| = 8 / 16, cos 1 -> 0.9 * sqrt(0.5)
    decayed = overlap_decay(
        torch.tensor([0.8, 0.9]),
        torch.tensor([0, 0]),
        features,
        overlap_over_self([_rle(part), _rle(big)]),
    )
    assert decayed.tolist() == pytest.approx([0.8, 0.9 * math.sqrt(0.5)])


def test_nms_ranks_by_predicted_iou_not_semantic_score():
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 30, 30], [0, 0, 10, 10]])
    pred_iou = torch.tensor([0.5, 0.9, 0.7, 0.6])
    labels = torch.tensor([0, 0, 0, 1])
    order = nms_order(boxes, pred_iou, labels, iou_threshold=0.5, limit=800)
    # Box 1 (IoU 0.9) suppresses box 0; box 3 is another class so it survives.
    assert order.tolist() == [1, 2, 3]
    assert nms_order(boxes, pred_iou, labels, 0.5, limit=2).tolist() == [1, 2]


def test_point_grid_is_pixel_centred_linspace_x_major():
    grid = point_grid(2, 4)
    # The paper's order: point k has x = axis[k // 2], y = axis[k % 2].
    assert grid.tolist() == [[0.5, 0.5], [0.5, 3.5], [3.5, 0.5], [3.5, 3.5]]
    assert point_grid(32, 1024).shape == (1024, 2)


def test_logits_become_full_resolution_masks_and_tight_boxes():
    logits = torch.full((1, 4, 4), -5.0)
    logits[0, 1:3, 1:3] = 5.0
    masks = masks_from_logits(logits, torch.tensor([[1, 1, 2, 2]]), (8, 8))
    (rle,) = masks.rles()
    mask = mask_utils.decode(rle).astype(bool)
    assert mask[2:6, 2:6].all() and mask.sum() == 16
    assert masks.boxes_xyxy().tolist() == [[2.0, 2.0, 6.0, 6.0]]
    assert rle_boxes_xyxy([rle]).tolist() == [[2.0, 2.0, 6.0, 6.0]]


def test_a_new_negative_changes_scores_only_above_the_prototype_and_older_negatives():
    """f·p = 0.6 and f·n_old = 0.8: a new negative of the class matters only above 0.8."""
    f = torch.tensor([[1.0, 0.0]])
    prototypes = torch.tensor([[0.6, 0.8]])
    old = torch.tensor([[0.8, 0.6]])

    def screen_and_scores(new_similarity: float):
        new = torch.tensor([[new_similarity, (1 - new_similarity**2) ** 0.5]])
        negatives, labels = torch.cat([old, new]), torch.tensor([0, 0])
        added = torch.tensor([False, True])
        screen = NegativesScreen.of(prototypes, negatives, labels, added, 0.8)
        (unchanged,) = screen.unchanged(f, [1])
        before = scores_with_negatives(f, prototypes, old, labels[:1], 0.8)
        after = scores_with_negatives(f, prototypes, negatives, labels, 0.8)
        return unchanged, before, after

    unchanged, before, after = screen_and_scores(0.7)
    assert unchanged and torch.equal(before, after)
    assert before.item() == pytest.approx(0.6 * math.exp(-0.2 / 0.8), abs=1e-6)
    unchanged, before, after = screen_and_scores(0.9)
    assert not unchanged
    assert after.item() == pytest.approx(0.6 * math.exp(-0.3 / 0.8), abs=1e-6)
    # Within the margin of the threshold counts as changed.
    assert not screen_and_scores(0.8 - 1e-5)[0]


def test_the_negatives_screen_judges_each_image_of_a_batch_on_its_own_proposals():
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    negatives, labels = torch.tensor([[0.6, 0.8]]), torch.tensor([1])
    screen = NegativesScreen.of(prototypes, negatives, labels, torch.tensor([True]), 0.8)
    # Class 1's threshold is max(f·p_1, 0) = f_y; the new negative's similarity 0.6 f_x + 0.8 f_y
    # exceeds it only for the second image's second proposal (1.0 > 0.8), whose best class is 1.
    far = torch.tensor([[0.0, 1.0]])  # 0.8 < 1.0
    near = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    empty = torch.zeros(0, 2)
    images = [far, near, empty, far]
    verdicts = screen.unchanged(torch.cat(images), [len(image) for image in images])
    assert verdicts == [True, False, True, True]
    assert screen.unchanged(torch.zeros(0, 2), []) == []


def test_a_new_negative_of_a_class_below_a_proposals_best_changes_nothing():
    """f = (0.8, 0.6): class 1 scores 0.6 and the new negative (similarity 0.96) lowers it, but
    class 0 keeps the best score, 0.8, and that is all the result sees."""
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    negatives, labels = torch.tensor([[0.6, 0.8]]), torch.tensor([1])
    screen = NegativesScreen.of(prototypes, negatives, labels, torch.tensor([True]), 0.8)
    f = torch.tensor([[0.8, 0.6]])
    before = scores_with_negatives(f, prototypes, negatives[:0], labels[:0], 0.8)
    after = scores_with_negatives(f, prototypes, negatives, labels, 0.8)
    assert after[0, 1] < before[0, 1]
    assert [t.tolist() for t in assign_classes(before)] == [
        t.tolist() for t in assign_classes(after)
    ]
    assert screen.unchanged(f, [1]) == [True]
    # Class 1 within the margin of the best: counted as changed.
    tie = F.normalize(torch.tensor([[1.0, 1.0 - 1e-5]]), dim=1)
    assert screen.unchanged(tie, [1]) == [False]


def test_a_new_negative_cannot_lower_a_class_score_of_zero():
    """f·p < 0: the class scores 0 * decay = 0 whatever the negative (similarity 0.74)."""
    prototypes = torch.tensor([[1.0, 0.0]])
    f = F.normalize(torch.tensor([[-0.1, 1.0]]), dim=1)
    negatives, labels = torch.tensor([[0.6, 0.8]]), torch.tensor([0])
    screen = NegativesScreen.of(prototypes, negatives, labels, torch.tensor([True]), 0.8)
    before = scores_with_negatives(f, prototypes, negatives[:0], labels[:0], 0.8)
    assert torch.equal(before, scores_with_negatives(f, prototypes, negatives, labels, 0.8))
    assert screen.unchanged(f, [1]) == [True]
    assert screen.unchanged(F.normalize(torch.tensor([[1e-3, 1.0]]), dim=1), [1]) == [False]
