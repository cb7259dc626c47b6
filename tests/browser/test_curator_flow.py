"""The curator's whole flow, clicked in the real App, with the mistakes a curator makes.

The tests run in file order on one dataset (each step needs the previous one's result) and one
page, so the suite loads the App a few times only. Every assertion is on text the page shows.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import fiftyone as fo
import pytest
from fiftyone.operators.delegated import DelegatedOperationService

from ntt_core import NTTConfig
from ntt_operators import api

from .conftest import RUN_TIMEOUT_MS, persistent_dataset

PLUGIN = "@ntt/no_time_to_train"
DATASET = "ntt-browser"
TINY = NTTConfig.tiny(weights="random", device="cpu")

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
    pytest.mark.browser,
]


@pytest.fixture(scope="module")
def dataset(scene_files):
    """The scenes, plus a 'star' instance no reference will be tagged for."""
    dataset = persistent_dataset(DATASET)
    samples = []
    # The first tile (the one tagged in the modal) shows an instance of each class.
    # Four scenes keep the runs short on two CPU cores.
    scenes = sorted(scene_files, key=lambda scene: -len({i.label for i in scene[1]}))[:4]
    for path, instances in scenes:
        detections = [fo.Detection.from_mask(i.mask, label=i.label) for i in instances]
        samples.append(fo.Sample(filepath=path, ground_truth=fo.Detections(detections=detections)))
    star = samples[-1].ground_truth.detections[0].copy()
    star.label = "star"
    samples[-1].ground_truth.detections.append(star)
    dataset.add_samples(samples)
    dataset.compute_metadata()
    yield dataset
    dataset.delete()


@pytest.fixture(scope="module")
def app(curator, dataset):
    curator.open_dataset(DATASET)
    return curator


def test_tag_references_in_the_modal(app, dataset):
    page = app.page
    first = dataset.first()
    classes = {d.label for d in first.ground_truth.detections}
    page.locator("[data-cy=looker]").first.click()  # the first sample's tile: opens the modal
    page.locator("[data-cy=action-tag-sample-labels]").last.click()
    page.locator("[data-cy=tagger-switch-label]").click()
    page.locator("[data-cy=tagger-container] input").fill("reference")
    page.get_by_text(re.compile('^Add "reference" tag to')).click()
    page.get_by_text("Apply", exact=True).click()
    page.locator("[data-cy=tagger-container]").wait_for(state="hidden")
    annotate_tab = page.get_by_text("Annotate", exact=True)  # only the modal has it
    while annotate_tab.is_visible():
        page.mouse.click(8, 890)  # outside the modal: closes it
        page.wait_for_timeout(500)
    dataset.reload()
    tagged = dataset.select_labels(tags="reference").distinct("ground_truth.detections.label")
    assert set(tagged) == classes


def test_build_form_refuses_bad_inputs_before_execute(app):
    app.open_operator("Build memory bank")
    app.fill("Bank name", "")
    app.expect_text("Bank name '' is not valid: use letters, digits and underscores")
    assert not app.execute_enabled()
    app.fill("Bank name", "my bank")
    app.expect_text("Bank name 'my bank' is not valid")
    app.fill("Bank name", "bank")
    app.fill("Reference tag", "refrence")
    app.expect_text("No reference found: no ground_truth label is tagged 'refrence'")
    assert not app.execute_enabled()
    app.fill("Reference tag", "reference")
    app.add_value("Classes", "star")
    app.expect_text("Class(es) ['star'] have no reference tagged 'reference' in 'ground_truth'")
    assert not app.execute_enabled()


def test_build_memory_bank_immediately(app, dataset):
    app.open_operator("Build memory bank")
    app.fill("Bank name", "bank")
    app.choose("Tiny")
    app.choose("Random (tests only)")
    app.fill("Device", "cpu")
    app.execute()
    app.expect_text("Memory bank built", timeout=RUN_TIMEOUT_MS)
    text = app.dialog_text()
    assert "sam2.1_hiera_tiny" in text and "dinov2_vits14 (random weights)" in text
    assert api.list_memory_banks(fresh(dataset)) == ["bank"]


def test_build_form_refuses_an_existing_bank_name(app):
    app.open_operator("Build memory bank")
    app.fill("Bank name", "bank")
    app.expect_text(
        "A memory bank named 'bank' already exists: tick 'Replace a bank of that name' to "
        "replace it, or pick a new name"
    )
    assert not app.execute_enabled()
    app.tick("Replace a bank of that name")
    assert app.execute_enabled()


def test_segment_form_refuses_the_ground_truth_as_output(app):
    app.open_operator("Segment with references")
    app.expect_text("Models: sam2.1_hiera_tiny + dinov2_vits14 (random weights)")
    app.fill("Output field", "ground_truth")
    app.expect_text(
        "Output field 'ground_truth' is a reference (ground-truth) field of the bank: it is never "
        "replaced; pick a new name"
    )
    assert not app.execute_enabled()


def test_segment_immediately(app, dataset):
    app.open_operator("Segment with references")
    app.fill("Output field", "predictions")
    app.execute()
    app.expect_text("Segmentation done", timeout=RUN_TIMEOUT_MS)
    assert api.segment_status(fresh(dataset), "predictions")["status"] == "completed"
    targets = len(
        dataset.match_tags("reference", bool=False).match_labels(tags="reference", bool=False)
    )
    assert api.segment_status(dataset, "predictions")["processed"] == targets


def test_segment_form_refuses_an_existing_field_in_the_forms_words(app):
    app.open_operator("Segment with references")
    app.fill("Output field", "predictions")
    app.expect_text(
        "Field 'predictions' already exists: tick 'Replace the field if it exists' to replace "
        "it, tick 'Update the field in place (keeps your tags)' to update it in place, tick "
        "'Skip samples already done' to continue it, or pick a new name"
    )
    assert not app.execute_enabled()
    app.tick("Replace the field if it exists")
    app.tick("Skip samples already done")
    app.expect_text(
        "'Replace the field if it exists' starts the field afresh, 'Skip samples already done' "
        "continues it and 'Update the field in place (keeps your tags)' updates it in place: "
        "choose one"
    )
    assert not app.execute_enabled()


def test_segment_scheduled_then_run_by_the_queue(app, dataset):
    app.open_operator("Segment with references")
    app.fill("Output field", "scheduled")
    app.schedule()
    app.expect_text("scheduled")
    (done,) = run_the_queue()
    assert done.error is None, done.error
    assert api.segment_status(fresh(dataset), "scheduled")["status"] == "completed"


def test_a_scheduled_run_whose_bank_is_gone_fails_with_one_sentence_on_its_record(app, dataset):
    api.build_memory_bank(dataset, "ground_truth", "doomed", config=TINY)
    app.open_operator("Segment with references")
    app.choose_option("Memory bank", "doomed")
    app.fill("Output field", "never")
    app.schedule()
    app.expect_text("scheduled")
    api.delete_memory_bank(dataset, "doomed")
    (done,) = run_the_queue()
    assert done.error is not None
    (record,) = DelegatedOperationService().list_operations(
        dataset_name=DATASET, run_state="failed"
    )
    # FiftyOne repeats the form's checks before running a scheduled operation: the record's
    # error carries the form's sentence.
    assert (
        f"No memory bank named 'doomed' on dataset '{DATASET}'; existing banks: ['bank']. "
        "Build one with 'Build memory bank'"
    ) in record.result.error
    assert not fresh(dataset).has_sample_field("never")


def test_a_bank_deleted_while_the_form_is_open_is_one_sentence_in_the_app(app, dataset):
    api.build_memory_bank(dataset, "ground_truth", "doomed", config=TINY)
    app.open_operator("Segment with references")
    app.choose_option("Memory bank", "doomed")
    app.fill("Output field", "never")
    api.delete_memory_bank(dataset, "doomed")  # e.g. from a second tab
    app.execute()
    app.expect_text("No memory bank named 'doomed'")
    assert "Traceback" not in app.page.inner_text("body")


def test_evaluate_form_refuses_predictions_equal_to_ground_truth(app):
    app.open_operator("Evaluate segmentations")
    app.choose_option("Predictions", "ground_truth")
    app.expect_text("Predictions and ground truth are the same field ('ground_truth')")
    assert not app.execute_enabled()


def test_evaluate_leaves_out_the_references_and_says_so(app, dataset):
    app.open_operator("Evaluate segmentations")
    app.choose_option("Predictions", "predictions")
    left_out = len(dataset) - len(api.segmented_samples(dataset, "predictions"))
    app.expect_text(f"{left_out} sample(s) tagged 'reference' are left out: not segmented")
    app.expect_text("Include the samples tagged 'reference'")
    app.execute()
    app.expect_text("Evaluation report")
    app.expect_text("mAP (IoU 0.50:0.95)")
    app.expect_text("Instances matched on")
    fresh(dataset)
    assert dataset.match_tags("reference").values("ntt_eval_tp") == [None] * len(
        dataset.match_tags("reference")
    )


def test_evaluate_form_refuses_an_eval_key_in_use(app):
    app.open_operator("Evaluate segmentations")
    app.choose_option("Predictions", "predictions")
    app.expect_text(
        "Evaluation key 'ntt_eval' is in use: tick 'Replace an evaluation of that key' to "
        "replace that evaluation, or pick a new key"
    )
    assert not app.execute_enabled()


def test_load_evaluation_patches(app, dataset):
    app.open_operator("Load evaluation patches")
    app.execute()
    fresh(dataset)
    tp_fp_fn = sum(dataset.sum(f"ntt_eval_{kind}") for kind in ("tp", "fp", "fn"))
    app.expect_text(f"{tp_fp_fn:,} patches")


def test_bank_info_names_both_models(app):
    app.open_operator("Get memory bank info")
    app.execute()
    # The form is titled like the result: wait for a row only the result has.
    app.expect_text("SAM2 model (proposals)")
    text = app.dialog_text()
    assert "sam2.1_hiera_tiny" in text and "dinov2_vits14 (random weights)" in text


def test_corrupt_bank_is_one_sentence_not_a_traceback(app, dataset):
    api.build_memory_bank(dataset, "ground_truth", "corrupt", config=TINY)
    results = dataset.load_run_results("corrupt", cache=False)
    results.bank = b"not a bank"
    dataset.save_run_results("corrupt", results, overwrite=True)
    app.open_operator("Get memory bank info")
    app.choose_option("Memory bank", "corrupt")
    app.execute()
    app.expect_text("Get memory bank info failed")
    app.expect_text("Memory bank 'corrupt': ")
    assert "Traceback" not in app.page.inner_text("body")


def test_delete_asks_for_confirmation_and_says_what_it_removed(app, dataset):
    app.open_operator("Delete memory bank")
    app.choose_option("Memory bank", "bank")
    assert not app.execute_enabled()
    app.tick("Yes, delete this memory bank")
    app.execute()
    app.expect_text("Memory bank deleted")
    app.expect_text("references of disc, square")
    assert "bank" not in api.list_memory_banks(fresh(dataset))


@pytest.mark.parametrize(
    "operator", ["Get memory bank info", "Delete memory bank", "Segment with references"]
)
def test_no_bank_yet_offers_no_execute(app, dataset, operator):
    for name in api.list_memory_banks(fresh(dataset)):
        dataset.delete_run(name)
    app.open_operator(operator)
    app.expect_text("No memory bank yet")
    app.expect_text("Tag references and run 'Build memory bank' first")
    assert not app.execute_enabled()


def run_the_queue() -> list:
    """What ``fiftyone delegated launch`` does, once: runs the queued operations.

    In a worker thread: Playwright's sync API keeps an event loop in this one.
    """
    with ThreadPoolExecutor(1) as worker:
        return worker.submit(
            DelegatedOperationService().execute_queued_operations, dataset_name=DATASET
        ).result()


def fresh(dataset: fo.Dataset) -> fo.Dataset:
    """The dataset as the App server left it (it is written by another process)."""
    dataset.reload()
    return dataset
