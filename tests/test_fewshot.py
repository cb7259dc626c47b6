"""The paper's N-shot reference sampling: exact picks for a seed, and each validity rule."""

import json
import random

import pytest

from ntt_core.errors import ReferenceInputError
from ntt_core.fewshot import (
    ALL_CLASSES,
    FEW_SHOT_CLASSES,
    class_ids_by_name,
    is_valid_reference,
    sample_references,
    split_classes,
)
from ntt_core.synthetic import write_coco_dataset

W, H = 200, 100  # every hand-built image
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools on numpy 2


def ann(ann_id, image_id, category_id, bbox, iscrowd=0):
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "iscrowd": iscrowd,
    }


# Category 7 is seen first, then 3. In category 7 only 1 (or 9, same image), 10 and 11 are usable.
ANNOTATIONS = [
    ann(1, 10, 7, [10, 10, 32, 32]),  # valid at the exact limits
    ann(100, 20, 3, [50, 20, 40, 40]),
    ann(2, 11, 7, [50, 20, 40, 40], iscrowd=1),
    ann(3, 12, 7, [50, 20, 31, 40]),  # too narrow
    ann(101, 21, 3, [50, 20, 40, 40]),
    ann(4, 13, 7, [50, 20, 40, 31]),  # too short
    ann(5, 14, 7, [9, 20, 40, 40]),  # left border
    ann(6, 15, 7, [50, 9, 40, 40]),  # top border
    ann(102, 22, 3, [50, 20, 40, 40], iscrowd=1),
    ann(7, 16, 7, [151, 20, 40, 40]),  # right border: 200 - 191 = 9
    ann(8, 17, 7, [50, 51, 40, 40]),  # bottom border: 100 - 91 = 9
    ann(9, 10, 7, [100, 20, 40, 40]),  # valid, but image 10 again
    ann(10, 18, 7, [10, 10, 180, 80]),  # valid, 10 px from every border
    ann(103, 23, 3, [50, 20, 40, 40]),
    ann(11, 19, 7, [60, 30, 50, 50]),
    ann(104, 24, 3, [50, 20, 40, 40]),
]
SIZES = {a["image_id"]: (W, H) for a in ANNOTATIONS}
USABLE = {1, 9, 10, 11, 100, 101, 103, 104}


def replay(ids_in_file_order, rng, shots):
    """The protocol by hand: shuffle every id, keep usable ones from unseen images, first N."""
    order = list(ids_in_file_order)
    rng.shuffle(order)
    image_of = {a["id"]: a["image_id"] for a in ANNOTATIONS}
    picked, images = [], set()
    for i in order:
        if i in USABLE and image_of[i] not in images:
            picked.append(i)
            images.add(image_of[i])
    return picked[:shots]


def picked_ids(refs):
    return {c: [r["ann_ids"][0] for r in choices] for c, choices in refs.items()}


def test_private_generator_equals_module_seeding():
    saved = random.getstate()
    try:
        random.seed(33)
        lists = [list(range(n)) for n in (5, 17, 40)]
        for x in lists:
            random.shuffle(x)
    finally:
        random.setstate(saved)
    private = random.Random(33)
    expected = [list(range(n)) for n in (5, 17, 40)]
    for x in expected:
        private.shuffle(x)
    assert lists == expected


@pytest.mark.parametrize("seed", [0, 1, 33, 2024])
def test_picks_replay_the_shuffle(seed):
    rng = random.Random(seed)
    expected7 = replay([a["id"] for a in ANNOTATIONS if a["category_id"] == 7], rng, 3)
    expected3 = replay([a["id"] for a in ANNOTATIONS if a["category_id"] == 3], rng, 3)
    refs = sample_references(ANNOTATIONS, SIZES, None, shots=3, seed=seed)
    assert list(refs) == [7, 3]  # first-seen order
    assert picked_ids(refs) == {7: expected7, 3: expected3}
    image_of = {a["id"]: a["image_id"] for a in ANNOTATIONS}
    assert all(r["img_id"] == image_of[r["ann_ids"][0]] for c in refs for r in refs[c])


def test_picks_for_seed_33_are_pinned():
    # Random(33) shuffles category 7's ids to [1, 7, 11, 2, …] and then category 3's to
    # [100, 102, 101, …]; shuffling only the usable ids would have given [11, 1] and [104, 100].
    refs = sample_references(ANNOTATIONS, SIZES, None, shots=2, seed=33)
    assert picked_ids(refs) == {7: [1, 11], 3: [100, 101]}


def test_class_ids_restrict_the_walk():
    refs = sample_references(ANNOTATIONS, SIZES, [3], shots=2, seed=5)
    assert list(refs) == [3]
    ids3 = [a["id"] for a in ANNOTATIONS if a["category_id"] == 3]
    assert picked_ids(refs)[3] == replay(ids3, random.Random(5), 2)


def test_string_ids_and_image_dicts_give_the_same_picks():
    as_str = [
        {
            **a,
            "id": f"a{a['id']}",
            "image_id": f"i{a['image_id']}",
            "category_id": f"c{a['category_id']}",
        }
        for a in ANNOTATIONS
    ]
    images = [{"id": f"i{i}", "width": W, "height": H} for i in SIZES]
    refs = sample_references(as_str, images, None, shots=3, seed=33)
    plain = sample_references(ANNOTATIONS, SIZES, None, shots=3, seed=33)
    assert picked_ids(refs) == {
        f"c{c}": [f"a{i}" for i in ids] for c, ids in picked_ids(plain).items()
    }


def test_global_random_state_untouched():
    before = random.getstate()
    sample_references(ANNOTATIONS, SIZES, None, shots=2, seed=1)
    assert random.getstate() == before


def _one_category(bboxes, crowd_index=None, repeat_image=False):
    anns = [ann(i, i, 1, b, int(i == crowd_index)) for i, b in enumerate(bboxes)]
    if repeat_image:
        anns[-1]["image_id"] = anns[0]["image_id"]
    return anns, {a["image_id"]: (W, H) for a in anns}


GOOD = [50, 20, 40, 40]


@pytest.mark.parametrize(
    "last, kwargs",
    [
        ([50, 20, 40, 40], {"crowd_index": 2}),
        ([50, 20, 31, 40], {}),
        ([50, 20, 40, 31], {}),
        ([9, 20, 40, 40], {}),
        ([50, 9, 40, 40], {}),
        ([151, 20, 40, 40], {}),
        ([50, 51, 40, 40], {}),
        ([50, 20, 40, 40], {"repeat_image": True}),
    ],
    ids=["crowd", "narrow", "short", "left", "top", "right", "bottom", "same-image"],
)
def test_each_rule_excludes(last, kwargs):
    anns, sizes = _one_category([GOOD, GOOD, last], **kwargs)
    with pytest.raises(ReferenceInputError, match=r"class 1 has 2 usable .* among 3 .* 3 shots"):
        sample_references(anns, sizes, None, shots=3, seed=0)
    refs = sample_references(anns, sizes, None, shots=2, seed=0)
    assert sorted(picked_ids(refs)[1]) == [0, 1]


def test_limits_are_inclusive():
    assert is_valid_reference([10, 10, 32, 32], (52, 52))
    assert not is_valid_reference([10, 10, 32, 32], (51, 52))
    assert not is_valid_reference([10, 10, 32, 32], (52, 52), iscrowd=True)


def test_too_few_raises_unless_repeats_allowed():
    with pytest.raises(ReferenceInputError, match="class 7 has 3 usable"):
        sample_references(ANNOTATIONS, SIZES, [7], shots=4, seed=0)
    refs = sample_references(ANNOTATIONS, SIZES, [7], shots=7, seed=0, allow_repeats=True)
    ids = picked_ids(refs)[7]
    assert ids == ids[:3] * 2 + ids[:1]


def test_bad_inputs_raise():
    with pytest.raises(ReferenceInputError, match="no annotations"):
        sample_references(ANNOTATIONS, SIZES, [7, 42], shots=1, seed=0)
    with pytest.raises(ReferenceInputError, match="at least 1"):
        sample_references(ANNOTATIONS, SIZES, None, shots=0, seed=0)
    with pytest.raises(ReferenceInputError, match="size is unknown"):
        sample_references(ANNOTATIONS, {}, None, shots=1, seed=0)
    only_crowd = [ann(1, 1, 1, GOOD, iscrowd=1)]
    with pytest.raises(ReferenceInputError, match="0 usable"):
        sample_references(only_crowd, {1: (W, H)}, None, shots=1, seed=0, allow_repeats=True)


def test_class_splits():
    few, every = split_classes("few_shot_classes"), split_classes("all_classes")
    assert len(few) == 20 and len(every) == len(set(every)) == 80
    assert set(few) <= set(every) and tuple(few) == FEW_SHOT_CLASSES and tuple(every) == ALL_CLASSES
    with pytest.raises(ReferenceInputError):
        split_classes("novel")
    categories = [{"id": 5, "name": "cat"}, {"id": 2, "name": "dog"}]
    assert class_ids_by_name(categories, ["dog", "cat"]) == [2, 5]
    with pytest.raises(ReferenceInputError, match="horse"):
        class_ids_by_name(categories, ["horse"])


def test_sampling_a_generated_coco_file(tmp_path):
    classes = ["disc", "square", "triangle"]
    path = write_coco_dataset(tmp_path, 30, classes, seed=3, split="train2017", crowd_fraction=0.1)
    coco = json.loads(path.read_text())
    ids = class_ids_by_name(coco["categories"], classes)
    refs = sample_references(coco["annotations"], coco["images"], ids, shots=3, seed=33)
    assert set(refs) == set(ids)
    by_id = {a["id"]: a for a in coco["annotations"]}
    sizes = {i["id"]: (i["width"], i["height"]) for i in coco["images"]}
    for category, choices in refs.items():
        picked = [by_id[c["ann_ids"][0]] for c in choices]
        assert all(a["category_id"] == category for a in picked)
        assert all(
            is_valid_reference(a["bbox"], sizes[a["image_id"]], a["iscrowd"]) for a in picked
        )
        assert len({a["image_id"] for a in picked}) == 3
    again = sample_references(coco["annotations"], coco["images"], ids, shots=3, seed=33)
    other = sample_references(coco["annotations"], coco["images"], ids, shots=3, seed=34)
    assert again == refs and other != refs
