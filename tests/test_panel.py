"""The "No Time to Train" panel's handlers, called as the App calls them, without a browser.

Each call builds the ``ExecutionContext`` the App sends (dataset, selected labels, the panel's
state), runs the handler, then renders; the assertions read the rendered text, the panel's state
and the dataset. Real embedded database, random-weight tiny models on the CPU.
"""

from __future__ import annotations

import json
import math

import fiftyone as fo
import pytest
import torch
from fiftyone.operators.executor import ExecutionContext, Executor

from ntt_core import NTTConfig
from ntt_core.cache import file_checksum, proposal_identity, proposals_from_bytes
from ntt_core.coco import json_ready_rle
from ntt_operators import api
from ntt_operators.api import loop
from ntt_operators.api.request import SegmentMode, SegmentRequest
from ntt_operators.labels import declare_reasons, prediction_ids
from ntt_operators.panel import NoTimeToTrainPanel
from ntt_operators.proposal_cache import ProposalCache
from ntt_operators.rounds import PROGRESS_KEY, ROUND_OPERATOR, RunRound

TINY = NTTConfig.tiny(weights="random", device="cpu")
PREDICTIONS = "ntt_predictions"
CLASS = "square"

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


class PanelSession:
    """One open panel: its state carries over from call to call, as in the App."""

    def __init__(self, dataset: fo.Dataset) -> None:
        self.dataset = dataset
        self.panel = NoTimeToTrainPanel()
        self.state: dict = {}
        self.ops: list[str] = []
        self.progress: list[str] = []

    def call(
        self,
        method: str,
        selected_labels: list[dict] | None = None,
        selected: list[str] = (),
        view: fo.DatasetView | None = None,
        params: dict | None = None,
    ) -> str:
        """Runs the handler, then renders; returns the rendered text. A prompt the App need not
        show (a small round) is run as the App runs it."""
        ctx = ExecutionContext(
            request_params={
                "dataset_name": self.dataset.name,
                "view": view._serialize() if view is not None else [],
                "selected_labels": selected_labels or [],
                "selected": list(selected),
                "params": {"panel_id": "panel", "panel_state": self.state, **(params or {})},
            },
            executor=Executor(),
        )
        getattr(self.panel, method)(ctx)
        requests = list(ctx.executor._requests)
        self.ops = [request.operator_uri for request in requests]
        self.state = ctx.panel_state
        text = json.dumps(self.panel.render(ctx).to_json())
        for request in requests:
            if request.operator_uri == "prompt_user_for_operation":
                if request.params["skip_prompt"]:
                    return self._run_prompted(request.params)
        return text

    def _run_prompted(self, prompt: dict) -> str:
        """What the App does with a prompt it skips: runs the operator, applies the panel state
        patches it yields, then calls the panel's on_success handler."""
        assert prompt["operator_uri"] == ROUND_OPERATOR
        ctx = ExecutionContext(
            request_params={
                "dataset_name": self.dataset.name,
                "params": {**prompt["params"], "panel_id": "panel"},
            },
            executor=Executor(),
        )
        for message in RunRound().execute(ctx):
            if message.body.operator_uri == "patch_panel_state":
                patch = message.body.params["state"]
                self.state.update(patch)
                if patch.get(PROGRESS_KEY):
                    self.progress.append(patch[PROGRESS_KEY])
        return self.call(prompt["on_success"].split("#")[-1], params={"result": None})

    def set(self, **choices) -> None:
        """What typing in the panel's inputs does: the values land in its state."""
        self.state.update(choices)


@pytest.fixture
def unlabelled(scene_files):
    dataset = fo.Dataset()
    dataset.add_samples(fo.Sample(filepath=path) for path, _ in scene_files)
    dataset.compute_metadata()
    yield dataset
    dataset.delete()


def draw_squares(dataset: fo.Dataset, scene_files, field: str, samples: int = 2) -> list[dict]:
    """Boxes as the Annotate tab draws them (label and box only) around every square of the
    first ``samples`` samples that show one; returns them as the App's label selection."""
    selection = []
    for sample, (_, instances) in zip(dataset, scene_files):
        squares = [i for i in instances if i.label == CLASS]
        if not squares or len({s["sample_id"] for s in selection}) == samples:
            continue
        h, w = squares[0].mask.shape
        boxes = []
        for i in squares:
            x, y, bw, bh = i.box_xywh
            boxes.append(fo.Detection(label=CLASS, bounding_box=[x / w, y / h, bw / w, bh / h]))
        sample[field] = fo.Detections(detections=boxes)
        sample.save()
        selection += [{"label_id": d.id, "sample_id": sample.id, "field": field} for d in boxes]
    return selection


def tags_of(dataset: fo.Dataset, field: str) -> dict[str, list[str]]:
    dataset.reload()
    return {
        d.id: d.tags for dets in dataset.values(field) for d in (dets.detections if dets else [])
    }


def test_a_dataset_without_a_detections_field_gets_one_ready_for_the_box_tool(unlabelled):
    session = PanelSession(unlabelled)
    text = session.call("on_load")
    assert "has no `fo.Detections` field yet" in text
    session.set(new_field="boxes", new_classes="square, disc")
    text = session.call("create_field")
    unlabelled.reload()
    schema = unlabelled.label_schemas["boxes"]
    assert schema["classes"] == ["disc", "square"] and "boxes" in unlabelled.active_label_schemas
    assert "field `boxes` is ready for the box tool (no reload needed)" in text
    assert "reload_dataset" in " ".join(session.ops)


def test_creating_a_field_refuses_an_empty_class_list_and_changes_nothing(unlabelled):
    session = PanelSession(unlabelled)
    session.set(new_field="boxes", new_classes=" , ")
    text = session.call("create_field")
    assert "Type at least one class" in text
    assert not unlabelled.has_sample_field("boxes")


def test_marks_act_on_the_selection_in_the_named_fields_only(unlabelled, scene_files):
    selection = draw_squares(unlabelled, scene_files, "boxes")
    # The same boxes in a field the panel does not name: its labels are never tagged.
    other = draw_squares(unlabelled, scene_files, "other")
    session = PanelSession(unlabelled)
    session.set(reference_field="boxes")
    text = session.call("mark_reference", selection + other)
    assert set(map(tuple, tags_of(unlabelled, "boxes").values())) == {("reference",)}
    assert all(not t for t in tags_of(unlabelled, "other").values())
    assert f"| {CLASS} | {len(selection)} | 0 |" in text  # the counts, at once

    text = session.call("mark_negative", selection[:1])
    assert tags_of(unlabelled, "boxes")[selection[0]["label_id"]] == ["negative"]
    assert f"| {CLASS} | {len(selection) - 1} | 1 |" in text

    session.call("clear_marks", selection[:1])
    assert tags_of(unlabelled, "boxes")[selection[0]["label_id"]] == []


def test_reference_on_selected_samples_marks_the_boxes_drawn_in_them(unlabelled, scene_files):
    selection = draw_squares(unlabelled, scene_files, "boxes")
    first_sample = selection[0]["sample_id"]
    session = PanelSession(unlabelled)
    session.set(reference_field="boxes")
    text = session.call("mark_negative", selected=[first_sample])
    assert "Select the labels to mark negative" in text
    session.call("mark_reference", selected=[first_sample])
    tags = tags_of(unlabelled, "boxes")
    marked = {s["label_id"] for s in selection if s["sample_id"] == first_sample}
    assert {i for i, t in tags.items() if t == ["reference"]} == marked


def test_patches_ticked_in_the_review_grid_mark_their_predictions(unlabelled):
    unlabelled.add_sample_field(
        PREDICTIONS, fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections
    )
    sample = unlabelled.first()
    sample[PREDICTIONS] = fo.Detections(
        detections=[
            fo.Detection(label=CLASS, bounding_box=[0.1 * k, 0, 0.1, 0.1], confidence=0.5)
            for k in range(3)
        ]
    )
    sample.save()
    patches, _ = loop.review_view(unlabelled, PREDICTIONS)
    ticked = patches.values("id")[1]
    session = PanelSession(unlabelled)
    text = session.call("mark_negative", selected=[ticked], view=patches)
    assert "1 label(s) marked: negatives" in text
    tagged = [i for i, t in tags_of(unlabelled, PREDICTIONS).items() if t == ["negative"]]
    assert tagged == [patches.values(f"{PREDICTIONS}.id")[1]]


def test_two_rounds_from_drawn_boxes_to_a_corrected_field(unlabelled, scene_files):
    selection = draw_squares(unlabelled, scene_files, "boxes")
    session = PanelSession(unlabelled)
    session.set(reference_field="boxes", models="tiny_random")
    session.call("mark_reference", selection)
    text = session.call("run_round")
    assert "Round 1 done" in text, text
    assert f"{len(selection)} bank entries added" in text
    # The round streamed its steps into the panel: the bank, then each sample segmented.
    assert session.progress[0] == "Round 1: Loading models (0%)", session.progress
    assert any("Segment" in line for line in session.progress), session.progress
    assert PROGRESS_KEY not in text  # the line is gone once the round is over
    assert "Next round (2):** update the bank from the tags, then re-score in place" in text
    first = tags_and_scores(unlabelled)
    assert first

    # One prediction marked negative: the panel says the bank is behind the tags.
    negative_id, (_, score_before, _) = next(iter(first.items()))
    sample_id = unlabelled.select_labels(ids=[negative_id]).first().id
    picked = [{"label_id": negative_id, "sample_id": sample_id, "field": PREDICTIONS}]
    text = session.call("mark_negative", picked)
    assert "1 negative tagged since the last update" in text

    text = session.call("run_round")
    assert "Round 2 done" in text and "1 bank entry added" in text, text
    assert f"{len(selection)} references, 1 negative, classes" in text
    second = tags_and_scores(unlabelled)
    assert set(second) == set(first)  # ids kept: re-scored in place
    assert f"the field holds {len(second)} prediction" in text
    # One class: the negative decays its own score by exp(-max(0, neg - pos) / sigma).
    bank = api.load_memory_bank(unlabelled, "ntt_bank")
    f = cached_feature(unlabelled, sample_id, negative_id)
    pos = max(0.0, float(f @ bank.prototypes[0]))
    neg = max(0.0, float(f @ torch.nn.functional.normalize(bank.negative_features[0], dim=0)))
    expected = score_before * math.exp(-max(0.0, neg - pos) / TINY.negative_sigma)
    assert second[negative_id][1] == pytest.approx(expected, rel=1e-5)
    assert second[negative_id][2] == ("negative",)
    history = loop.round_history(unlabelled, PREDICTIONS)
    assert [r["mode"] for r in history] == ["new", "rescore"]
    assert history[1]["predictions_kept"] == len(first)

    text = session.call("review")
    assert "set_view" in " ".join(session.ops)
    # One class: no runner-up, so no margin; the negative gives every prediction its similarity.
    assert "Predictions by nearest_negative_similarity highest first" in text, text


def test_a_large_round_opens_its_form_with_schedule_and_says_how_the_queue_runs(
    unlabelled, scene_files, monkeypatch
):
    selection = draw_squares(unlabelled, scene_files, "boxes")
    session = PanelSession(unlabelled)
    session.set(reference_field="boxes", models="tiny_random")
    session.call("mark_reference", selection)
    monkeypatch.setattr(loop, "LARGE_ROUND", 1)
    text = session.call("run_round")
    assert "prompt_user_for_operation" in session.ops  # the form, not a run
    assert not unlabelled.has_sample_field(PREDICTIONS)
    assert "Schedule as the default" in text
    ctx = ExecutionContext(
        request_params={
            "dataset_name": unlabelled.name,
            "params": {
                "bank": "ntt_bank",
                "reference_field": "boxes",
                "predictions": PREDICTIONS,
                "models": "tiny_random",
            },
        }
    )
    assert RunRound().resolve_execution_options(ctx).default_choice_to_delegated
    assert "fiftyone delegated launch" in json.dumps(RunRound().resolve_input(ctx).to_json())
    # Scheduled: the App answers with the queued run's record.
    text = session.call("round_ended", params={"result": {"run_state": "queued"}})
    assert "Round scheduled: start the queue with `fiftyone delegated launch`" in text


def test_the_panel_lists_the_banks_and_switches_to_another_with_its_field(unlabelled, scene_files):
    selection = draw_squares(unlabelled, scene_files, "boxes")
    session = PanelSession(unlabelled)
    session.set(reference_field="boxes", models="tiny_random")
    session.call("mark_reference", selection)
    text = session.call("run_round")
    assert "Round 1 done" in text
    assert '"Memory bank"' not in text  # one bank: nothing to choose
    api.build_memory_bank(unlabelled, "boxes", "cars_bank", config=TINY)
    text = session.call("show_all")
    assert '"Memory bank"' in text and "cars_bank" in text and "ntt_bank" in text

    text = session.call("choose_bank", params={"value": "cars_bank"})
    assert (session.state["bank"], session.state["predictions"]) == (
        "cars_bank",
        "cars_bank_predictions",
    )
    assert "**Bank:** `cars_bank`" in text
    text = session.call("choose_bank", params={"value": "ntt_bank"})
    assert session.state["predictions"] == PREDICTIONS  # the field segmented with it
    assert "Round 1 done" in text  # its history


def test_a_failed_round_is_one_sentence_in_the_panel(unlabelled, scene_files):
    draw_squares(unlabelled, scene_files, "boxes")  # drawn but never marked as references
    session = PanelSession(unlabelled)
    session.set(reference_field="boxes", models="tiny_random")
    text = session.call("run_round")
    assert "Round 1 failed: No reference found" in text
    assert "Traceback" not in text
    # Recorded for the field: a panel opened later (or a scheduled round's) shows it too.
    assert "Round 1 failed: No reference found" in PanelSession(unlabelled).call("show_all")
    assert not unlabelled.has_sample_field(PREDICTIONS)


def test_review_puts_the_smallest_margin_first_when_predictions_are_explained(unlabelled):
    unlabelled.add_sample_field(
        PREDICTIONS, fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections
    )
    declare_reasons(unlabelled, PREDICTIONS)  # as a segment run does
    sample = unlabelled.first()
    sample[PREDICTIONS] = fo.Detections(
        detections=[
            fo.Detection(label=CLASS, bounding_box=[0, 0, 0.1, 0.1], confidence=0.9, margin=m)
            for m in (0.5, 0.1, 0.3)
        ]
    )
    sample.save()
    view, order = loop.review_view(unlabelled, PREDICTIONS)
    assert [d[PREDICTIONS].margin for d in view] == [0.1, 0.3, 0.5]
    assert order == "Predictions by margin lowest first"


@pytest.mark.parametrize(
    ("mode", "flag"),
    [
        (SegmentMode.NEW, None),
        (SegmentMode.REPLACE, "overwrite"),
        (SegmentMode.CONTINUE, "skip_done"),
        (SegmentMode.RESCORE, "rescore"),
    ],
)
def test_a_segment_request_sets_at_most_one_mode_flag(unlabelled, mode, flag):
    kwargs = SegmentRequest(unlabelled, "bank", PREDICTIONS, mode).segment_kwargs()
    flags = [name for name in ("overwrite", "skip_done", "rescore") if kwargs[name]]
    assert flags == ([flag] if flag else [])


def tags_and_scores(dataset: fo.Dataset) -> dict[str, tuple]:
    dataset.reload()
    rows = {}
    for dets in dataset.values(PREDICTIONS):
        for d in dets.detections if dets else []:
            rows[d.id] = (d.label, d.confidence, tuple(d.tags))
    return rows


def cached_feature(dataset: fo.Dataset, sample_id: str, label_id: str) -> torch.Tensor:
    """The cached proposal feature behind a prediction (its id derives from the mask)."""
    blob = ProposalCache(dataset, TINY).get(sample_id)
    filepath = dataset[sample_id].filepath
    proposals = proposals_from_bytes(blob, file_checksum(filepath), proposal_identity(TINY))
    rles = [json_ready_rle(rle) for rle in proposals.rles]
    ids = [str(i) for i in prediction_ids(f"{PREDICTIONS}:{sample_id}", rles)]
    return proposals.features[ids.index(label_id)]


def test_segment_defaults_to_execute_unless_many_targets_need_the_models(unlabelled, monkeypatch):
    from fiftyone.operators.registry import OperatorRegistry

    operator = OperatorRegistry().get_operator("@ntt/no_time_to_train/segment_with_references")
    ctx = ExecutionContext(
        request_params={"dataset_name": unlabelled.name, "params": {"bank_name": "bank"}}
    )
    assert not operator.resolve_execution_options(ctx).default_choice_to_delegated
    monkeypatch.setattr(loop, "LARGE_ROUND", len(unlabelled) - 1)
    options = operator.resolve_execution_options(ctx)
    assert options.default_choice_to_delegated and options.allow_immediate_execution


def test_build_defaults_to_execute_unless_hundreds_of_references_and_evaluate_always(
    unlabelled, scene_files, monkeypatch
):
    from fiftyone.operators.registry import OperatorRegistry

    import ntt_operators.bank

    draw_squares(unlabelled, scene_files, "boxes")
    unlabelled.tag_labels("reference", label_fields="boxes")
    registry = OperatorRegistry()
    ctx = ExecutionContext(request_params={"dataset_name": unlabelled.name, "params": {}})

    def scheduled_by_default(name: str) -> bool:
        operator = registry.get_operator(f"@ntt/no_time_to_train/{name}")
        return operator.resolve_execution_options(ctx).default_choice_to_delegated

    assert not scheduled_by_default("build_memory_bank")
    assert not scheduled_by_default("evaluate_segmentations")
    monkeypatch.setattr(ntt_operators.bank, "LARGE_ROUND", 1)
    assert scheduled_by_default("build_memory_bank")


def test_a_round_reports_its_map_and_none_where_the_targets_hold_no_ground_truth(scene_dataset):
    api.sample_references(scene_dataset, "ground_truth", shots=1, seed=33)
    first = loop.run_round(
        scene_dataset, "bank", ["ground_truth"], PREDICTIONS, TINY, gt_field="ground_truth"
    )
    assert 0 <= first["mAP"] <= 1
    references = scene_dataset.match_labels(tags="reference")
    targets = scene_dataset.exclude(references.values("id"))
    targets.set_values("ground_truth", [None] * len(targets))
    second = loop.run_round(
        scene_dataset, "bank", ["ground_truth"], PREDICTIONS, TINY, gt_field="ground_truth"
    )
    assert second["mAP"] is None  # FiftyOne's mAP would read -1
