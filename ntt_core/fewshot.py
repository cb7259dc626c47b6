"""The paper's N-shot reference sampling (its COCO few-shot benchmark protocol), in pure Python.

Annotations are COCO-style dicts (``id``, ``image_id``, ``category_id``, ``bbox`` xywh, optional
``iscrowd``). Ids only need to be hashable, so the COCO command line (int ids from a json file) and
the FiftyOne operator (string ids from detections) share this code and its exact picks.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence
from typing import TypedDict

from .errors import ReferenceInputError

MIN_BOX_SIDE = 32  # px, both width and height
MIN_BORDER_GAP = 10  # px between the box and every image border

FEW_SHOT_CLASSES = (
    "airplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorcycle", "person", "potted plant", "sheep", "couch",
    "train", "tv",
)  # fmt: skip

ALL_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

_SPLITS = {"few_shot_classes": FEW_SHOT_CLASSES, "all_classes": ALL_CLASSES}


class ReferenceChoice(TypedDict):
    """One sampled reference, in the paper's format: its image and its one annotation."""

    img_id: Hashable
    ann_ids: list[Hashable]


def split_classes(name: str) -> list[str]:
    """Class names of a split: ``"few_shot_classes"`` (the 20 VOC classes) or ``"all_classes"``."""
    if name not in _SPLITS:
        raise ReferenceInputError(f"unknown class split {name!r}; use one of {sorted(_SPLITS)}")
    return list(_SPLITS[name])


def class_ids_by_name(categories: Iterable[Mapping], names: Sequence[str]) -> list[Hashable]:
    """Category ids of ``names`` (in that order) from COCO ``categories`` dicts."""
    id_of = {c["name"]: c["id"] for c in categories}
    unknown = [n for n in names if n not in id_of]
    if unknown:
        raise ReferenceInputError(
            f"classes {unknown} are not in the annotation file's categories; check the split"
        )
    return [id_of[n] for n in names]


def is_valid_reference(
    bbox_xywh: Sequence[float], image_wh: tuple[int, int], iscrowd: bool = False
) -> bool:
    """The protocol's rule: not crowd, box at least 32x32 px and 10 px clear of every border."""
    x, y, w, h = bbox_xywh
    width, height = image_wh
    return (
        not iscrowd
        and w >= MIN_BOX_SIDE
        and h >= MIN_BOX_SIDE
        and min(x, y, width - (x + w), height - (y + h)) >= MIN_BORDER_GAP
    )


def _image_sizes(images: Mapping[Hashable, tuple[int, int]] | Iterable[Mapping]) -> Mapping:
    if isinstance(images, Mapping):
        return images
    return {image["id"]: (image["width"], image["height"]) for image in images}


def _group_by_category(
    annotations: Iterable[Mapping], class_ids: Collection[Hashable] | None
) -> dict[Hashable, list[Mapping]]:
    """The split's annotations per category, categories and annotations in file order."""
    wanted = None if class_ids is None else set(class_ids)
    groups: dict[Hashable, list[Mapping]] = {}
    for ann in annotations:
        if wanted is None or ann["category_id"] in wanted:
            groups.setdefault(ann["category_id"], []).append(ann)
    missing = [] if wanted is None else [c for c in class_ids if c not in groups]
    if missing:
        raise ReferenceInputError(
            f"categories {missing} have no annotations at all; drop them from the class list"
        )
    return groups


def _is_valid(ann: Mapping, sizes: Mapping) -> bool:
    if ann["image_id"] not in sizes:
        raise ReferenceInputError(
            f"annotation {ann['id']!r} refers to image {ann['image_id']!r}, whose size is unknown"
        )
    return is_valid_reference(ann["bbox"], sizes[ann["image_id"]], bool(ann.get("iscrowd", 0)))


def _sample_category(
    category: str,
    anns: list[Mapping],
    sizes: Mapping,
    shots: int,
    rng: random.Random,
    allow_repeats: bool,
) -> list[ReferenceChoice]:
    # The whole group is shuffled, valid or not, so the picks match the paper's for a seed.
    rng.shuffle(anns)
    chosen, used_images = [], set()
    for ann in anns:
        if ann["image_id"] not in used_images and _is_valid(ann, sizes):
            chosen.append(ann)
            used_images.add(ann["image_id"])
            if len(chosen) == shots:
                break
    if len(chosen) < shots and not (allow_repeats and chosen):
        raise ReferenceInputError(
            f"class {category!r} has {len(chosen)} usable reference instances among "
            f"{len(anns)} annotations, but {shots} shots were asked (usable: not crowd, box "
            f">= {MIN_BOX_SIDE}x{MIN_BOX_SIDE} px, >= {MIN_BORDER_GAP} px from the image borders, "
            "one per image); ask for fewer shots or allow repeats"
        )
    repeated = itertools.islice(itertools.cycle(chosen), shots)
    return [{"img_id": a["image_id"], "ann_ids": [a["id"]]} for a in repeated]


def sample_references(
    annotations: Iterable[Mapping],
    image_sizes: Mapping[Hashable, tuple[int, int]] | Iterable[Mapping],
    class_ids: Collection[Hashable] | None,
    shots: int,
    seed: int,
    allow_repeats: bool = False,
    category_names: Mapping[Hashable, str] | None = None,
) -> dict[Hashable, list[ReferenceChoice]]:
    """Pick ``shots`` reference annotations per category, exactly as the paper's protocol does.

    ``image_sizes`` maps image id to (width, height), or is the COCO ``images`` list.
    ``class_ids`` restricts the categories (None: every category seen). A private
    ``random.Random(seed)`` gives the same shuffles as the paper's ``random.seed(seed)``
    without touching global state. With ``allow_repeats``, a category with fewer usable
    annotations than ``shots`` cycles through the ones it has instead of raising.
    ``category_names`` lets an error name a class rather than its id.
    """
    if shots < 1:
        raise ReferenceInputError(f"shots must be at least 1, got {shots}")
    sizes = _image_sizes(image_sizes)
    rng = random.Random(seed)
    names = category_names or {}
    groups = _group_by_category(annotations, class_ids)
    # Categories are sampled in first-seen order: the shared generator makes order matter.
    return {
        category: _sample_category(
            names.get(category, category), anns, sizes, shots, rng, allow_repeats
        )
        for category, anns in groups.items()
    }
