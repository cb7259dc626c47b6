"""One correction round clicked in the real App, on a dataset that started with no labels.

Set up through the API to save time (the clicks for these steps are in
``test_curator_flow.py``): boxes written exactly as the App's Annotate tab writes them, a bank
built from them, a first segmentation that caches its proposals, and an evaluation on boxes. Then,
in the App: a false positive tagged ``negative`` in the evaluation patches view, "Update memory
bank", and "Segment with references" re-using the cached proposals and updating the field in
place. The tests run in file order on one dataset and one page.
"""

from __future__ import annotations

import re

import fiftyone as fo
import pytest

from ntt_core import NTTConfig
from ntt_operators import api

from .conftest import RUN_TIMEOUT_MS, persistent_dataset

DATASET = "ntt-browser-loop"
PREDICTIONS = "ntt_predictions"
CLASS = "square"
"""One class only, as in ``tests/test_corrections.py``: a negative changes scores, never a class."""
BOXED_SAMPLES = 2
TINY = NTTConfig.tiny(weights="random", device="cpu")

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
    pytest.mark.browser,
]


@pytest.fixture(scope="module")
def dataset(scene_files):
    """No label field but ``boxes``: every square of two samples, as the Annotate tab draws it."""
    dataset = persistent_dataset(DATASET)
    dataset.add_samples(fo.Sample(filepath=path) for path, _ in scene_files)
    dataset.compute_metadata()
    dataset.add_sample_field("boxes", fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections)
    boxed = 0
    for sample, (_, instances) in zip(dataset, scene_files):
        squares = [i for i in instances if i.label == CLASS]
        if not squares or boxed == BOXED_SAMPLES:
            continue
        height, width = squares[0].mask.shape
        sample["boxes"] = fo.Detections(
            detections=[
                fo.Detection(
                    label=CLASS, bounding_box=relative(i, height, width), tags=["reference"]
                )
                for i in squares
            ]
        )
        sample.save()
        boxed += 1
    api.build_memory_bank(dataset, "boxes", "bank", config=TINY)
    api.segment(dataset, "bank", PREDICTIONS, reuse_proposals=True)
    api.evaluate(dataset, PREDICTIONS, "boxes", "ntt_eval")
    yield dataset
    dataset.delete()


def relative(instance, height: int, width: int) -> list[float]:
    x, y, w, h = instance.box_xywh
    return [x / width, y / height, w / width, h / height]


@pytest.fixture(scope="module")
def app(curator, dataset):
    curator.open_dataset(DATASET, field="boxes")
    return curator


@pytest.fixture(scope="module")
def round_state() -> dict:
    """What one step leaves for the next (the tagged prediction and its first score)."""
    return {}


def test_tag_a_false_positive_negative_in_the_evaluation_patches(app, dataset, round_state):
    app.open_operator("Load evaluation patches")
    app.choose("FP")
    app.execute()
    false_positives = dataset.sum("ntt_eval_fp")
    app.expect_text(f"{false_positives:,} patches")
    page = app.page
    page.locator("[data-cy=looker]").first.click()  # the first patch: opens the modal
    page.locator("[data-cy=action-tag-sample-labels]").last.click()
    page.locator("[data-cy=tagger-switch-label]").click()
    page.locator("[data-cy=tagger-container] input").fill("negative")
    page.get_by_text(re.compile('^Add "negative" tag to')).click()
    page.get_by_text("Apply", exact=True).click()
    page.locator("[data-cy=tagger-container]").wait_for(state="hidden")
    annotate_tab = page.get_by_text("Annotate", exact=True)  # only the modal has it
    while annotate_tab.is_visible():
        page.mouse.click(8, 890)  # outside the modal: closes it
        page.wait_for_timeout(500)
    # The patches view wrote the tag through to the prediction in the dataset.
    dataset.reload()
    (tagged,) = dataset.filter_labels(PREDICTIONS, fo.ViewField("tags").contains("negative"))
    (negative,) = [d for d in tagged[PREDICTIONS].detections if "negative" in d.tags]
    assert negative.ntt_eval == "fp"
    round_state.update(
        id=negative.id,
        confidence=negative.confidence,
        images_with_false_positives=len(dataset.match(fo.ViewField("ntt_eval_fp") > 0)),
    )


def test_update_memory_bank_adds_the_negative(app, dataset, round_state):
    app.open_operator("Update memory bank")
    app.expect_text("labels tagged 'negative' in any field")
    app.execute()
    app.expect_text("Memory bank updated", timeout=RUN_TIMEOUT_MS)
    text = app.dialog_text()
    assert re.search(r"Entries added:\s+1\b", text), text
    assert re.search(r"Negatives:\s+1\b", text), text
    dataset.reload()  # written by the App server
    bank = api.load_memory_bank(dataset, "bank")
    assert [entry.split(":")[1] for entry in bank.negative_ids] == [round_state["id"]]


def test_segment_in_place_from_cached_proposals_keeps_the_tag(app, dataset, round_state):
    # Still in the evaluation patches view: the targets are the images the patches come from.
    app.open_operator("Segment with references")
    app.fill("Output field", PREDICTIONS)
    app.tick("Update the field in place (keeps your tags)")
    app.tick("Re-use cached proposals")
    assert app.execute_enabled()
    app.execute()
    app.expect_text("Segmentation done", timeout=RUN_TIMEOUT_MS)
    text = app.dialog_text()
    assert re.search(r"Samples failed:\s+0\b", text), text
    segmented = round_state["images_with_false_positives"]
    assert re.search(rf"Samples segmented:\s+{segmented}\b", text), text
    # The evaluation was made on the old scores: deleted, and the dialog says so.
    assert re.search(r"Evaluations deleted \(made on the old field\):\s+ntt_eval\b", text), text
    # The patches view was built on that evaluation: the App went back to the view the patches
    # were made from (the evaluated samples: all but the boxed references) instead of an error.
    app.close_dialogs()
    app.expect_text(f"{len(dataset) - BOXED_SAMPLES} samples")
    dataset.reload()
    assert "ntt_eval" not in dataset.list_evaluations()
    (rescored,) = [
        d
        for dets in dataset.values(PREDICTIONS)
        for d in (dets.detections if dets else [])
        if d.id == round_state["id"]
    ]
    assert rescored.tags == ["negative"]
    # One class: the negative can only decay the score (by exp(-max(0, neg - pos) / sigma),
    # pinned by hand in tests/test_corrections.py), never raise it.
    assert rescored.confidence <= round_state["confidence"]
    assert api.memory_bank_info(dataset, "bank")["num_negatives"] == 1
