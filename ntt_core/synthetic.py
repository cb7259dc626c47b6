"""Generated scenes and COCO-format datasets for tests, benchmarks and offline smoke runs.

Each class is a distinct shape in a distinct colour on a noisy grey background, so a reference
instance of a class really does look like its other instances. Masks are rasterised with
pycocotools itself and images are saved as PNG, so annotations match the pixels exactly.
"""

from __future__ import annotations

import colorsys
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

# Vertex lists in units of the instance radius; "ring" and "frame" have holes, so they exist
# only as rasters (COCO polygons cannot express a hole).
_HOLED_SHAPES = {"ring": "disc", "frame": "square"}
_SHAPES = ("disc", "square", "triangle", "ring", "diamond", "cross", "star", "hexagon", "frame")
_MARGIN = 12  # a little more than the 10 px the few-shot protocol demands from image borders
_MAX_TRIES = 20
_MAX_HIDDEN = 0.5  # an instance may lose at most this fraction of its pixels to later ones

# (H, W), or ((H_min, H_max), (W_min, W_max)) for a random size per image.
ImageSize = tuple[int, int] | tuple[tuple[int, int], tuple[int, int]]


@dataclass(frozen=True)
class SyntheticInstance:
    """One visible instance: ``mask`` is what remains visible after later instances are drawn."""

    label: str
    mask: np.ndarray  # bool HxW, full resolution
    box_xywh: tuple[float, float, float, float]  # COCO convention, tight around ``mask``
    polygons: list[list[float]] | None = None  # exact COCO polygons of ``mask``, when they exist


def _regular(n: int, radius: float = 1.0, phase: float = -np.pi / 2) -> np.ndarray:
    angles = phase + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _unit_outline(shape: str) -> np.ndarray:
    """Outline of a shape as (K, 2) x/y points around the origin, roughly inside the unit disc."""
    if shape == "disc":
        return _regular(40)
    if shape == "square":
        return np.array([[-0.75, -0.75], [0.75, -0.75], [0.75, 0.75], [-0.75, 0.75]])
    if shape == "triangle":
        return _regular(3)
    if shape == "diamond":
        return np.array([[0.0, -1.0], [0.8, 0.0], [0.0, 1.0], [-0.8, 0.0]])
    if shape == "cross":
        a, b = 0.3, 0.9
        return np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a],
                         [a, b], [-a, b], [-a, a], [-b, a], [-b, -a], [-a, -a]])  # fmt: skip
    if shape == "star":
        outer, inner = _regular(5), _regular(5, 0.45, -np.pi / 2 + np.pi / 5)
        return np.stack([outer, inner], axis=1).reshape(-1, 2)
    if shape == "hexagon":
        return _regular(6)
    raise ValueError(f"unknown shape {shape!r}")


def _rasterise(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    rles = mask_utils.frPyObjects(polygons, height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def _place(outline: np.ndarray, centre: np.ndarray, radius: float, angle: float) -> list[float]:
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = outline @ rotation.T * radius + centre
    return np.round(points, 2).ravel().tolist()


def _draw_shape(shape: str, centre: np.ndarray, radius: float, angle: float, size: tuple[int, int]):
    """Full (unoccluded) mask of one instance, and its polygon when the shape has no hole."""
    if shape in _HOLED_SHAPES:
        base = _unit_outline(_HOLED_SHAPES[shape])
        outer = _rasterise([_place(base, centre, radius, angle)], *size)
        inner = _rasterise([_place(base, centre, radius * 0.5, angle)], *size)
        return outer & ~inner, None
    polygon = _place(_unit_outline(shape), centre, radius, angle)
    return _rasterise([polygon], *size), polygon


def _class_colour(index: int) -> np.ndarray:
    # Golden-ratio hue steps keep any number of classes far apart in colour.
    hue = (index * 0.618033988749895) % 1.0
    return np.array(colorsys.hsv_to_rgb(hue, 0.85, 0.95)) * 255


def _random_pose(rng: np.random.Generator, height: int, width: int):
    side = min(height, width)
    r_lo = min(22.0, side / 4)
    radius = rng.uniform(r_lo, max(r_lo, side / 3.5))
    # Most instances keep clear of the borders; some touch them, as real objects do.
    margin = _MARGIN if rng.random() < 0.8 else -radius / 2
    lo = radius + margin
    cx = rng.uniform(lo, width - 1 - lo) if width - 1 - lo > lo else (width - 1) / 2
    cy = rng.uniform(lo, height - 1 - lo) if height - 1 - lo > lo else (height - 1) / 2
    return np.array([cx, cy]), radius, rng.uniform(0, 2 * np.pi)


def _hides_too_much(full: np.ndarray, visible: list[np.ndarray], areas: list[int]) -> bool:
    kept = [(v & ~full).sum() for v in visible]
    return any(k < (1 - _MAX_HIDDEN) * a for k, a in zip(kept, areas, strict=True))


def _inside(polygon: list[float] | None, height: int, width: int) -> bool:
    if polygon is None:
        return False
    xy = np.asarray(polygon).reshape(-1, 2)
    return bool((xy >= 0).all() and (xy[:, 0] <= width).all() and (xy[:, 1] <= height).all())


def _box_of(mask: np.ndarray) -> tuple[float, float, float, float]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return tuple(float(v) for v in mask_utils.toBbox(rle))


def make_scene(
    rng: np.random.Generator,
    height: int,
    width: int,
    classes: Sequence[str],
    max_instances: int = 4,
) -> tuple[np.ndarray, list[SyntheticInstance]]:
    """An RGB uint8 image with 1..max_instances instances of random ``classes``, drawn in order.

    Later instances are drawn on top; placements that would hide more than half of an earlier
    instance are retried, so every instance stays recognisable.
    """
    size = (height, width)
    image = rng.normal(rng.uniform(90, 160, size=3), 20, size=(height, width, 3))
    labels, fulls, polygons, visible, areas = [], [], [], [], []
    for _ in range(rng.integers(1, max_instances + 1)):
        k = int(rng.integers(len(classes)))
        for _ in range(_MAX_TRIES):
            full, polygon = _draw_shape(_SHAPES[k % len(_SHAPES)], *_random_pose(rng, *size), size)
            if full.any() and not _hides_too_much(full, visible, areas):
                break
        else:
            continue
        visible = [v & ~full for v in visible] + [full]
        labels.append(classes[k])
        fulls.append(full)
        polygons.append(polygon if _inside(polygon, *size) else None)
        areas.append(int(full.sum()))
        image[full] = _class_colour(k) + rng.normal(0, 8, size=(int(full.sum()), 3))
    instances = [
        SyntheticInstance(label, v, _box_of(v), [p] if p and (v == f).all() else None)
        for label, v, f, p in zip(labels, visible, fulls, polygons, strict=True)
    ]
    return np.clip(image, 0, 255).astype(np.uint8), instances


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's crowd encoding: run lengths over the column-major mask, starting with zeros."""
    flat = mask.ravel(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    return {"size": list(mask.shape), "counts": counts}


def _segmentation(instance: SyntheticInstance, crowd: bool, use_polygon: bool):
    if crowd:
        return _uncompressed_rle(instance.mask)
    if use_polygon and instance.polygons is not None:
        return instance.polygons
    rle = mask_utils.encode(np.asfortranarray(instance.mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _annotation(ann_id: int, image_id: int, category_id: int, seg, instance, crowd: bool) -> dict:
    rle = mask_utils.encode(np.asfortranarray(instance.mask.astype(np.uint8)))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": list(instance.box_xywh),
        "area": float(mask_utils.area(rle)),
        "iscrowd": int(crowd),
        "segmentation": seg,
    }


def default_category_ids(num_classes: int) -> list[int]:
    """Non-contiguous ids (1, 4, 7, …), as in COCO, to catch index-versus-id mix-ups."""
    return [1 + 3 * i for i in range(num_classes)]


def _image_size(rng: np.random.Generator, image_size: ImageSize) -> tuple[int, int]:
    h, w = image_size
    if isinstance(h, int) and isinstance(w, int):
        return h, w
    return int(rng.integers(h[0], h[1] + 1)), int(rng.integers(w[0], w[1] + 1))


def write_coco_dataset(
    root: Path,
    num_images: int,
    classes: Sequence[str],
    seed: int,
    image_size: ImageSize = ((96, 160), (96, 192)),
    split: str = "val2017",
    category_ids: Sequence[int] | None = None,
    crowd_fraction: float = 0.0,
) -> Path:
    """Write ``root/<split>/*.png`` and ``root/annotations/instances_<split>.json`` (returned).

    Segmentations mix polygons and compressed RLE (crowd annotations use COCO's uncompressed RLE).
    Image ids are odd numbers (1, 3, 5, …) so that ids and positions differ.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    category_ids = list(category_ids or default_category_ids(len(classes)))
    id_of = dict(zip(classes, category_ids, strict=True))
    (root / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        image_id = 1 + 2 * i
        height, width = _image_size(rng, image_size)
        pixels, instances = make_scene(rng, height, width, classes)
        file_name = f"{image_id:012d}.png"
        Image.fromarray(pixels).save(root / split / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for instance in instances:
            crowd = bool(rng.random() < crowd_fraction)
            seg = _segmentation(instance, crowd, use_polygon=bool(rng.random() < 0.7))
            category_id = id_of[instance.label]
            ann = _annotation(len(annotations) + 1, image_id, category_id, seg, instance, crowd)
            annotations.append(ann)
    categories = [{"id": c, "name": n, "supercategory": "shape"} for n, c in id_of.items()]
    dataset = {
        "info": {"description": f"ntt synthetic {split}, seed {seed}"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    path = root / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataset))
    return path


def write_coco_root(
    root: Path, classes: Sequence[str], num_train: int, num_val: int, seed: int
) -> Path:
    """A fake COCO root: train2017/, val2017/ and annotations/instances_{train,val}2017.json."""
    write_coco_dataset(root, num_train, classes, seed, split="train2017")
    write_coco_dataset(root, num_val, classes, seed + 1, split="val2017")
    return Path(root)
