"""Full-resolution proposal masks for post-processing, computed only where they can be non-zero.

The paper upsamples every kept low-res logit map to the image size (bilinear, antialiased) and
thresholds at 0. Bilinear resampling is a non-negative combination of neighbouring low-res
values, so a full-resolution pixel can be positive only where its neighbourhood holds a positive
low-res logit: outside the region fed by the mask's low-res box, the answer is 0 without
computing it. ``CroppedMasks`` computes each mask inside that region only, separably with torch's
own weights (columns first, as its kernel does, so the values equal ``F.interpolate``'s up to
float rounding in the last bit), on the device where the logits are.
Areas and the overlap decay's intersections come from the crops; boxes and RLE only for the
instances returned. ``RLEMasks`` offers the same operations on cached RLE masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from pycocotools import mask as mask_utils

from .matching import upsampling_matrix
from .postprocess import mask_boxes, rle_areas, rle_boxes_xyxy

# Above this many bytes of crops in all (a very large image with many large masks), each mask
# is encoded to RLE as soon as it is computed instead.
_CROP_BUDGET = 1 << 30
# Float values per block of rows when upsampling a region (64 MB).
_BLOCK_VALUES = 1 << 24


@dataclass(frozen=True)
class _Axis:
    """One axis of the upsampling: per target index, the source indices it reads and weights."""

    taps: torch.Tensor
    """(target, K) source indices (padded with the first, at weight 0)."""
    weights: torch.Tensor
    """(target, K) torch's own resampling weights, on the logits' device."""
    target_first: list[int]
    """Per source index, the first and last target index it feeds."""
    target_last: list[int]
    source_first: list[int]
    """Per target index, the first and last source index among its taps."""
    source_last: list[int]


@lru_cache(maxsize=16)
def _axis(source: int, target: int, device: torch.device) -> _Axis:
    matrix = upsampling_matrix(source, target, device)
    nonzero = (matrix != 0).cpu()
    targets = torch.arange(target)[:, None].expand(-1, source)
    sources = torch.arange(source)[None, :].expand(target, -1)
    # Source taps of a target index are contiguous: its first and the next ones.
    source_first = torch.where(nonzero, sources, source).min(dim=1).values
    count = int(nonzero.sum(dim=1).max())
    taps = (source_first[:, None] + torch.arange(count)[None, :]).clamp(max=source - 1)
    taps = taps.to(device)
    weights = matrix.gather(1, taps)
    # Taps past a row's last weight read zeros of the matrix: weight 0, the sum is unchanged.
    return _Axis(
        taps=taps,
        weights=weights,
        target_first=torch.where(nonzero, targets, target).min(dim=0).values.tolist(),
        target_last=torch.where(nonzero, targets, -1).max(dim=0).values.tolist(),
        source_first=source_first.tolist(),
        source_last=taps.max(dim=1).values.tolist(),
    )


@dataclass
class CroppedMasks:
    """Binary full-resolution masks, each stored only inside its region (bool crops)."""

    image_size: tuple[int, int]
    crops: list[torch.Tensor]
    """Per mask, bool (rows, cols) on the logits' device; pixels outside are 0."""
    origins: list[tuple[int, int]]
    """Per mask, the (row, col) of its crop's top-left pixel."""

    def __len__(self) -> int:
        return len(self.crops)

    def select(self, index: torch.Tensor) -> CroppedMasks:
        positions = index.tolist()
        return CroppedMasks(
            self.image_size,
            [self.crops[i] for i in positions],
            [self.origins[i] for i in positions],
        )

    def areas(self) -> torch.Tensor:
        """(P,) pixel counts, on the crops' device."""
        if not self.crops:
            return torch.zeros(0, dtype=torch.int64)
        if self.crops[0].device.type == "cpu":  # numpy: far less overhead per small crop
            return torch.tensor([np.count_nonzero(crop.numpy()) for crop in self.crops])
        return torch.stack([crop.sum() for crop in self.crops])

    def overlap_over_self(self, labels: torch.Tensor) -> torch.Tensor:
        """(P, P) ``|M_i ∩ M_j| / |M_i|`` for same-class pairs j < i; 0 elsewhere."""
        areas = self.areas().double()
        device = areas.device
        if self.crops and self.crops[0].device.type == "cuda":
            intersections = self._intersections_by_class(labels.to(device))
        else:
            intersections = self._intersections_by_pair(labels.cpu()).to(device)
        return intersections / areas.clamp(min=1)[:, None]

    def boxes_xyxy(self) -> np.ndarray:
        """(P, 4) float32 boxes that contain each mask (x2, y2 one past the last pixel)."""
        boxes = np.zeros((len(self), 4), dtype=np.float32)
        for k, (crop, (top, left)) in enumerate(zip(self.crops, self.origins)):
            if crop.any():
                box = mask_boxes(crop[None]).cpu().numpy()[0]
                boxes[k] = box + [left, top, left + 1, top + 1]
        return boxes

    def rles(self) -> list[dict]:
        """COCO RLE of each full-resolution mask, encoded from its crop."""
        height, width = self.image_size
        return [
            _crop_rle(crop.cpu().numpy(), top, left, height, width)
            for crop, (top, left) in zip(self.crops, self.origins)
        ]

    def _regions(self) -> torch.Tensor:
        """(P, 4) int64 (top, left, bottom, right) of the crops, on the CPU."""
        return torch.tensor(
            [
                (top, left, top + crop.shape[0], left + crop.shape[1])
                for crop, (top, left) in zip(self.crops, self.origins)
            ],
            dtype=torch.int64,
        ).reshape(-1, 4)

    def _intersections_by_pair(self, labels: torch.Tensor) -> torch.Tensor:
        """Pixel counts of same-class intersections, j < i, one crop overlap at a time (CPU)."""
        regions = self._regions()
        top = torch.maximum(regions[:, None, 0], regions[None, :, 0])
        left = torch.maximum(regions[:, None, 1], regions[None, :, 1])
        bottom = torch.minimum(regions[:, None, 2], regions[None, :, 2])
        right = torch.minimum(regions[:, None, 3], regions[None, :, 3])
        candidates = (labels[:, None] == labels[None, :]) & (top < bottom) & (left < right)
        pairs = torch.nonzero(candidates.tril(diagonal=-1))
        windows = torch.stack([top, bottom, left, right], dim=2)[pairs[:, 0], pairs[:, 1]]
        crops = [crop.numpy() for crop in self.crops]  # numpy: far less overhead per pair
        counts = np.zeros((len(self), len(self)), dtype=np.float64)
        for (i, j), (y0, y1, x0, x1) in zip(pairs.tolist(), windows.tolist()):
            (ti, li), (tj, lj) = self.origins[i], self.origins[j]
            window_i = crops[i][y0 - ti : y1 - ti, x0 - li : x1 - li]
            window_j = crops[j][y0 - tj : y1 - tj, x0 - lj : x1 - lj]
            counts[i, j] = np.count_nonzero(window_i & window_j)
        return torch.from_numpy(counts)

    def _intersections_by_class(self, labels: torch.Tensor) -> torch.Tensor:
        """Pixel counts of same-class intersections, j < i: per class, the members pasted on
        the union of their regions and multiplied (one matrix product, for a GPU)."""
        counts = torch.zeros(len(self), len(self), dtype=torch.float64, device=labels.device)
        regions = self._regions()
        for label in labels.unique().tolist():
            members = torch.nonzero(labels == label).flatten().tolist()
            if len(members) < 2:
                continue
            union = regions[members]
            top, left = union[:, :2].min(dim=0).values.tolist()
            bottom, right = union[:, 2:].max(dim=0).values.tolist()
            canvas = torch.zeros(
                len(members), bottom - top, right - left, dtype=torch.float32, device=labels.device
            )
            for row, k in enumerate(members):
                r, c = self.origins[k]
                crop = self.crops[k]
                canvas[
                    row, r - top : r - top + crop.shape[0], c - left : c - left + crop.shape[1]
                ] = crop
            flat = canvas.flatten(1)
            # 0/1 products summed in fp32 are exact below 2**24 pixels; beyond, sum in fp64.
            product = flat @ flat.T if flat.shape[1] < 1 << 24 else flat.double() @ flat.double().T
            index = torch.tensor(members, device=labels.device)
            counts[index[:, None], index[None, :]] = product.double().tril(diagonal=-1)
        return counts


@dataclass
class RLEMasks:
    """Binary full-resolution masks held as COCO RLE (cached proposals)."""

    image_size: tuple[int, int]
    encoded: list[dict]

    def __len__(self) -> int:
        return len(self.encoded)

    def select(self, index: torch.Tensor) -> RLEMasks:
        return RLEMasks(self.image_size, [self.encoded[i] for i in index.tolist()])

    def areas(self) -> torch.Tensor:
        return torch.from_numpy(rle_areas(self.encoded))

    def overlap_over_self(self, labels: torch.Tensor) -> torch.Tensor:
        """(P, P) ``|M_i ∩ M_j| / |M_i|`` for same-class pairs j < i; 0 elsewhere."""
        # NumPy, not torch: these are many tiny arrays, where torch's per-op threading costs
        # milliseconds each on a busy CPU.
        overlap = np.zeros((len(self), len(self)), dtype=np.float64)
        labels = labels.cpu().numpy()
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            if len(members) < 2:
                continue
            rles = [self.encoded[i] for i in members]
            # pycocotools' crowd IoU is |dt ∩ gt| / |dt|: exactly the intersection-over-self.
            crowd = np.ones(len(rles), dtype=np.uint8)
            ios = np.asarray(mask_utils.iou(rles, rles, crowd), dtype=np.float64)
            overlap[np.ix_(members, members)] = np.tril(ios, -1)
        return torch.from_numpy(overlap)

    def boxes_xyxy(self) -> np.ndarray:
        return rle_boxes_xyxy(self.encoded)

    def rles(self) -> list[dict]:
        return list(self.encoded)


def masks_from_logits(
    logits: torch.Tensor,
    low_res_boxes: torch.Tensor,
    image_size: tuple[int, int],
    index: torch.Tensor | None = None,
) -> CroppedMasks | RLEMasks:
    """Thresholded full-resolution upsampling of low-res logits (P, h, w), region by region.

    ``low_res_boxes`` (P, 4) are the xyxy boxes of ``logits > 0`` (x2 the last foreground
    column); ``index`` picks and orders the proposals to upsample (all when None) without
    copying the logits.
    """
    height, width = image_size
    rows = _axis(logits.shape[1], height, logits.device)
    cols = _axis(logits.shape[2], width, logits.device)
    positions = range(len(logits)) if index is None else index.tolist()
    boxes = low_res_boxes.long().cpu()
    # (top, bottom, left, right): every full-resolution pixel the low-res box feeds.
    regions = [
        (rows.target_first[y0], rows.target_last[y1] + 1)
        + (cols.target_first[x0], cols.target_last[x1] + 1)
        for x0, y0, x1, y1 in boxes[list(positions)].tolist()
    ]
    crop_bytes = sum((bottom - top) * (right - left) for top, bottom, left, right in regions)
    as_rle = crop_bytes > _CROP_BUDGET
    crops, origins, encoded = [], [], []
    for k, (top, bottom, left, right) in zip(positions, regions):
        crop = _foreground_region(logits[k], rows, cols, top, bottom, left, right)
        if as_rle:
            encoded.append(_crop_rle(crop.cpu().numpy(), top, left, height, width))
        else:
            crops.append(crop)
            origins.append((top, left))
    if as_rle:
        return RLEMasks(image_size, encoded)
    return CroppedMasks(image_size, crops, origins)


def _foreground_region(
    logits: torch.Tensor, rows: _Axis, cols: _Axis, top: int, bottom: int, left: int, right: int
) -> torch.Tensor:
    """Upsampled logits > 0 on rows [top, bottom) x cols [left, right), reading only its band.

    Each value is the weighted sum of its few source taps, columns first, then rows: the order
    and weights of torch's separable kernel. Rows go in blocks so that a region of a very large
    image never holds more than a few float copies of one block.
    """
    height, width = max(bottom - top, 0), max(right - left, 0)
    foreground = torch.zeros(height, width, dtype=torch.bool, device=logits.device)
    if not height or not width:
        return foreground
    r0, r1 = rows.source_first[top], rows.source_last[bottom - 1] + 1
    col_taps, col_weights = cols.taps[left:right], cols.weights[left:right]
    across = (logits[r0:r1].float()[:, col_taps] * col_weights).sum(dim=2)  # (r1 - r0, width)
    block = max(1, _BLOCK_VALUES // (width * rows.taps.shape[1]))
    for start in range(0, height, block):
        stop = min(start + block, height)
        taps = rows.taps[top + start : top + stop] - r0
        weights = rows.weights[top + start : top + stop, :, None]
        foreground[start:stop] = (across[taps] * weights).sum(dim=1) > 0
    return foreground


def _crop_rle(crop: np.ndarray, top: int, left: int, height: int, width: int) -> dict:
    """COCO RLE of the full (height, width) mask that is ``crop`` at (top, left), 0 elsewhere.

    Runs are counted on the crop's column strip only; the columns before and after it are
    whole runs of zeros.
    """
    strip = np.zeros((height, crop.shape[1]), dtype=np.uint8)
    strip[top : top + crop.shape[0]] = crop
    flat = strip.ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    if flat.size and flat[0]:
        runs.insert(0, 0)  # RLE starts with a run of zeros
    if not runs:
        runs = [0]
    runs[0] += left * height
    trailing = (width - left - crop.shape[1]) * height
    if len(runs) % 2 == 1:
        runs[-1] += trailing
    elif trailing:
        runs.append(trailing)
    return mask_utils.frPyObjects({"size": [height, width], "counts": runs}, height, width)
