"""Full-resolution masks computed region by region equal the dense upsampling of the paper."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from ntt_core.masks import CroppedMasks, RLEMasks, masks_from_logits
from ntt_core.postprocess import mask_boxes

# Region-wise matrix products and torch's kernel may round the last bit differently; a pixel may
# flip only where the dense value is that close to 0 (logits here are O(10)).
ROUNDING = 1e-4


def blob_logits(count: int, side: int, seed: int) -> torch.Tensor:
    """Low-res logits of round blobs of random centre and radius, far beyond +-32 inside."""
    generator = torch.Generator().manual_seed(seed)
    axis = torch.arange(side, dtype=torch.float32) + 0.5
    centres = torch.rand(count, 2, generator=generator) * side
    radii = 2 + torch.rand(count, generator=generator) * side / 4
    distance = (
        (axis[None, :, None] - centres[:, None, None, 1]) ** 2
        + (axis[None, None, :] - centres[:, None, None, 0]) ** 2
    ).sqrt()
    return 40 * (radii[:, None, None] - distance)


def upsampled(logits: torch.Tensor, size: tuple[int, int]):
    return masks_from_logits(logits, mask_boxes(logits > 0), size)


def dense(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(
        logits[:, None], size=size, mode="bilinear", align_corners=False, antialias=True
    )[:, 0]


@pytest.mark.parametrize("size", [(120, 160), (37, 50), (64, 64)])
def test_cropped_masks_equal_the_dense_upsampling(size):
    logits = blob_logits(12, 64, seed=size[0])
    logits[3] = -1.0  # empty at low resolution
    expected = dense(logits, size)
    masks = upsampled(logits, size)
    assert isinstance(masks, CroppedMasks)
    decoded = torch.from_numpy(mask_utils.decode(masks.rles())).permute(2, 0, 1).bool()
    flipped = decoded != (expected > 0)
    assert (expected[flipped].abs() < ROUNDING).all()
    assert masks.areas().tolist() == decoded.flatten(1).sum(dim=1).tolist()
    assert masks.rles()[3] == mask_utils.encode(np.zeros((*size, 1), np.uint8, order="F"))[0]
    # Tight boxes that contain the masks.
    for box, mask in zip(masks.boxes_xyxy(), decoded.numpy()):
        if mask.any():
            ys, xs = np.nonzero(mask)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_overlaps_by_pair_by_class_and_from_rle_agree_with_dense_masks():
    size = (90, 110)
    logits = blob_logits(30, 48, seed=5)
    labels = torch.arange(30) % 3
    cropped = upsampled(logits, size)
    full = torch.from_numpy(mask_utils.decode(cropped.rles())).permute(2, 0, 1).flatten(1).double()
    expected = (full @ full.T) / full.sum(dim=1)[:, None]
    expected = (expected * (labels[:, None] == labels[None, :])).tril(diagonal=-1)
    by_pair = cropped._intersections_by_pair(labels) / full.sum(dim=1)[:, None]
    by_class = cropped._intersections_by_class(labels) / full.sum(dim=1)[:, None]
    from_rle = RLEMasks(size, cropped.rles()).overlap_over_self(labels)
    assert expected.count_nonzero() > 5
    for found in (cropped.overlap_over_self(labels), by_pair, by_class, from_rle):
        torch.testing.assert_close(found, expected, rtol=0, atol=1e-12)


def test_rle_fallback_for_huge_crops_gives_the_same_masks(monkeypatch):
    logits = blob_logits(4, 32, seed=1)
    cropped = upsampled(logits, (70, 50))
    monkeypatch.setattr("ntt_core.masks._CROP_BUDGET", 10)
    encoded = upsampled(logits, (70, 50))
    assert isinstance(encoded, RLEMasks)
    assert encoded.rles() == cropped.rles()


def test_row_blocks_do_not_change_the_masks(monkeypatch):
    logits = blob_logits(4, 32, seed=2)
    whole = upsampled(logits, (70, 50))
    monkeypatch.setattr("ntt_core.masks._BLOCK_VALUES", 50)  # a few rows per block
    assert upsampled(logits, (70, 50)).rles() == whole.rles()
