"""What the App user reads: refusals in the forms' words, failures as one sentence, progress.

The browser suite (``tests/browser``) checks the same on the rendered page; these check the
operator side through FiftyOne's executor, quickly.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import fiftyone.operators as foo
import fiftyone.operators.types as types
import pytest
import torch
from fiftyone.operators.delegated import DelegatedOperationService
from fiftyone.operators.executor import ExecutionError

from ntt_core import NTTConfig, NTTError
from ntt_core.errors import BankError
from ntt_operators import api, forms, messages

PLUGIN = "@ntt/no_time_to_train"
TINY = NTTConfig.tiny(weights="random", device="cpu")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


@pytest.fixture
def banked(scene_dataset):
    api.sample_references(scene_dataset, "ground_truth", shots=1, seed=33)
    api.build_memory_bank(scene_dataset, "ground_truth", "bank", config=TINY)
    return scene_dataset


def execute(name, dataset, delegated=False, **params):
    return foo.execute_operator(
        f"{PLUGIN}/{name}",
        ctx={"dataset": dataset, "params": params},
        request_delegation=delegated,
    )


def test_refusals_name_the_forms_options_in_the_app_and_the_api_options_in_python(banked):
    api.segment(banked.limit(1), "bank", "pred", exclude_tag=None)
    with pytest.raises(api.PluginInputError, match="set overwrite=True to replace it"):
        api.segment(banked, "bank", "pred")
    # The form refuses the same inputs before Execute, in its own words.
    with pytest.raises(ExecutionError) as refused:
        execute("segment_with_references", banked, bank_name="bank", label_field="pred")
    assert (
        "Field 'pred' already exists: tick 'Replace the field if it exists' to replace it, "
        "tick 'Update the field in place (keeps your tags)' to update it in place, "
        "tick 'Skip samples already done' to continue it, or pick a new name"
    ) in str(refused.value)
    assert "overwrite=True" not in str(refused.value)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"bank_name": ""}, "Bank name '' is not valid"),
        ({"bank_name": "bank"}, "tick 'Replace a bank of that name' to replace it"),
        ({"ref_tag": "nothing"}, "No reference found: no ground_truth label is tagged 'nothing'"),
        ({"classes": ["triangle"]}, "Class(es) ['triangle'] have no reference tagged"),
    ],
)
def test_build_form_refuses_before_execute(banked, params, message):
    params = {"gt_field": "ground_truth", "bank_name": "b2", **params}
    with pytest.raises(ExecutionError) as refused:
        execute("build_memory_bank", banked, **params)
    assert message in str(refused.value)
    assert api.list_memory_banks(banked) == ["bank"]


def test_no_bank_yet_cannot_be_executed(scene_dataset):
    for name in ("get_memory_bank_info", "delete_memory_bank", "segment_with_references"):
        with pytest.raises(ExecutionError, match="Path: no_bank"):
            execute(name, scene_dataset, bank_name="bank", confirm=True)


def test_delete_needs_the_confirmation(banked):
    with pytest.raises(ExecutionError, match="Tick to confirm the deletion"):
        execute("delete_memory_bank", banked, bank_name="bank")
    assert api.list_memory_banks(banked) == ["bank"]


def test_evaluate_form_refuses_the_ground_truth_as_predictions_and_a_key_in_use(banked):
    with pytest.raises(ExecutionError, match="Predictions and ground truth are the same field"):
        execute(
            "evaluate_segmentations", banked, pred_field="ground_truth", gt_field="ground_truth"
        )
    api.segment(banked, "bank", "pred")
    api.evaluate(banked, "pred", "ground_truth", "ntt_eval")
    with pytest.raises(ExecutionError) as refused:
        execute("evaluate_segmentations", banked, pred_field="pred", gt_field="ground_truth")
    assert "tick 'Replace an evaluation of that key' to replace that evaluation" in str(
        refused.value
    )


def test_a_run_time_failure_is_one_sentence_in_the_app_and_on_the_delegated_record(banked):
    results = banked.load_run_results("bank", cache=False)
    results.bank = b"not a bank"
    banked.save_run_results("bank", results, overwrite=True)

    # Immediate (what the App does): the failure is the result, shown by resolve_output.
    shown = execute("get_memory_bank_info", banked, bank_name="bank")
    assert shown.result["error"].startswith("Memory bank 'bank': ")
    sent = [(r.operator_uri, r.params) for r in shown.executor._requests]
    assert sent == [("notify", {"message": "Get memory bank info failed: " + shown.result["error"],
                                "variant": "error"})]  # fmt: skip
    # A generator operator streams the sentence instead of dying silently.
    streamed = execute("segment_with_references", banked, bank_name="bank", label_field="pred")
    names = [r.operator_uri for r in streamed.executor._requests]
    assert names[-2:] == ["notify", "show_output"]
    dialog = streamed.executor._requests[-1].params
    assert dialog["results"]["error"].startswith("Memory bank 'bank': ")
    # The dialog itself shows the sentence (the App renders an Error view's description, not
    # its value), not only the notification that fades.
    assert dialog["results"]["error"] in json.dumps(dialog["outputs"])
    after_info = SimpleNamespace(results=shown.result)  # what resolve_output receives
    info_dialog = forms.outputs_or_failure(after_info, "Get memory bank info", types.Object)
    assert shown.result["error"] in json.dumps(info_dialog.to_json())
    assert not banked.has_sample_field("pred")

    # Scheduled: the run fails, and its record says why in the same sentence.
    assert execute(
        "segment_with_references", banked, True, bank_name="bank", label_field="p"
    ).delegated
    (done,) = DelegatedOperationService().execute_queued_operations(dataset_name=banked.name)
    assert done.error is not None
    (record,) = DelegatedOperationService().list_operations(dataset_name=banked.name)
    assert record.run_state == "failed"
    assert record.status.label.startswith("Segment with references failed: Memory bank 'bank': ")


def test_sentences_for_unexpected_failures_have_no_traceback():
    assert messages.sentence(KeyError("bank_name")) == (
        "Unexpected error (KeyError: 'bank_name'); the server log has the details"
    )
    assert messages.sentence(torch.OutOfMemoryError("CUDA out of memory. Tried...")).startswith(
        "Out of memory:"
    )
    assert messages.sentence(BankError("x\ny")) == "x y"
    assert messages.in_form_words(
        "set overwrite=True or overwrite=True", {"overwrite": "Replace"}
    ) == ("tick 'Replace' or 'Replace'")


def test_model_loading_reports_what_it_loads(scene_dataset):
    api.sample_references(scene_dataset, "ground_truth", shots=1, seed=33)
    labels = [
        label
        for _, label in api.iter_build_memory_bank(
            scene_dataset, "ground_truth", "bank", config=TINY
        )
    ]
    loading = labels[labels.index("Loading models") + 1 :][:2]
    assert loading == [
        "Loading SAM2 sam2.1_hiera_tiny (random weights)",
        "Loading DINOv2 dinov2_vits14 (random weights)",
    ]


# -- refusals the forms know before Execute (Execute and Schedule disabled) --------------------


def refused_in_form(name, dataset_or_view, **params) -> str:
    """The reason FiftyOne's validation gives for refusing the form's inputs (never empty)."""
    with pytest.raises(ExecutionError) as refused:
        foo.execute_operator(
            f"{PLUGIN}/{name}", ctx={"view": dataset_or_view.view(), "params": params}
        )
    message = str(refused.value)
    assert "Validation error" in message, message
    reason = message.split("Reason: ", 1)[1]
    assert reason.strip() and reason != "None", message
    return message


def test_build_on_a_dataset_without_detections_is_refused_in_the_form(scene_files):
    import fiftyone as fo

    dataset = fo.Dataset()
    dataset.add_sample(fo.Sample(filepath=scene_files[0][0]))
    try:
        message = refused_in_form("build_memory_bank", dataset, bank_name="b")
        assert "Path: no_field" in message and "Annotate tab" in message
    finally:
        dataset.delete()


def test_segment_without_a_bank_says_why(scene_dataset):
    message = refused_in_form("segment_with_references", scene_dataset, label_field="p")
    assert "No memory bank yet: Tag references and run 'Build memory bank' first" in message


def _segment(**params) -> dict:
    return {"bank_name": "bank", "label_field": "pred", **params}


@pytest.mark.parametrize(
    "params, path, message",
    [
        (_segment(label_field="_pred"), "label_field", "Field names cannot start with '_'"),
        (_segment(device="cuda:7"), "device", "Device 'cuda:7'"),
        (_segment(device="tpu"), "device", "device 'tpu'"),
        (_segment(backend="ray", reuse_proposals=True), "backend", ""),
    ],
)
def test_segment_form_refuses_what_the_run_would(banked, params, path, message):
    refused = refused_in_form("segment_with_references", banked, **params)
    assert f"Path: {path}" in refused and message in refused
    assert not banked.has_sample_field(params["label_field"])
    assert api.segment_status(banked, params["label_field"]) is None


def test_segment_form_refuses_targets_that_are_all_references(banked):
    refused = refused_in_form(
        "segment_with_references", banked.match_tags("reference"), **_segment()
    )
    assert "Path: exclude_tag" in refused and "once samples tagged 'reference' are left" in refused


def test_build_form_refuses_a_label_tagged_both_ways_and_a_reference_without_class(banked):
    gt = "ground_truth"
    tagged = banked.select_labels(tags="reference", fields=gt)
    first = tagged.values(f"{gt}.detections.id", unwind=True)[0]
    banked.select_labels(ids=[first]).tag_labels("negative", label_fields=gt)
    params = {"gt_field": gt, "bank_name": "b2"}
    assert "tagged both 'reference' and 'negative'" in refused_in_form(
        "build_memory_bank", banked, **params
    )
    # The same refusal before an update can run.
    assert "tagged both" in refused_in_form("update_memory_bank", banked, bank_name="bank")
    banked.select_labels(ids=[first]).untag_labels("negative")

    # The only reference has no class: said so, not "No reference found".
    banked.untag_labels("reference")
    sample = banked.first()
    detection = sample[gt].detections[0]
    detection.label, detection.tags = None, ["reference"]
    sample.save()
    refused = refused_in_form("build_memory_bank", banked, **params)
    assert "has no class" in refused and "No reference found" not in refused
    with pytest.raises(NTTError, match="has no class"):
        api.build_memory_bank(banked, gt, "b3", config=TINY)


def test_sample_references_form_refuses_a_class_absent_and_no_tagging(banked):
    params = {"gt_field": "ground_truth", "replace_tags": True}
    assert "['star']" in refused_in_form("sample_references", banked, classes=["star"], **params)
    assert "samples, their labels, or both" in refused_in_form(
        "sample_references", banked, tag_samples=False, tag_labels=False, **params
    )
