"""Operators: evaluate predicted masks against the ground truth, and open TP/FP/FN patches."""

from __future__ import annotations

import fiftyone as fo
import fiftyone.operators as foo
import fiftyone.operators.types as types

from . import api, forms

DEFAULTS = {
    "eval_key": "ntt_eval",
    "classes": [],
    "load_patches": False,
    "patch_type": "all",
}
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

    def resolve_input(self, ctx: foo.ExecutionContext) -> types.Property:
        inputs = types.Object()
        inputs.view_target(ctx, action_description="Evaluate")
        forms.detections_field(
            ctx,
            inputs,
            "pred_field",
            "Predictions",
            "Predicted instances",
            preferred=api.segmented_fields(ctx.dataset),
        )
        gt_field = forms.detections_field(
            ctx, inputs, "gt_field", "Ground truth", "Ground-truth instances"
        )
        inputs.str(
            "eval_key",
            default=DEFAULTS["eval_key"],
            label="Evaluation key",
            description="Names the per-sample <key>_tp/_fp/_fn fields; an existing key is replaced",
        )
        forms.classes_choice(ctx, inputs, gt_field, "Leave empty for every class")
        inputs.bool(
            "load_patches",
            default=DEFAULTS["load_patches"],
            label="Show the TP/FP/FN patches when done",
        )
        return types.Property(inputs, view=types.View(label="Evaluate segmentations"))

    def execute(self, ctx: foo.ExecutionContext) -> dict:
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
        )
        if not ctx.delegated:
            if forms.param(ctx, DEFAULTS, "load_patches"):
                ctx.ops.set_view(evaluation_patches(ctx.dataset, eval_key, "all"))
            else:
                ctx.ops.reload_dataset()
        return api.class_report(results)

    def resolve_output(self, ctx: foo.ExecutionContext) -> types.Property:
        outputs = types.Object()
        outputs.str("eval_key", label="Evaluation key")
        outputs.float("mAP", label="mAP (IoU 0.50:0.95)")
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
            inputs.view("none", types.Warning(label="No evaluation yet: evaluate first"))
            return types.Property(inputs)
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
        eval_key = ctx.params["eval_key"]
        patches = evaluation_patches(
            ctx.dataset, eval_key, forms.param(ctx, DEFAULTS, "patch_type")
        )
        ctx.ops.set_view(patches)
        return {"patches": len(patches)}
