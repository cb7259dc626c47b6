"""Operators: evaluate predicted masks against the ground truth, and open TP/FP/FN patches."""

from __future__ import annotations

import fiftyone as fo
import fiftyone.operators as foo
import fiftyone.operators.types as types
from fiftyone.operators.executor import ExecutionOptions

from . import api, forms, messages

DEFAULTS = {
    "eval_key": "ntt_eval",
    "classes": [],
    "load_patches": False,
    "patch_type": "all",
    "overwrite": False,
    "include_unsegmented": False,
}
WORDS = {"overwrite": "Replace an evaluation of that key"}
"""How the form names the API's options, for refusals shown in the App."""
PATCH_TYPES = ("all", "tp", "fp", "fn")


class EvaluateSegmentations(foo.Operator):
    @property
    def config(self) -> foo.OperatorConfig:
        return foo.OperatorConfig(
            name="evaluate_segmentations",
            label="Evaluate segmentations",
            description="COCO-style mask mAP and per-class precision/recall, with TP/FP/FN marks",
            dynamic=True,
            **forms.HEAVY,
        )

    def resolve_execution_options(self, ctx: foo.ExecutionContext) -> ExecutionOptions:
        # No model runs: FiftyOne's evaluation takes seconds, so Execute is the default.
        return forms.execution_options(False)

    def resolve_input(self, ctx: foo.ExecutionContext) -> types.Property:
        inputs = types.Object()
        inputs.view_target(ctx, action_description="Evaluate")
        pred_field = forms.detections_field(
            ctx,
            inputs,
            "pred_field",
            "Predictions",
            "Predicted instances",
            preferred=api.segmented_fields(ctx.dataset),
        )
        gt_field = forms.detections_field(
            ctx,
            inputs,
            "gt_field",
            "Ground truth",
            "Ground-truth instances",
            check=lambda gt: forms.refusal(lambda: _check_fields(ctx, pred_field, gt)),
        )
        eval_key = inputs.str(
            "eval_key",
            default=DEFAULTS["eval_key"],
            label="Evaluation key",
            description="Names the per-sample <key>_tp/_fp/_fn fields",
        )
        inputs.bool("overwrite", default=DEFAULTS["overwrite"], label=WORDS["overwrite"])
        if pred_field and gt_field:
            forms.mark_invalid(
                eval_key,
                forms.refusal(
                    lambda: api.check_evaluation(
                        ctx.dataset,
                        pred_field,
                        gt_field,
                        forms.param(ctx, DEFAULTS, "eval_key"),
                        forms.param(ctx, DEFAULTS, "overwrite"),
                    ),
                    WORDS,
                ),
            )
        _left_out_choice(ctx, inputs, pred_field)
        if pred_field and gt_field:
            _ground_truth_check(ctx, inputs, pred_field, gt_field)
        forms.classes_choice(ctx, inputs, gt_field, "Leave empty for every class")
        inputs.bool(
            "load_patches",
            default=DEFAULTS["load_patches"],
            label="Show the TP/FP/FN patches when done",
        )
        return types.Property(inputs, view=types.View(label="Evaluate segmentations"))

    def execute(self, ctx: foo.ExecutionContext) -> dict:
        return forms.reporting_failures(
            ctx, "Evaluate segmentations", lambda: self._run(ctx), WORDS
        )

    def _run(self, ctx: foo.ExecutionContext) -> dict:
        eval_key = forms.param(ctx, DEFAULTS, "eval_key")
        progress = None
        if ctx.delegated:
            progress = lambda f, label: ctx.set_progress(progress=f, label=label)  # noqa: E731
        results = api.evaluate(
            ctx.target_view(),
            ctx.params["pred_field"],
            ctx.params["gt_field"],
            eval_key,
            classes=forms.param(ctx, DEFAULTS, "classes") or None,
            progress=progress,
            include_unsegmented=forms.param(ctx, DEFAULTS, "include_unsegmented"),
            overwrite=forms.param(ctx, DEFAULTS, "overwrite"),
        )
        if not ctx.delegated:
            if forms.param(ctx, DEFAULTS, "load_patches"):
                ctx.ops.set_view(evaluation_patches(ctx.dataset, eval_key, "all"))
            else:
                ctx.ops.reload_dataset()
        return api.class_report(results)

    def resolve_output(self, ctx: foo.ExecutionContext) -> types.Property:
        return forms.outputs_or_failure(ctx, "Evaluate segmentations", _report_outputs)


def _check_fields(ctx: foo.ExecutionContext, pred_field: str | None, gt_field: str) -> None:
    """The field refusals of ``check_evaluation`` (the key is checked on its own field)."""
    if pred_field:
        api.check_evaluation(ctx.dataset, pred_field, gt_field, "any_key", overwrite=True)


def _left_out_choice(ctx: foo.ExecutionContext, inputs: types.Object, pred_field: str | None):
    """Says which samples the evaluation leaves out (those never segmented), and offers them."""
    tag = api.left_out_tag(ctx.dataset, pred_field) if pred_field else None
    if tag is None:
        return
    inputs.bool(
        "include_unsegmented",
        default=DEFAULTS["include_unsegmented"],
        label=f"Include the samples tagged '{tag}'",
        description="Left out by default: the segmentation skipped them (the references), so "
        "their objects would all count as missed",
    )
    if not forms.param(ctx, DEFAULTS, "include_unsegmented"):
        left_out = len(ctx.target_view()) - len(
            api.segmented_samples(ctx.target_view(), pred_field)
        )
        inputs.view(
            "left_out",
            types.Notice(label=f"{left_out} sample(s) tagged '{tag}' are left out: not segmented"),
        )


def _ground_truth_check(
    ctx: foo.ExecutionContext, inputs: types.Object, pred_field: str, gt_field: str
) -> None:
    """Says, before Execute, when the evaluated samples hold no ground truth, and where it is."""
    tag = api.left_out_tag(ctx.dataset, pred_field)
    include_unsegmented = forms.param(ctx, DEFAULTS, "include_unsegmented")
    message = api.missing_ground_truth(ctx.target_view(), pred_field, gt_field, include_unsegmented)
    if message:
        # Not a refusal: the FP marks still show every prediction in the evaluation patches.
        words = {"include_unsegmented": f"Include the samples tagged '{tag}'"}
        inputs.view(
            "no_ground_truth",
            types.Warning(
                label="No ground truth to evaluate against",
                description=messages.in_form_words(message, words),
            ),
        )


def _report_outputs() -> types.Property:
    outputs = types.Object()
    outputs.str("eval_key", label="Evaluation key")
    outputs.float("mAP", label="mAP (IoU 0.50:0.95)")
    outputs.str("no_ground_truth", label="No ground truth")
    outputs.str("iou_on", label="Instances matched on")
    outputs.str("note", label="Note")
    table = types.TableView()
    for key, label in (
        ("class", "Class"),
        ("precision", "Precision"),
        ("recall", "Recall"),
        ("f1", "F1"),
        ("support", "Support"),
    ):
        table.add_column(key, label=label)
    outputs.list("classes", types.Object(), label="Per class, at IoU 0.50", view=table)
    outputs.view(
        "next",
        types.Notice(label="Run 'Load evaluation patches' to browse the TP/FP/FN instances"),
    )
    return types.Property(outputs, view=types.View(label="Evaluation report"))


def evaluation_patches(dataset: fo.Dataset, eval_key: str, patch_type: str) -> fo.DatasetView:
    """One patch per TP/FP/FN instance of an evaluation, optionally of one type only."""
    patches = dataset.load_evaluation_view(eval_key).to_evaluation_patches(eval_key)
    if patch_type != "all":
        patches = patches.match(fo.ViewField("type") == patch_type)
    return patches


class LoadEvaluationPatches(foo.Operator):
    @property
    def config(self) -> foo.OperatorConfig:
        return foo.OperatorConfig(
            name="load_evaluation_patches",
            label="Load evaluation patches",
            description="Show one patch per true positive, false positive and false negative",
            dynamic=True,
        )

    def resolve_input(self, ctx: foo.ExecutionContext) -> types.Property:
        inputs = types.Object()
        keys = ctx.dataset.list_evaluations()
        if not keys:
            forms.blocking_notice(
                inputs, "none", "No evaluation yet", "run 'Evaluate segmentations' first"
            )
            return types.Property(inputs, view=types.View(label="Load evaluation patches"))
        choices = types.DropdownView()
        for key in keys:
            choices.add_choice(key, label=key)
        inputs.enum(
            "eval_key",
            choices.values(),
            required=True,
            default=keys[-1],
            label="Evaluation",
            view=choices,
        )
        types_choice = types.RadioGroup()
        for value in PATCH_TYPES:
            types_choice.add_choice(value, label=value.upper() if value != "all" else "All")
        inputs.enum(
            "patch_type",
            types_choice.values(),
            default=DEFAULTS["patch_type"],
            label="Show",
            view=types_choice,
        )
        return types.Property(inputs, view=types.View(label="Load evaluation patches"))

    def execute(self, ctx: foo.ExecutionContext) -> dict:
        return forms.reporting_failures(ctx, "Load evaluation patches", lambda: self._run(ctx))

    def _run(self, ctx: foo.ExecutionContext) -> dict:
        patches = evaluation_patches(
            ctx.dataset, ctx.params["eval_key"], forms.param(ctx, DEFAULTS, "patch_type")
        )
        ctx.ops.set_view(patches)
        return {"patches": len(patches)}

    def resolve_output(self, ctx: foo.ExecutionContext) -> types.Property | None:
        # Success shows the patches in the grid; only a failure needs a dialog.
        if isinstance(ctx.results, dict) and "error" in ctx.results:
            return forms.failure_outputs("Load evaluation patches", ctx.results["error"])
        return None
