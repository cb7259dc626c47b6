"""The FiftyOne plugin end to end: loading, every operator immediate and delegated, refusals.

Real embedded database (isolated by conftest), random-weight tiny models on the CPU.
"""

from __future__ import annotations

import pathlib

import fiftyone as fo
import fiftyone.operators as foo
import numpy as np
import pytest
import yaml
from fiftyone.operators.delegated import DelegatedOperationService
from fiftyone.operators.executor import ExecutionContext, ExecutionError
from fiftyone.operators.registry import OperatorRegistry
from pycocotools import mask as mask_utils

from ntt_core import Instances, NTTConfig, NTTError
from ntt_operators import api
from ntt_operators.labels import instances_to_detections, paste_mask

ROOT = pathlib.Path(__file__).resolve().parents[1]
MANIFEST = yaml.safe_load((ROOT / "fiftyone.yml").read_text())
PLUGIN = MANIFEST["name"]
TINY = NTTConfig.tiny(weights="random", device="cpu")
TINY_PARAMS = {"preset": "tiny", "weights": "random", "device": "cpu"}

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def uri(name: str) -> str:
    return f"{PLUGIN}/{name}"


def run(name: str, dataset_or_view, delegated: bool = False, **params):
    """Runs an operator the way the App does; delegated runs go through the queue in-process."""
    result = foo.execute_operator(
        uri(name),
        ctx={"view": dataset_or_view.view(), "params": params},
        request_delegation=delegated,
    )
    if not delegated:
        return result.result
    assert result.delegated
    (done,) = DelegatedOperationService().execute_queued_operations(operator=uri(name))
    assert done.error is None, done.error
    return done.result


def delegated_progress(name: str, dataset: fo.Dataset):
    """The progress a dataset's delegated run of an operator last reported (the Runs page)."""
    (doc,) = DelegatedOperationService().list_operations(
        operator=uri(name), dataset_name=dataset.name
    )
    return doc.status


def snapshot(dataset: fo.Dataset) -> tuple:
    """What a refused call must leave alone: fields, runs, tags, and the ground truth."""
    dataset.reload()
    labels = [
        [(d.id, d.label, tuple(d.tags), d.bounding_box) for d in gt.detections]
        for gt in dataset.values("ground_truth")
    ]
    return (
        sorted(dataset.get_field_schema()),
        dataset.list_runs(),
        dataset.values("tags"),
        labels,
    )


@pytest.fixture
def banked(scene_dataset):
    """The scenes with one reference per class tagged and a bank named ``bank`` built."""
    api.sample_references(scene_dataset, "ground_truth", shots=1, seed=33)
    api.build_memory_bank(scene_dataset, "ground_truth", "bank", config=TINY)
    return scene_dataset


def assert_predictions(dataset: fo.Dataset, field: str, sample_ids: list[str]) -> None:
    """Every listed sample holds fo.Detections whose masks render at the image's full size."""
    view = dataset.select(sample_ids)
    assert len(view.exists(field)) == len(sample_ids)
    for sample in view:
        width, height = sample.metadata.width, sample.metadata.height
        for detection in sample[field].detections:
            assert detection.mask is not None and detection.confidence is not None
            full = paste_mask(detection.mask, detection.bounding_box, width, height)
            assert full.shape == (height, width) and full.sum() == detection.mask.sum() > 0


# -- loading ----------------------------------------------------------------------------------


def test_plugin_loads_and_registers_every_listed_operator():
    registry = OperatorRegistry()
    assert registry.list_errors() == []
    registered = {op.uri for op in registry.list_operators(builtin=False)}
    assert {uri(name) for name in MANIFEST["operators"]} <= registered
    assert MANIFEST["fiftyone"]["version"] == ">=1.14"


@pytest.mark.parametrize("with_bank", [False, True])
def test_every_form_resolves(scene_dataset, with_bank):
    """What the App asks for when it opens each operator, on a bare and on a worked dataset."""
    if with_bank:
        api.sample_references(scene_dataset, "ground_truth", shots=1, seed=33)
        api.build_memory_bank(scene_dataset, "ground_truth", "bank", config=TINY)
        scene_dataset.clone_sample_field("ground_truth", "pred")
        scene_dataset.set_field("pred.detections.confidence", 0.5).save()
        api.evaluate(scene_dataset, "pred", "ground_truth", "e")
    else:
        scene_dataset.delete_sample_field("ground_truth")
    registry = OperatorRegistry()
    for name in MANIFEST["operators"]:
        ctx = ExecutionContext(
            request_params={"dataset_name": scene_dataset.name, "params": {"label_field": "pred"}}
        )
        form = registry.get_operator(uri(name)).resolve_input(ctx).to_json()
        assert form["type"]["properties"], name


# -- 1. references ----------------------------------------------------------------------------


@pytest.mark.parametrize("delegated", [False, True])
def test_sample_references_tags_a_reproducible_draw(scene_dataset, delegated):
    expected = api.sample_references(scene_dataset, "ground_truth", shots=1, seed=5, tag="ref")
    scene_dataset.untag_samples("ref")
    scene_dataset.untag_labels("ref")

    out = run(
        "sample_references", scene_dataset, delegated, gt_field="ground_truth", seed=5, tag="ref"
    )
    assert out["label_ids"] == expected
    tagged = scene_dataset.select_labels(tags="ref", fields="ground_truth")
    assert sorted(tagged.values("ground_truth.detections.id", unwind=True)) == sorted(
        i for ids in expected.values() for i in ids
    )
    assert set(tagged.values("ground_truth.detections.label", unwind=True)) == {"disc", "square"}
    assert scene_dataset.count_sample_tags()["ref"] == len(tagged)


def test_resampling_replaces_the_previous_draw(scene_dataset, scene_files):
    scene_dataset.add_sample(fo.Sample(filepath=scene_files[0][0]))  # no ground truth
    api.sample_references(scene_dataset, "ground_truth", shots=1, seed=1, tag_samples=False)
    picks = api.sample_references(scene_dataset, "ground_truth", shots=1, seed=2)
    assert scene_dataset.count_label_tags()["reference"] == sum(map(len, picks.values()))


# -- 2. memory bank ---------------------------------------------------------------------------


def test_build_memory_bank_immediately_and_inspect_it(scene_dataset):
    api.sample_references(scene_dataset, "ground_truth", shots=1, seed=33)
    result = foo.execute_operator(
        uri("build_memory_bank"),
        ctx={
            "dataset": scene_dataset,
            "params": {"gt_field": "ground_truth", "bank_name": "b1", **TINY_PARAMS},
        },
    )
    # An immediate run streams a progress bar, then shows its summary, then reloads the App.
    sent = [(r.operator_uri, r.params) for r in result.executor._requests]
    assert [name for name, _ in sent][-2:] == ["show_output", "reload_dataset"]
    assert {name for name, _ in sent[:-2]} == {"set_progress"}
    assert sent[-2][1]["results"]["name"] == "b1"

    assert api.list_memory_banks(scene_dataset) == ["b1"]
    bank = api.load_memory_bank(scene_dataset, "b1")
    assert bank.classes == ["disc", "square"] and len(bank) == 2
    recorded = api.memory_bank_config(scene_dataset, "b1")
    assert recorded["gt_field"] == "ground_truth" and recorded["ntt_config"] == TINY.to_dict()
    assert sorted(recorded["reference_ids"]) == sorted(
        scene_dataset.select_labels(tags="reference").values(
            "ground_truth.detections.id", unwind=True
        )
    )
    # The run records the reference view, so the App can show the references of a bank.
    assert len(scene_dataset.load_run_view("b1")) == scene_dataset.count_sample_tags()["reference"]

    info = run("get_memory_bank_info", scene_dataset, bank_name="b1")
    assert info["name"] == "b1" and "random weights" in info["encoder"]
    assert [row["class"] for row in info["quality"]] == ["disc", "square"]

    deleted = run("delete_memory_bank", scene_dataset, bank_name="b1", confirm=True)
    assert deleted == {"deleted": "b1", "contents": "2 references of disc, square"}
    assert api.list_memory_banks(scene_dataset) == []


def test_build_memory_bank_delegated_from_sample_tags_with_box_only_references(scene_dataset):
    scene_dataset.limit(2).tag_samples("reference")
    # Strip one reference's mask: SAM2 must supply it from the box.
    sample = scene_dataset.first()
    sample.ground_truth.detections[0].mask = None
    sample.save()
    total = sum(len(g.detections) for g in scene_dataset.limit(2).values("ground_truth"))

    run(
        "build_memory_bank",
        scene_dataset,
        delegated=True,
        gt_field="ground_truth",
        bank_name="b2",
        tag_type="sample",
        **TINY_PARAMS,
    )
    info = api.memory_bank_info(scene_dataset, "b2")
    assert info["num_references"] == total and info["masks_from_boxes"] == 1
    assert info["tag_type"] == "sample"


# -- 3. segmentation --------------------------------------------------------------------------


@pytest.mark.parametrize("delegated", [False, True])
def test_segment_writes_masks_to_a_new_field_and_records_the_run(banked, delegated):
    run(
        "segment_with_references",
        banked,
        delegated,
        bank_name="bank",
        label_field="pred",
        batch_size=2,
    )
    targets = banked.match_tags("reference", bool=False).match_labels(tags="reference", bool=False)
    assert_predictions(banked, "pred", targets.values("id"))
    references = banked.match_labels(tags="reference")
    assert references.count("pred") == 0 and len(references.exists("pred")) == 0

    status = api.segment_status(banked, "pred")
    assert status["status"] == "completed" and status["processed"] == len(targets)
    recorded = banked.get_run_info(api.segment_run_key("pred")).config
    assert recorded.bank_name == "bank" and recorded.ntt_config == TINY.to_dict()
    if delegated:
        progress = delegated_progress("segment_with_references", banked)
        assert progress.progress == 1.0 and progress.label.startswith("Segmented")


def test_segment_form_offers_ray_and_execute_passes_its_settings(banked, monkeypatch):
    operator = OperatorRegistry().get_operator(uri("segment_with_references"))

    def form(**params):
        ctx = ExecutionContext(
            request_params={"dataset_name": banked.name, "params": {"bank_name": "bank", **params}}
        )
        return operator.resolve_input(ctx).to_json()["type"]["properties"]

    ray_fields = {"ray_address", "num_actors", "gpus_per_actor"}
    local = form()
    assert local["advanced_header"]["view"]["label"] == "Advanced"
    assert local["backend"]["type"]["values"] == ["local", "ray"]
    assert local["backend"]["default"] == "local" and not ray_fields & set(local)
    assert ray_fields <= set(form(backend="ray"))

    seen = {}

    def fake_iter_segment(*args, **kwargs):
        seen.update(kwargs)
        yield 1.0, "done"
        return {"label_field": "pred", "failed": {}, "deleted_evaluations": []}

    monkeypatch.setattr(api, "iter_segment", fake_iter_segment)
    run("segment_with_references", banked, bank_name="bank", label_field="pred")
    assert (seen["backend"], seen["ray_address"], seen["num_actors"]) == ("local", None, 2)
    run(
        "segment_with_references",
        banked,
        True,
        bank_name="bank",
        label_field="pred",
        backend="ray",
        ray_address="auto",
        num_actors=1,
        gpus_per_actor=0.5,
    )
    assert {k: seen[k] for k in ("backend", "ray_address", "num_actors", "gpus_per_actor")} == {
        "backend": "ray",
        "ray_address": "auto",
        "num_actors": 1,
        "gpus_per_actor": 0.5,
    }


def test_interrupted_segmentation_is_marked_cancelled_and_skip_done_continues_it(banked):
    class Interrupt(Exception):
        pass

    def stop_after_first(fraction, label):
        if label.startswith("Segmented 1/"):
            raise Interrupt

    with pytest.raises(Interrupt):
        api.segment(banked, "bank", "pred", batch_size=8, progress=stop_after_first)
    status = api.segment_status(banked, "pred")
    assert (status["status"], status["processed"]) == ("cancelled", 1)
    assert len(banked.exists("pred")) == 1  # the finished sample was written, not lost

    out = api.segment(banked, "bank", "pred", skip_done=True)
    assert out["skipped"] == 1 and out["failed"] == {}
    targets = banked.match_tags("reference", bool=False).match_labels(tags="reference", bool=False)
    assert out["processed"] == len(targets) - 1
    assert api.segment_status(banked, "pred")["status"] == "completed"
    assert_predictions(banked, "pred", targets.values("id"))


def test_a_failing_sample_is_reported_and_the_run_goes_on(banked, run_dir):
    broken = run_dir / "broken.png"
    broken.write_bytes(b"not an image")
    banked.add_sample(fo.Sample(filepath=str(broken)))
    view = banked.match_tags("reference", bool=False).match_labels(tags="reference", bool=False)
    out = api.segment(view.skip(len(view) - 2), "bank", "pred")
    (failed_id,) = out["failed"]
    assert "ImageError" in out["failed"][failed_id] and out["processed"] == 1
    assert banked[failed_id]["pred"] is None
    assert api.segment_status(banked, "pred")["failed"] == out["failed"]


def test_overwrite_replaces_the_field_for_the_selected_samples(banked):
    first, second = banked.match_tags("reference", bool=False).limit(2).values("id")
    api.segment(banked.select(first), "bank", "pred")
    result = foo.execute_operator(
        uri("segment_with_references"),
        ctx={
            "dataset": banked,
            "selected": [second],
            "params": {
                "view_target": "SELECTED_SAMPLES",
                "bank_name": "bank",
                "label_field": "pred",
                "overwrite": True,
            },
        },
    )
    assert result.result is None  # immediate runs stream their summary to the App instead
    assert banked.exists("pred").values("id") == [second]
    assert api.segment_status(banked, "pred")["status"] == "completed"


# -- 4. evaluation ----------------------------------------------------------------------------


def test_evaluate_reports_per_class_and_opens_patches(banked):
    targets = banked.match_tags("reference", bool=False).limit(2)
    api.segment(targets, "bank", "pred")
    ctx = ExecutionContext(request_params={"dataset_name": banked.name, "params": {}})
    form = OperatorRegistry().get_operator(uri("evaluate_segmentations")).resolve_input(ctx)
    fields = form.to_json()["type"]["properties"]
    assert fields["pred_field"]["default"] == "pred"  # the plugin's own predictions first
    assert fields["gt_field"]["default"] == "ground_truth"

    result = foo.execute_operator(
        uri("evaluate_segmentations"),
        ctx={
            "view": targets,
            "params": {"pred_field": "pred", "gt_field": "ground_truth", "load_patches": True},
        },
    )
    report = result.result
    assert report["eval_key"] == "ntt_eval" and 0.0 <= report["mAP"] <= 1.0
    rows = {row["class"]: row for row in report["classes"]}
    for name in targets.distinct("ground_truth.detections.label"):
        assert {"precision", "recall", "f1", "support"} <= set(rows[name]), report
    assert "ntt_eval" in banked.list_evaluations()
    for suffix in ("tp", "fp", "fn"):
        assert banked.has_sample_field(f"ntt_eval_{suffix}")
    assert sum(targets.values("ntt_eval_tp")) + sum(targets.values("ntt_eval_fn")) == sum(
        len(g.detections) for g in targets.values("ground_truth")
    )
    assert any(r.operator_uri == "set_view" for r in result.executor._requests)

    delegated = run(
        "evaluate_segmentations",
        targets,
        delegated=True,
        pred_field="pred",
        gt_field="ground_truth",
        eval_key="ntt_eval_2",
    )
    assert delegated["mAP"] == report["mAP"]

    patches = run("load_evaluation_patches", banked, eval_key="ntt_eval", patch_type="fn")
    expected = banked.to_evaluation_patches("ntt_eval").match(fo.ViewField("type") == "fn")
    assert patches["patches"] == len(expected)


# -- refusals leave the dataset as it was -----------------------------------------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda d: api.segment(d, "bank", "ground_truth"), "ground-truth"),
        (lambda d: api.segment(d, "bank", "filepath"), "does not hold fo.Detections"),
        (lambda d: api.segment(d, "bank", "not a field"), "top-level field name"),
        (lambda d: api.segment(d, "nope", "pred"), "No memory bank named 'nope'"),
        (lambda d: api.segment(d, "bank", "pred", overwrite=True, skip_done=True), "choose one"),
        (lambda d: api.build_memory_bank(d, "ground_truth", "bad name"), "not valid"),
        (lambda d: api.build_memory_bank(d, "ground_truth", "bank"), "already exists"),
        (lambda d: api.build_memory_bank(d, "metadata", "b"), "not an fo.Detections field"),
        (lambda d: api.build_memory_bank(d, "missing", "b"), "does not exist"),
        (lambda d: api.build_memory_bank(d, "ground_truth", "b", ref_tag="none"), "No reference"),
        (
            lambda d: api.build_memory_bank(d, "ground_truth", "b", classes=["disc", "star"]),
            r"\['star'\] have no reference",
        ),
        (lambda d: api.evaluate(d, "ground_truth", "ground_truth", "e"), "same field"),
        (lambda d: api.delete_memory_bank(d, "nope"), "No memory bank"),
    ],
)
def test_refusals_change_nothing(banked, call, message):
    before = snapshot(banked)
    with pytest.raises(NTTError, match=message):
        call(banked)
    assert snapshot(banked) == before


def test_predictions_without_confidence_are_refused_before_evaluating(scene_dataset):
    scene_dataset.clone_sample_field("ground_truth", "boxes")
    before = snapshot(scene_dataset)
    with pytest.raises(NTTError, match="no confidence"):
        api.evaluate(scene_dataset, "boxes", "ground_truth", "e")
    assert snapshot(scene_dataset) == before and scene_dataset.list_evaluations() == []


def test_existing_field_is_refused_without_overwrite_through_the_operator(banked):
    api.segment(banked.match_tags("reference", bool=False).limit(1), "bank", "pred")
    before = snapshot(banked)
    preds = banked.values("pred")
    with pytest.raises(ExecutionError, match="already exists"):
        run("segment_with_references", banked, bank_name="bank", label_field="pred")
    assert snapshot(banked) == before and banked.values("pred") == preds


def test_masks_round_trip_exactly_through_the_label_bridge():
    mask = np.zeros((40, 60), dtype=bool)
    mask[5:20, 10:31] = True
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    instances = Instances(
        image_size=(40, 60),
        boxes=np.array([[10, 5, 30, 19]], dtype=np.float32),
        scores=np.array([0.7], dtype=np.float32),
        labels=np.array([0]),
        class_names=["disc"],
        rles=[rle],
    )
    (detection,) = instances_to_detections(instances).detections
    assert detection.label == "disc" and detection.confidence == pytest.approx(0.7)
    assert detection.bounding_box == pytest.approx([10 / 60, 5 / 40, 21 / 60, 15 / 40])
    assert np.array_equal(paste_mask(detection.mask, detection.bounding_box, 60, 40), mask)
    # A crop stored at another size than its box is resampled into the box.
    assert paste_mask(np.ones((3, 7)), [0.5, 0.5, 0.25, 0.25], 40, 20)[10:15, 20:30].all()
