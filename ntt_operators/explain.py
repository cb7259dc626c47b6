"""Operators for finding what went wrong: the review queue and a reference's predictions."""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from . import api, forms
from .api import explain

ORDERS = {
    "margin": "Smallest margin to the runner-up class first",
    "negative": "Most similar to a negative of the class first",
}


def _predictions_field(ctx: foo.ExecutionContext, inputs: types.Object) -> str | None:
    return forms.detections_field(
        ctx,
        inputs,
        "pred_field",
        "Predictions field",
        "A field this plugin segmented",
        preferred=api.segmented_fields(ctx.dataset),
    )


class ReviewPredictions(foo.Operator):
    @property
    def config(self) -> foo.OperatorConfig:
        return foo.OperatorConfig(
            name="review_predictions",
            label="Review predictions",
            description="Show the predictions the method is least sure of first",
            dynamic=True,
        )

    def resolve_input(self, ctx: foo.ExecutionContext) -> types.Property:
        inputs = types.Object()
        _predictions_field(ctx, inputs)
        choices = types.RadioGroup()
        for value, label in ORDERS.items():
            choices.add_choice(value, label=label)
        inputs.enum("order", choices.values(), default="margin", label="Order", view=choices)
        return types.Property(inputs, view=types.View(label="Review predictions"))

    def execute(self, ctx: foo.ExecutionContext) -> dict:
        return forms.reporting_failures(ctx, "Review predictions", lambda: self._run(ctx))

    def _run(self, ctx: foo.ExecutionContext) -> dict:
        order = ctx.params.get("order") or "margin"
        view = explain.review_view(ctx.dataset, ctx.params["pred_field"], order)
        ctx.ops.set_view(view)
        return {"patches": len(view)}

    def resolve_output(self, ctx: foo.ExecutionContext) -> types.Property | None:
        if isinstance(ctx.results, dict) and "error" in ctx.results:
            return forms.failure_outputs("Review predictions")
        return None


class ShowReferencePredictions(foo.Operator):
    @property
    def config(self) -> foo.OperatorConfig:
        return foo.OperatorConfig(
            name="show_reference_predictions",
            label="Show a reference's predictions",
            description="The predictions whose nearest reference is the chosen one",
            dynamic=True,
        )

    def resolve_input(self, ctx: foo.ExecutionContext) -> types.Property:
        inputs = types.Object()
        bank_name = forms.memory_bank(ctx, inputs)
        if not bank_name:
            return types.Property(inputs, view=types.View(label="Show a reference's predictions"))
        bank = api.load_memory_bank(ctx.dataset, bank_name)
        rows = explain.reference_blame(ctx.dataset, bank_name, bank)
        if not rows:
            notice = inputs.view(
                "no_predictions",
                types.Warning(label="No field segmented with this bank carries its reasons yet"),
            )
            notice.invalid = True
            return types.Property(inputs, view=types.View(label="Show a reference's predictions"))
        choices = types.DropdownView()
        for row in rows:  # worst first
            fps = f", {row['false_positives']} FP" if row["false_positives"] is not None else ""
            label = (
                f"{row['reference']} ({row['class']}, {row['field']}: {row['predictions']}{fps})"
            )
            choices.add_choice(f"{row['field']}|{row['reference']}", label=label)
        inputs.enum(
            "reference",
            choices.values(),
            required=True,
            default=choices.values()[0],
            label="Reference",
            view=choices,
        )
        return types.Property(inputs, view=types.View(label="Show a reference's predictions"))

    def execute(self, ctx: foo.ExecutionContext) -> dict:
        return forms.reporting_failures(
            ctx, "Show a reference's predictions", lambda: self._run(ctx)
        )

    def _run(self, ctx: foo.ExecutionContext) -> dict:
        field, reference = ctx.params["reference"].split("|")
        view = explain.reference_view(ctx.dataset, field, reference)
        ctx.ops.set_view(view)
        return {"patches": len(view)}

    def resolve_output(self, ctx: foo.ExecutionContext) -> types.Property | None:
        if isinstance(ctx.results, dict) and "error" in ctx.results:
            return forms.failure_outputs("Show a reference's predictions")
        return None


class IndexLookAlikes(foo.Operator):
    @property
    def config(self) -> foo.OperatorConfig:
        return foo.OperatorConfig(
            name="index_look_alikes",
            label="Index look-alikes",
            description="Similarity index and embeddings map of a field's predictions, from the "
            "cached features (no model runs)",
            dynamic=True,
        )

    def resolve_input(self, ctx: foo.ExecutionContext) -> types.Property:
        inputs = types.Object()
        _predictions_field(ctx, inputs)
        inputs.view(
            "how",
            types.Notice(
                label="Then select a prediction patch and sort by similarity; the Embeddings "
                "panel shows the map. Run again after a re-score: it is rebuilt, not updated"
            ),
        )
        return types.Property(inputs, view=types.View(label="Index look-alikes"))

    def execute(self, ctx: foo.ExecutionContext) -> dict:
        return forms.reporting_failures(ctx, "Index look-alikes", lambda: self._run(ctx))

    def _run(self, ctx: foo.ExecutionContext) -> dict:
        field = ctx.params["pred_field"]
        index = explain.build_similarity_index(ctx.dataset, field)
        drawn = explain.build_embeddings_map(ctx.dataset, field)
        ctx.ops.set_view(ctx.dataset.to_patches(field))
        return {
            "similarity": f"{index['brain_key']}: {index['predictions']} predictions "
            f"({index['seconds']:.1f} s)",
            "map": f"{drawn['brain_key']}: {drawn['method'].upper()} ({drawn['seconds']:.1f} s)",
        }

    def resolve_output(self, ctx: foo.ExecutionContext) -> types.Property:
        def outputs() -> types.Property:
            outputs = forms.titled_outputs("Look-alikes indexed")
            outputs.str("similarity", label="Similarity index")
            outputs.str("map", label="Embeddings map")
            return types.Property(outputs, view=types.View(label="Look-alikes indexed"))

        return forms.outputs_or_failure(ctx, "Index look-alikes", outputs)
