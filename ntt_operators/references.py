"""Operator: sample N references per class the paper's few-shot way, and tag them."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from . import api, forms

DEFAULTS = {
    "shots": 1,
    "seed": 33,
    "tag": "reference",
    "classes": [],
    "tag_samples": True,
    "tag_labels": True,
    "replace_tags": False,
}


class SampleReferences(foo.Operator):
    @property
    def config(self) -> foo.OperatorConfig:
        return foo.OperatorConfig(
            name="sample_references",
            label="Sample references",
            description="Tag N reference instances per class, drawn reproducibly with a seed",
            dynamic=True,
            allow_immediate_execution=True,
            allow_delegated_execution=True,
        )

    def resolve_input(self, ctx: foo.ExecutionContext) -> types.Property:
        inputs = types.Object()
        inputs.view_target(ctx, action_description="Sample references from")
        gt_field = forms.detections_field(
            ctx, inputs, "gt_field", "Ground truth field", "The instances to draw references from"
        )
        inputs.int("shots", default=DEFAULTS["shots"], min=1, label="Shots per class")
        inputs.int(
            "seed",
            default=DEFAULTS["seed"],
            label="Seed",
            description="The same seed on the same samples draws the same references",
        )
        tag = forms.tag_choice(
            ctx,
            inputs,
            "tag",
            DEFAULTS["tag"],
            label="Tag",
            description="Replaces this tag's previous draw in the target samples",
        )
        forms.classes_choice(ctx, inputs, gt_field, "Leave empty for every class")
        inputs.bool("tag_samples", default=DEFAULTS["tag_samples"], label="Tag the samples")
        inputs.bool("tag_labels", default=DEFAULTS["tag_labels"], label="Tag the instances")
        inputs.bool(
            "replace_tags",
            default=DEFAULTS["replace_tags"],
            label="Replace tags placed by hand",
            description="Off: refuse when the tag is already on labels or samples that "
            "Sample references did not tag",
        )
        if gt_field:
            forms.mark_invalid(
                tag,
                forms.refusal(
                    lambda: api.check_sampling(
                        ctx.target_view(),
                        gt_field,
                        forms.param(ctx, DEFAULTS, "tag"),
                        forms.param(ctx, DEFAULTS, "tag_samples"),
                        forms.param(ctx, DEFAULTS, "tag_labels"),
                        forms.param(ctx, DEFAULTS, "replace_tags"),
                        forms.param(ctx, DEFAULTS, "classes"),
                    )
                ),
            )
        return types.Property(inputs, view=types.View(label="Sample references"))

    def execute(self, ctx: foo.ExecutionContext) -> dict:
        return forms.reporting_failures(ctx, "Sample references", lambda: self._run(ctx))

    def _run(self, ctx: foo.ExecutionContext) -> dict:
        picks = api.sample_references(
            ctx.target_view(),
            ctx.params["gt_field"],
            shots=forms.param(ctx, DEFAULTS, "shots"),
            seed=forms.param(ctx, DEFAULTS, "seed"),
            tag=forms.param(ctx, DEFAULTS, "tag"),
            classes=forms.param(ctx, DEFAULTS, "classes") or None,
            tag_samples=forms.param(ctx, DEFAULTS, "tag_samples"),
            tag_labels=forms.param(ctx, DEFAULTS, "tag_labels"),
            replace_tags=forms.param(ctx, DEFAULTS, "replace_tags"),
        )
        if not ctx.delegated:
            ctx.ops.reload_dataset()
        return {
            "tag": forms.param(ctx, DEFAULTS, "tag"),
            "references": [{"class": c, "count": len(ids)} for c, ids in picks.items()],
            "label_ids": picks,
        }

    def resolve_output(self, ctx: foo.ExecutionContext) -> types.Property:
        return forms.outputs_or_failure(ctx, "Sample references", _sampled_outputs)


def _sampled_outputs() -> types.Property:
    outputs = types.Object()
    outputs.str("tag", label="Tag")
    table = types.TableView()
    table.add_column("class", label="Class")
    table.add_column("count", label="References")
    outputs.list("references", types.Object(), label="References per class", view=table)
    return types.Property(outputs, view=types.View(label="References sampled"))
