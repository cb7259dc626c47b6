"""What the App shows when something is refused or fails, and what an update will change.

Form-level refusals disable Execute (and Schedule) before anything runs; a run that fails keeps
its sentence in the result dialog, not only in a notification that fades; the Update form
lists, per field and class, what Execute will change, so a tag that landed in an unexpected
field is seen before it counts. The tests run in file order on one dataset and one page.
"""

from __future__ import annotations

import fiftyone as fo
import pytest

from ntt_core import NTTConfig
from ntt_operators import api

from .conftest import RUN_TIMEOUT_MS, persistent_dataset

DATASET = "ntt-browser-outcomes"
UNLABELLED = "ntt-browser-unlabelled"
OTHER_FIELD = "detector"
"""A second Detections field, where a tag may land without the curator meaning it."""
TINY = NTTConfig.tiny(weights="random", device="cpu")

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
    pytest.mark.browser,
]


@pytest.fixture(scope="module")
def dataset(scene_files):
    """Three scenes with ground truth and a copy of it as another field; a bank built."""
    dataset = persistent_dataset(DATASET)
    samples = []
    for path, instances in scene_files[:3]:
        detections = [fo.Detection.from_mask(i.mask, label=i.label) for i in instances]
        samples.append(
            fo.Sample(
                filepath=path,
                ground_truth=fo.Detections(detections=detections),
                **{OTHER_FIELD: fo.Detections(detections=[d.copy() for d in detections])},
            )
        )
    dataset.add_samples(samples)
    dataset.compute_metadata()
    api.sample_references(dataset, "ground_truth", shots=1, seed=33)
    api.build_memory_bank(dataset, "ground_truth", "bank", config=TINY)
    yield dataset
    dataset.delete()


@pytest.fixture(scope="module")
def unlabelled(scene_files):
    dataset = persistent_dataset(UNLABELLED)
    dataset.add_samples(fo.Sample(filepath=path) for path, _ in scene_files[:2])
    yield dataset
    dataset.delete()


@pytest.fixture(scope="module")
def app(curator, dataset):
    curator.open_dataset(DATASET)
    return curator


def test_build_on_a_dataset_without_detections_offers_no_execute(app, unlabelled):
    app.page.goto(f"{app.url}/datasets/{UNLABELLED}", wait_until="load")
    app.page.locator("[data-cy=looker]").first.wait_for()
    app.open_operator("Build memory bank")
    app.expect_text("No label field to take references from yet")
    app.expect_text("Annotate tab")
    assert not app.execute_enabled()
    app.close_dialogs()
    app.open_dataset(DATASET)


def test_segment_refuses_a_field_name_fiftyone_refuses(app, dataset):
    app.open_operator("Segment with references")
    app.fill("Output field", "_predictions")
    app.expect_text("Field names cannot start with '_'")
    assert not app.execute_enabled()
    assert api.segment_status(dataset, "_predictions") is None


def test_segment_refuses_a_device_this_machine_lacks(app):
    app.open_operator("Segment with references")
    app.fill("Output field", "predictions")
    app.fill("Device", "cuda:7")
    app.expect_text("Device 'cuda:7'")
    assert not app.execute_enabled()


def test_a_failed_run_keeps_its_sentence_in_the_result_dialog(app, dataset):
    api.build_memory_bank(dataset, "ground_truth", "corrupt", config=TINY)
    results = dataset.load_run_results("corrupt", cache=False)
    results.bank = b"not a bank"
    dataset.save_run_results("corrupt", results, overwrite=True)
    app.open_operator("Segment with references")
    app.choose_option("Memory bank", "corrupt")
    app.fill("Output field", "never")
    app.execute()
    app.expect_text("Segment with references failed", timeout=RUN_TIMEOUT_MS)
    app.page.wait_for_timeout(8000)  # long enough for the notification to fade
    text = app.dialog_text()
    assert "Memory bank 'corrupt': " in text and "build a bank of that name again" in text, text
    assert "Traceback" not in app.page.inner_text("body")
    dataset.delete_run("corrupt")


def test_the_update_form_previews_a_tag_in_an_unexpected_field(app, dataset):
    first, *_, last = dataset.values(f"{OTHER_FIELD}.detections.id", unwind=True)
    # As FiftyOne's modal tagger does: a tag lands on the labels of every visible field.
    dataset.select_labels(ids=[first]).tag_labels("reference", label_fields=OTHER_FIELD)
    dataset.select_labels(ids=[last]).tag_labels("negative", label_fields=OTHER_FIELD)
    (negative_class,) = dataset.select_labels(ids=[last], fields=OTHER_FIELD).values(
        f"{OTHER_FIELD}.detections.label", unwind=True
    )

    app.open_operator("Update memory bank")
    app.expect_text("Execute will change")
    app.settle()  # the App validates the form's defaults after showing it
    text = app.dialog_text()
    assert OTHER_FIELD in text and negative_class in text and "+1" in text, text
    assert f"1 in '{OTHER_FIELD}'" in text, text  # the stray reference: shown, not taken
    assert app.execute_enabled()
    app.execute()
    app.expect_text("Memory bank updated", timeout=RUN_TIMEOUT_MS)
    dataset.reload()
    info = api.memory_bank_info(dataset, "bank")
    assert info["ref_fields"] == ["ground_truth"] and info["num_negatives"] == 1


def test_an_update_with_nothing_new_says_so_and_touches_nothing(app, dataset):
    before = dataset.get_run_info("bank").timestamp
    app.open_operator("Update memory bank")
    app.expect_text("Nothing changed")
    app.execute()
    app.expect_text("Memory bank updated", timeout=RUN_TIMEOUT_MS)
    assert "Nothing changed" in app.dialog_text()
    dataset.reload()
    assert dataset.get_run_info("bank").timestamp == before
