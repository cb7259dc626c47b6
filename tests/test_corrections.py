"""Labelling a dataset with no labels and correcting the model from the grid (issue 12).

Boxes drawn as the App's Annotate tab writes them, negatives tagged on predictions, accepted
predictions, the incremental bank, in-place re-scoring from cached proposals, and the refusals
that keep a curator's work safe. Real embedded database, random-weight tiny models on the CPU.
"""

from __future__ import annotations

import contextlib
import math

import fiftyone as fo
import fiftyone.operators as foo
import numpy as np
import pytest
import torch
from fiftyone.operators.delegated import DelegatedOperationService
from fiftyone.operators.executor import ExecutionContext, Executor
from fiftyone.operators.registry import OperatorRegistry

from ntt_core import NTTConfig, NTTError
from ntt_core.cache import file_checksum, proposal_identity, proposals_from_bytes
from ntt_core.coco import json_ready_rle
from ntt_operators import api, forms
from ntt_operators.cli import main as ntt_main
from ntt_operators.labels import FieldWriter, ScoreEdit, prediction_ids
from ntt_operators.proposal_cache import ProposalCache

TINY = NTTConfig.tiny(weights="random", device="cpu")
TINY_PARAMS = {"preset": "tiny", "weights": "random", "device": "cpu"}
PLUGIN = "@ntt/no_time_to_train"
PREDICTIONS = "ntt_predictions"
CLASS = "square"
"""The one class drawn; with the random-weight encoder, discs look unlike every proposal."""

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def run(name: str, dataset_or_view, delegated: bool = False, **params):
    result = foo.execute_operator(
        f"{PLUGIN}/{name}",
        ctx={"view": dataset_or_view.view(), "params": params},
        request_delegation=delegated,
    )
    if not delegated:
        return result.result
    (done,) = DelegatedOperationService().execute_queued_operations(operator=f"{PLUGIN}/{name}")
    assert done.error is None, done.error
    return done.result


@contextlib.contextmanager
def network_calls():
    """Counts every forward call of every torch module (SAM2, DINOv2 and their parts)."""
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, output: calls.append(type(module).__name__)
    )
    try:
        yield calls
    finally:
        handle.remove()


def draw_boxes_as_the_annotate_tab(dataset: fo.Dataset, field: str, boxes: dict) -> None:
    """What the App's Annotate tab leaves: a new Detections field recorded in the label schemas,
    and per box a Detection with ``label``, ``bounding_box`` and ``tags`` only."""
    dataset.add_sample_field(field, fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections)
    with contextlib.suppress(Exception):  # the schema only drives the App's annotation UI
        dataset.update_label_schema(field, dataset.generate_label_schemas(field))
    for sample_id, drawn in boxes.items():
        sample = dataset[sample_id]
        sample[field] = fo.Detections(
            detections=[
                fo.Detection(label=label, bounding_box=box, tags=["reference"])
                for label, box in drawn
            ]
        )
        sample.save()


def relative_box(instance, height: int, width: int) -> list[float]:
    x, y, w, h = instance.box_xywh
    return [x / width, y / height, w / width, h / height]


@pytest.fixture
def unlabelled(scene_files):
    """The generated scenes with no label field at all."""
    dataset = fo.Dataset()
    dataset.add_samples(fo.Sample(filepath=path) for path, _ in scene_files)
    dataset.compute_metadata()
    yield dataset
    dataset.delete()


@pytest.fixture
def boxed(unlabelled, scene_files):
    """Two samples with every square boxed in a new ``boxes`` field, tagged ``reference``."""
    drawn = {}
    for sample_id, (_, instances) in zip(unlabelled.values("id"), scene_files):
        chosen = [i for i in instances if i.label == CLASS]
        if chosen and len(drawn) < 2:
            h, w = chosen[0].mask.shape
            drawn[sample_id] = [(CLASS, relative_box(i, h, w)) for i in chosen]
    assert len(drawn) == 2
    draw_boxes_as_the_annotate_tab(unlabelled, "boxes", drawn)
    return unlabelled


def cached_feature(dataset: fo.Dataset, sample_id: str, label_id: str) -> torch.Tensor:
    """The cached proposal feature behind a prediction (its id derives from the mask)."""
    filepath = dataset[sample_id].filepath
    blob = ProposalCache(dataset, TINY).get(sample_id)
    proposals = proposals_from_bytes(blob, file_checksum(filepath), proposal_identity(TINY))
    rles = [json_ready_rle(rle) for rle in proposals.rles]
    ids = [str(i) for i in prediction_ids(f"{PREDICTIONS}:{sample_id}", rles)]
    return proposals.features[ids.index(label_id)]


def predictions(dataset: fo.Dataset) -> dict[str, tuple]:
    rows = {}
    for dets in dataset.values(PREDICTIONS):
        for d in dets.detections if dets else []:
            rows[d.id] = (d.label, d.confidence, tuple(d.tags))
    return rows


# -- the whole loop -----------------------------------------------------------------------------


def test_from_no_labels_to_a_corrected_model(boxed):
    dataset = boxed
    assert api.detection_fields(dataset) == ["boxes"]

    # Boxes drawn in the App -> bank (SAM2 makes each mask from its box).
    api.build_memory_bank(dataset, "boxes", "bank", config=TINY)
    info = api.memory_bank_info(dataset, "bank")
    assert info["masks_from_boxes"] == info["num_references"] > 0

    # Segment once, caching the proposals.
    first = api.segment(dataset, "bank", PREDICTIONS, reuse_proposals=True)
    assert first["models_loaded"] and first["failed"] == {} and first["instances"] > 0
    before = predictions(dataset)

    # The curator tags one false positive 'negative' in the patches view.
    sample_id, dets = next(
        (s, d) for s, d in zip(*dataset.values(["id", PREDICTIONS])) if d and d.detections
    )
    false_positive = dets.detections[0]
    patches = dataset.to_patches(PREDICTIONS)
    patches.select_labels(ids=[false_positive.id]).tag_labels("negative")
    assert predictions(dataset)[false_positive.id][2] == ("negative",)  # reached the dataset

    with network_calls() as calls:
        updated = api.update_memory_bank(dataset, "bank")
    # Only the new negative is encoded, by DINOv2; its predicted mask is used as is (no SAM2).
    assert "DINOv2Encoder" in calls
    assert not {"ImageEncoder", "PromptEncoder", "MaskDecoder"} & set(calls)
    assert updated["added"] == [f"{sample_id}:{false_positive.id}"] and updated["encoded"] == 1
    bank = api.load_memory_bank(dataset, "bank")
    assert bank.negative_ids == updated["added"]

    # Re-score in place from the cache: no network runs on any target.
    with network_calls() as calls:
        round_two = api.segment(dataset, "bank", PREDICTIONS, reuse_proposals=True, rescore=True)
    assert calls == [] and not round_two["models_loaded"]
    assert round_two["written"] + round_two["unchanged"] == round_two["processed"]

    # The tagged prediction keeps its id and tag, and its score is the formula's value.
    f = cached_feature(dataset, sample_id, false_positive.id)
    pos = max(0.0, float(f @ bank.prototypes[0]))
    neg = max(0.0, float(f @ torch.nn.functional.normalize(bank.negative_features[0], dim=0)))
    decay = math.exp(-max(0.0, neg - pos) / TINY.negative_sigma)
    # One class only, so the class cannot change; the overlap decay's factor (old / pos) is
    # unchanged because it depends on masks and features, not on scores.
    expected = false_positive.confidence * decay
    label, confidence, tags = predictions(dataset)[false_positive.id]
    assert (label, tags) == (CLASS, ("negative",))
    assert confidence == pytest.approx(expected, rel=1e-5)
    assert confidence < false_positive.confidence
    # Without a negative nearby, other predictions would keep their score; all kept their ids.
    assert set(predictions(dataset)) == set(before)

    # The curator accepts one prediction of another sample as a reference.
    accepted = next(
        d
        for s, dets in zip(*dataset.values(["id", PREDICTIONS]))
        if s != sample_id and dets
        for d in dets.detections
    )
    dataset.select_labels(ids=[accepted.id]).tag_labels("reference", label_fields=PREDICTIONS)
    updated = api.update_memory_bank(dataset, "bank", add_fields=[PREDICTIONS])
    assert any(ref_id.endswith(accepted.id) for ref_id in updated["added"])
    assert api.memory_bank_info(dataset, "bank")["ref_fields"] == ["boxes", PREDICTIONS]

    with network_calls() as calls:
        round_three = api.segment(dataset, "bank", PREDICTIONS, reuse_proposals=True, rescore=True)
    assert calls == [] and not round_three["models_loaded"]
    # The accepted prediction's sample is a reference now: left as it was, tag included.
    assert predictions(dataset)[accepted.id][2] == ("reference",)

    # Evaluate against the drawn boxes: no masks there, so on boxes, and said so.
    results = api.evaluate(dataset, PREDICTIONS, "boxes", "round_three")
    report = api.class_report(results)
    assert report["iou_on"] == "boxes" and "'boxes'" in report["note"]


# -- the bank -------------------------------------------------------------------------------------


@pytest.fixture
def banked(scene_dataset):
    api.sample_references(scene_dataset, "ground_truth", shots=1, seed=33)
    api.build_memory_bank(scene_dataset, "ground_truth", "bank", config=TINY)
    api.segment(scene_dataset, "bank", PREDICTIONS, reuse_proposals=True)
    return scene_dataset


def _tag(dataset: fo.Dataset, label_ids: list[str], tag: str, field: str) -> None:
    dataset.select_labels(ids=label_ids, fields=field).tag_labels(tag, label_fields=field)


def test_an_update_equals_a_rebuild_and_encodes_only_what_changed(banked):
    dataset = banked
    preds = dataset.values(f"{PREDICTIONS}.detections.id", unwind=True)
    gt_ids = dataset.values("ground_truth.detections.id", unwind=True)
    first_bank = api.load_memory_bank(dataset, "bank")
    old_ref = first_bank.ref_ids[0].split(":")[1]

    _tag(dataset, preds[:2], "negative", PREDICTIONS)
    new_refs = [i for i in gt_ids if not any(r.endswith(i) for r in first_bank.ref_ids)][:2]
    _tag(dataset, new_refs, "reference", "ground_truth")
    dataset.select_labels(ids=[old_ref]).untag_labels("reference")
    summary = api.update_memory_bank(dataset, "bank")
    assert summary["encoded"] == 4 and len(summary["added"]) == 4
    assert summary["removed"] == [first_bank.ref_ids[0]]

    api.build_memory_bank(dataset, "ground_truth", "rebuilt", config=TINY)
    updated = api.load_memory_bank(dataset, "bank")
    rebuilt = api.load_memory_bank(dataset, "rebuilt")
    assert updated.ref_ids == rebuilt.ref_ids and updated.negative_ids == rebuilt.negative_ids
    assert updated.classes == rebuilt.classes
    assert torch.allclose(updated.features, rebuilt.features, atol=1e-5)
    assert torch.allclose(updated.prototypes, rebuilt.prototypes, atol=1e-6)
    assert torch.allclose(updated.negative_features, rebuilt.negative_features, atol=1e-5)
    # Entries kept from the first bank keep their features bit for bit, and their date.
    shared = next(k for k, r in enumerate(updated.ref_ids) if r in first_bank.ref_ids)
    kept = first_bank.ref_ids.index(updated.ref_ids[shared])
    assert torch.equal(updated.features[shared], first_bank.features[kept])
    assert updated.ref_added[shared] == first_bank.ref_added[kept] is not None

    # Nothing changed since: an update encodes nothing and loads no model.
    with network_calls() as calls:
        again = api.update_memory_bank(dataset, "bank")
    assert calls == [] and again["encoded"] == 0 and again["added"] == again["removed"] == []


def test_tags_survive_rescoring_and_a_vanished_negative_stays_in_the_bank(banked):
    dataset = banked
    sample_id = next(s for s, d in zip(*dataset.values(["id", PREDICTIONS])) if d)
    (tagged, *_) = dataset[sample_id][PREDICTIONS].detections
    _tag(dataset, [tagged.id], "negative", PREDICTIONS)
    api.update_memory_bank(dataset, "bank")

    out = api.segment(dataset, "bank", PREDICTIONS, reuse_proposals=True, rescore=True)
    assert out["deleted_evaluations"] == []
    assert predictions(dataset)[tagged.id][2] == ("negative",)
    unchanged = api.segment(dataset, "bank", PREDICTIONS, reuse_proposals=True, rescore=True)
    assert unchanged["written"] == 0 and unchanged["unchanged"] == unchanged["processed"]

    # Re-scoring with fewer detections drops the tagged prediction from the field: the bank
    # keeps the negative rather than silently losing the correction.
    sample = dataset[sample_id]
    sample[PREDICTIONS] = fo.Detections(detections=sample[PREDICTIONS].detections[1:])
    sample.save()
    summary = api.update_memory_bank(dataset, "bank")
    assert summary["kept_vanished"] == [f"{sample_id}:{tagged.id}"] and summary["removed"] == []
    assert api.load_memory_bank(dataset, "bank").negative_ids == [f"{sample_id}:{tagged.id}"]


def _field_rows(dataset: fo.Dataset, field: str) -> list[list[tuple]]:
    """Per sample: (label, confidence, mask bytes, box) of each prediction, in mask order (an
    in-place update keeps the list's order, a full write sorts it by score)."""
    return [
        sorted(
            (
                (d.label, d.confidence, d.mask.tobytes(), tuple(d.bounding_box))
                for d in dets.detections
            ),
            key=lambda row: row[2:],
        )
        if dets
        else []
        for dets in dataset.values(field)
    ]


def _same_predictions(dataset: fo.Dataset, field: str, other: str) -> None:
    for ours, theirs in zip(_field_rows(dataset, field), _field_rows(dataset, other)):
        assert [r[0] for r in ours] == [r[0] for r in theirs]
        assert [r[2:] for r in ours] == [r[2:] for r in theirs]
        assert [r[1] for r in ours] == pytest.approx([r[1] for r in theirs], abs=1e-6)


def test_a_new_negative_rescores_only_the_images_it_can_change(banked):
    dataset = banked
    ids = dataset.values(f"{PREDICTIONS}.detections.id", unwind=True)
    _tag(dataset, ids[:1], "negative", PREDICTIONS)
    api.update_memory_bank(dataset, "bank")
    out = api.segment(dataset, "bank", PREDICTIONS, reuse_proposals=True, rescore=True)
    assert 0 < out["screened_unchanged"] <= out["unchanged"] and out["written"] > 0
    assert out["written"] + out["unchanged"] == out["processed"]
    # The negative only lowers scores: the images it changes keep their masks, so only their
    # labels and confidences are updated.
    assert 0 < out["edited"] <= out["written"]
    # Skipping changed nothing: the field equals a full scoring with the same bank.
    api.segment(dataset, "bank", "full", reuse_proposals=True)
    _same_predictions(dataset, PREDICTIONS, "full")

    # A negative removed changes the bank otherwise: every image is scored again.
    dataset.select_labels(ids=ids[:1]).untag_labels("negative")
    api.update_memory_bank(dataset, "bank")
    out = api.segment(dataset, "bank", PREDICTIONS, reuse_proposals=True, rescore=True)
    assert out["screened_unchanged"] == 0
    api.segment(dataset, "bank", "full", reuse_proposals=True, overwrite=True)
    _same_predictions(dataset, PREDICTIONS, "full")


def test_no_image_is_skipped_after_a_run_that_did_not_stamp_the_cache(banked):
    """A run without the cache writes the field but no stamp: the old stamps are not trusted."""
    dataset = banked
    api.segment(dataset, "bank", PREDICTIONS, reuse_proposals=False, rescore=True)
    ids = dataset.values(f"{PREDICTIONS}.detections.id", unwind=True)
    _tag(dataset, ids[:1], "negative", PREDICTIONS)
    api.update_memory_bank(dataset, "bank")
    out = api.segment(dataset, "bank", PREDICTIONS, reuse_proposals=True, rescore=True)
    assert out["screened_unchanged"] == 0


def test_replacing_a_field_deletes_its_evaluations_and_says_so(banked):
    dataset = banked
    targets = dataset.match_tags("reference", bool=False)
    api.evaluate(targets, PREDICTIONS, "ground_truth", "before")
    assert dataset.has_sample_field("before_tp")
    out = api.segment(dataset, "bank", PREDICTIONS, reuse_proposals=True, overwrite=True)
    assert out["deleted_evaluations"] == ["before"]
    assert dataset.list_evaluations() == []
    assert not dataset.has_sample_field("before_tp")  # its per-sample counts went with it


def test_steps_run_from_evaluation_patches_work_on_the_images_behind_them(banked):
    """The App's target view is the patches view a curator corrects in."""
    dataset = banked
    targets = dataset.match_tags("reference", bool=False)
    api.evaluate(targets, PREDICTIONS, "ground_truth", "ev")
    patches = targets.to_evaluation_patches("ev").match(fo.ViewField("type") == "fp").limit(2)
    images = set(patches.values("sample_id"))
    assert 0 < len(images) < len(targets)
    out = api.segment(patches, "bank", PREDICTIONS, reuse_proposals=True, rescore=True)
    assert out["processed"] == len(images) and out["failed"] == {}
    # The evaluation goes only if the re-score changed a prediction.
    assert out["deleted_evaluations"] == (["ev"] if out["written"] else [])
    api.evaluate(targets, PREDICTIONS, "ground_truth", "ev")
    patches = targets.to_evaluation_patches("ev").limit(3)
    api.evaluate(patches, PREDICTIONS, "ground_truth", "again")
    evaluated = dataset.load_evaluation_view("again")
    assert set(evaluated.values("id")) == set(patches.values("sample_id"))


def test_rescoring_from_evaluation_patches_first_takes_the_app_off_them(banked):
    """Once the evaluation is deleted, the App would show an error page on its patches view."""
    dataset = banked
    targets = dataset.match_tags("reference", bool=False)
    api.evaluate(targets, PREDICTIONS, "ground_truth", "ev")
    patches = targets.to_evaluation_patches("ev").match(fo.ViewField("type") == "fp")

    def app_on(view):
        return ExecutionContext(
            request_params={"dataset_name": dataset.name, "view": view._serialize()},
            executor=Executor(),
        )

    (leave,) = forms.leave_evaluation_patches(app_on(patches), ["ev"])
    assert leave.body.operator_uri == "set_view"
    back = fo.DatasetView._build(dataset, leave.body.params["view"])
    assert back.values("id") == targets.values("id") and not back._is_patches
    (clear,) = forms.leave_evaluation_patches(app_on(dataset.to_evaluation_patches("ev")), ["ev"])
    assert clear.body.operator_uri == "clear_view"
    assert forms.leave_evaluation_patches(app_on(patches), ["other"]) == []
    assert forms.leave_evaluation_patches(app_on(targets), ["ev"]) == []


def test_output_field_with_accepted_references_is_only_updated_in_place(banked):
    dataset = banked
    pred = dataset.values(f"{PREDICTIONS}.detections.id", unwind=True)[0]
    _tag(dataset, [pred], "reference", PREDICTIONS)
    api.update_memory_bank(dataset, "bank", add_fields=[PREDICTIONS])
    with pytest.raises(NTTError, match="reference .ground-truth. field"):
        api.segment(dataset, "bank", PREDICTIONS, overwrite=True)
    api.segment(dataset, "bank", PREDICTIONS, reuse_proposals=True, rescore=True)
    assert predictions(dataset)[pred][2] == ("reference",)


def test_evaluation_of_a_box_only_predictions_field_runs_on_boxes(scene_dataset):
    """Today's crash: 'NoneType' object has no attribute 'shape' inside FiftyOne."""
    scene_dataset.clone_sample_field("ground_truth", "masked")
    for sample in scene_dataset.iter_samples(autosave=True):
        for detection in sample["masked"].detections:
            detection.confidence = 0.9
        sample["detector"] = fo.Detections(
            detections=[
                fo.Detection(label=d.label, bounding_box=d.bounding_box, confidence=0.9)
                for d in sample["ground_truth"].detections
            ]
        )
    report = api.class_report(api.evaluate(scene_dataset, "detector", "ground_truth", "ev"))
    assert report["iou_on"] == "boxes" and "'detector'" in report["note"]
    assert report["mAP"] == pytest.approx(1.0)
    masks = api.class_report(api.evaluate(scene_dataset, "masked", "ground_truth", "m"))
    assert masks["iou_on"] == "masks" and "note" not in masks


# -- refusals ---------------------------------------------------------------------------------


def _snapshot(dataset: fo.Dataset) -> tuple:
    dataset.reload()
    return (dataset.list_runs(), dataset.count_label_tags(), sorted(dataset.get_field_schema()))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: setattr(d, "label", None), "has no class"),
        (lambda d: setattr(d, "bounding_box", [0.1, 0.1, 0.001, 0.001]), "too small to see"),
        (lambda d: d.tags.append("negative"), "tagged both 'reference' and 'negative'"),
    ],
)
def test_unusable_drawn_references_are_refused_with_their_id(boxed, edit, message):
    sample = boxed.exists("boxes").first()
    detection = sample["boxes"].detections[0]
    edit(detection)
    sample.save()
    before = _snapshot(boxed)
    with pytest.raises(NTTError, match=message) as refusal:
        api.build_memory_bank(boxed, "boxes", "bank", config=TINY)
    assert detection.id in str(refusal.value)
    assert _snapshot(boxed) == before


def test_no_label_field_explains_how_to_draw_references(unlabelled):
    with pytest.raises(NTTError, match="Annotate tab"):
        api.build_memory_bank(unlabelled, "boxes", "bank", config=TINY)
    ctx = ExecutionContext(request_params={"dataset_name": unlabelled.name, "params": {}})
    form = OperatorRegistry().get_operator(f"{PLUGIN}/build_memory_bank").resolve_input(ctx)
    fields = form.to_json()["type"]["properties"]
    assert "Annotate tab" in fields["no_field"]["view"]["description"]
    assert "gt_field" not in fields


def test_sample_references_never_silently_erases_hand_placed_tags(scene_dataset):
    by_hand = scene_dataset.values("ground_truth.detections.id", unwind=True)[-1]
    _tag(scene_dataset, [by_hand], "reference", "ground_truth")
    before = _snapshot(scene_dataset)
    with pytest.raises(NTTError, match="did not place") as refusal:
        api.sample_references(scene_dataset, "ground_truth", shots=1)
    assert by_hand in str(refusal.value) and _snapshot(scene_dataset) == before

    # Its own earlier draw is replaced without a question; a hand tag only when asked.
    api.sample_references(scene_dataset, "ground_truth", shots=1, tag="drawn")
    api.sample_references(scene_dataset, "ground_truth", shots=2, tag="drawn")
    api.sample_references(scene_dataset, "ground_truth", shots=1, replace_tags=True)
    tagged = scene_dataset.select_labels(tags="reference").values(
        "ground_truth.detections.id", unwind=True
    )
    assert by_hand not in tagged or len(tagged) == 2


# -- operators and CLI --------------------------------------------------------------------------


@pytest.mark.parametrize("delegated", [False, True])
def test_update_memory_bank_operator(banked, delegated):
    pred = banked.values(f"{PREDICTIONS}.detections.id", unwind=True)[0]
    _tag(banked, [pred], "negative", PREDICTIONS)
    out = run("update_memory_bank", banked, delegated, bank_name="bank")
    if delegated:
        assert out["added"] == 1 and out["negatives"] == 1
    assert api.memory_bank_info(banked, "bank")["num_negatives"] == 1


def test_build_form_takes_accepted_predictions_and_a_negative_tag(banked):
    pred = banked.values(f"{PREDICTIONS}.detections.id", unwind=True)[0]
    _tag(banked, [pred], "reference", PREDICTIONS)
    run(
        "build_memory_bank",
        banked,
        True,
        gt_field="ground_truth",
        accepted_fields=[PREDICTIONS],
        bank_name="with_predictions",
        **TINY_PARAMS,
    )
    info = api.memory_bank_info(banked, "with_predictions")
    assert info["ref_fields"] == ["ground_truth", PREDICTIONS]
    assert info["negative_tag"] == "negative"


def test_cli_update_bank_and_rescore(banked, capsys):
    pred = banked.values(f"{PREDICTIONS}.detections.id", unwind=True)[0]
    _tag(banked, [pred], "negative", PREDICTIONS)
    banked.persistent = True
    common = ["--dataset", banked.name, "--bank", "bank"]
    assert ntt_main(["update-bank", *common]) == 0
    assert "1 added, 0 removed" in capsys.readouterr().out
    code = ntt_main(
        ["segment", *common, "--label-field", PREDICTIONS, "--rescore", "--reuse-proposals"]
    )
    out = capsys.readouterr().out
    assert code == 0 and "No model ran: every target was re-scored from cached proposals." in out
    assert np.isfinite(predictions(banked)[pred][1])


def test_a_score_edit_changes_labels_and_confidences_only():
    mask = np.zeros((4, 5), dtype=bool)
    mask[1:3, 1:4] = True
    kept, relabelled, dropped = (
        fo.Detection(label="a", bounding_box=[0.1, 0.1, 0.5, 0.5], mask=mask, confidence=c)
        for c in (0.9, 0.8, 0.7)
    )
    kept.tags, relabelled.tags = ["reviewed"], ["negative"]
    dataset = fo.Dataset()
    try:
        sample = fo.Sample(filepath="/nowhere.png", pred=fo.Detections(detections=[kept]))
        sample["pred"].detections += [relabelled, dropped]
        dataset.add_sample(sample)
        writer = FieldWriter(dataset, "pred", batch_size=16)
        edit = ScoreEdit({relabelled.id: "b"}, {relabelled.id: 0.25}, removed=[dropped.id])
        writer.add(sample.id, edit)
        writer.flush()

        sample.reload()
        rows = [(d.id, d.label, d.confidence, d.tags) for d in sample.pred.detections]
        assert rows == [(kept.id, "a", 0.9, ["reviewed"]), (relabelled.id, "b", 0.25, ["negative"])]
        assert all(np.array_equal(d.mask, mask) for d in sample.pred.detections)
        assert writer.written == writer.edited == 1
    finally:
        dataset.delete()


def test_pending_changes_previews_an_update_per_field_and_class_without_encoding(banked):
    dataset = banked
    assert api.pending_changes(dataset, "bank")["nothing_changed"]
    first_bank = api.load_memory_bank(dataset, "bank")
    preds = dataset.values(f"{PREDICTIONS}.detections.id", unwind=True)
    gt = dict(
        zip(
            *dataset.values(
                ["ground_truth.detections.id", "ground_truth.detections.label"], unwind=True
            )
        )
    )
    old_ref = first_bank.ref_ids[0].split(":")[1]
    new_ref = next(i for i in gt if not any(r.endswith(i) for r in first_bank.ref_ids))
    _tag(dataset, preds[:2], "negative", PREDICTIONS)
    _tag(dataset, [new_ref], "reference", "ground_truth")
    _tag(dataset, preds[2:3], "reference", PREDICTIONS)  # a field the bank does not read
    dataset.select_labels(ids=[old_ref]).untag_labels("reference")
    negative_classes = {
        dataset.select_labels(ids=[i]).values(f"{PREDICTIONS}.detections.label", unwind=True)[0]
        for i in preds[:2]
    }

    with network_calls() as calls:
        pending = api.pending_changes(dataset, "bank")
    assert calls == []
    assert api.load_memory_bank(dataset, "bank").ref_ids == first_bank.ref_ids
    assert (pending["references_added"], pending["negatives_added"], pending["removed"]) == (
        1,
        2,
        1,
    )
    assert not pending["nothing_changed"] and pending["fields_added"] == []
    assert pending["ignored"] == {PREDICTIONS: 1}
    rows = {(r["field"], r["class"], r["role"], r["change"]): r["count"] for r in pending["rows"]}
    assert rows[("ground_truth", gt[new_ref], "reference", "added")] == 1
    assert rows[("ground_truth", gt[old_ref], "reference", "removed")] == 1
    assert {c for f, c, role, _ in rows if role == "negative"} == negative_classes
    assert sum(n for (f, _, role, _), n in rows.items() if role == "negative") == 2

    # The update does what the preview said; with the field added, the accepted prediction too.
    with_field = api.pending_changes(dataset, "bank", add_fields=[PREDICTIONS])
    assert with_field["fields_added"] == [PREDICTIONS] and with_field["references_added"] == 2
    summary = api.update_memory_bank(dataset, "bank")
    assert len(summary["added"]) == 3 and len(summary["removed"]) == 1


def test_a_no_op_update_touches_nothing(banked):
    dataset = banked
    before = dataset.get_run_info("bank").timestamp
    with network_calls() as calls:
        summary = api.update_memory_bank(dataset, "bank")
    assert calls == [] and summary["nothing_changed"] and summary["added"] == []
    assert dataset.get_run_info("bank").timestamp == before
    assert api.pending_changes(dataset, "bank")["nothing_changed"]


def _update_form(dataset: fo.Dataset, **params) -> dict:
    ctx = ExecutionContext(
        request_params={"dataset_name": dataset.name, "params": {"bank_name": "bank", **params}}
    )
    form = OperatorRegistry().get_operator(f"{PLUGIN}/update_memory_bank").resolve_input(ctx)
    return form.to_json()["type"]["properties"]


def _preview_text(fields: dict) -> str:
    (text,) = [p["default"] for name, p in fields.items() if name.startswith("preview_")]
    return text


def test_the_update_form_adds_no_field_by_default_and_previews_each_change(banked):
    dataset = banked
    (negative, accepted, *_), labels = dataset.values(
        [f"{PREDICTIONS}.detections.id", f"{PREDICTIONS}.detections.label"], unwind=True
    )
    assert "Nothing changed" in _preview_text(_update_form(dataset))
    _tag(dataset, [negative], "negative", PREDICTIONS)
    _tag(dataset, [accepted], "reference", PREDICTIONS)  # e.g. the modal tagged every field

    fields = _update_form(dataset)
    assert fields["accepted_fields"]["default"] == []  # never pre-filled with predictions
    text = _preview_text(fields)
    assert f"| {PREDICTIONS} | {labels[0]} | negative | +1 |" in text
    assert f"1 in '{PREDICTIONS}'" in text  # the accepted prediction is shown, not taken
    picked = _preview_text(_update_form(dataset, accepted_fields=[PREDICTIONS]))
    assert f"| {PREDICTIONS} | {labels[1]} | reference | +1 |" in picked

    run("update_memory_bank", dataset, bank_name="bank")
    info = api.memory_bank_info(dataset, "bank")
    assert info["ref_fields"] == ["ground_truth"] and info["num_negatives"] == 1


def test_a_rescore_that_writes_no_sample_keeps_the_evaluations(banked):
    api.evaluate(banked, PREDICTIONS, "ground_truth", "ev")
    out = api.segment(banked, "bank", PREDICTIONS, reuse_proposals=True, rescore=True)
    assert out["written"] == 0 and out["deleted_evaluations"] == []
    assert banked.list_evaluations() == ["ev"]
