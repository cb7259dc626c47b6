"""Operator: one round of the curation loop, as the panel's *Run round* starts it.

The panel triggers it (``ctx.prompt``): a small round runs at once, streaming its progress into
the panel; a large one opens this form with Schedule as the default, so it runs in the
background (``fiftyone delegated launch``) and its outcome lands in the round history.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import fiftyone.operators as foo
import fiftyone.operators.types as types

from ntt_core import NTTConfig

from . import api, forms
from .api import loop

ROUND_OPERATOR = "@ntt/no_time_to_train/run_round"
MODELS = {
    "paper": ("Paper: SAM2 hiera-large + DINOv2 ViT-L/14", lambda: NTTConfig()),
    "tiny": ("Tiny: SAM2.1 hiera-tiny + ViT-S/14", lambda: NTTConfig.tiny()),
    "tiny_random": ("Tiny, random weights (tests only)", lambda: NTTConfig.tiny(weights="random")),
}
"""The models a first round builds the bank with (later rounds use the bank's)."""
PROGRESS_KEY = "round_progress"
"""The panel state key the round streams its progress line into."""
QUEUE_COMMAND = "fiftyone delegated launch"


def round_params(
    bank: str, reference_field: str, predictions: str, models: str, ground_truth: str | None
) -> dict[str, Any]:
    """The operator's parameters, as the panel passes them."""
    return {
        "bank": bank,
        "reference_field": reference_field,
        "predictions": predictions,
        "models": models,
        "ground_truth": ground_truth,
    }


class RunRound(foo.Operator):
    @property
    def config(self) -> foo.OperatorConfig:
        return foo.OperatorConfig(
            name="run_round",
            label="Run a curation round",
            description="Update the memory bank from the tags, then segment (the panel's round)",
            dynamic=True,
            execute_as_generator=True,
            allow_immediate_execution=True,
            allow_delegated_execution=True,
            unlisted=True,
        )

    def resolve_input(self, ctx: foo.ExecutionContext) -> types.Property:
        """Shown only for a large round: what it will do, and how a scheduled run is started."""
        inputs = types.Object()
        if not ctx.params.get("reference_field"):
            forms.blocking_notice(
                inputs,
                "from_the_panel",
                "Rounds start from the panel",
                "Open the No Time to Train panel (+ next to Samples) and press Run round",
            )
            return types.Property(inputs, view=types.View(label="Run a curation round"))
        plan = self._plan(ctx)
        inputs.view(
            "plan",
            types.Notice(
                label=f"Round {plan['iteration']}: {plan['uncached']} samples need the models",
                description=(
                    "Schedule runs it in the background: start the queue with "
                    f"`{QUEUE_COMMAND}` in a terminal. The panel's round history shows the "
                    "outcome once it has run."
                ),
            ),
        )
        return types.Property(inputs, view=types.View(label="Run a curation round"))

    def resolve_execution_options(self, ctx: foo.ExecutionContext) -> foo.ExecutionOptions:
        large = bool(ctx.params.get("reference_field")) and self._plan(ctx)["large"]
        return forms.execution_options(large)

    def execute(self, ctx: foo.ExecutionContext) -> dict | Iterator:
        steps = loop.iter_run_round(
            ctx.dataset,
            ctx.params["bank"],
            [ctx.params["reference_field"]],
            ctx.params["predictions"],
            config=_models(ctx),
            gt_field=ctx.params.get("ground_truth") or None,
        )
        if ctx.delegated:
            return forms.run_with_progress(ctx, "Curation round", steps, round_outputs)
        return _stream_to_panel(ctx, steps)

    def _plan(self, ctx: foo.ExecutionContext) -> dict[str, Any]:
        params = ctx.params
        return loop.plan_round(ctx.dataset, params["bank"], params["predictions"], _models(ctx))


def _models(ctx: foo.ExecutionContext) -> NTTConfig:
    return MODELS[ctx.params.get("models") or "paper"][1]()


def _stream_to_panel(ctx: foo.ExecutionContext, steps: Iterator) -> Iterator:
    """Each step as one line in the panel, as it happens; the round's summary ends in the
    panel's state, where *Run round*'s callback renders it."""

    # Not set_progress: the App would cover the page with its progress dialog, to be closed
    # by a click after every round.
    def line(fraction: float, label: str) -> Any:
        return ctx.ops.patch_panel_state({PROGRESS_KEY: f"{label} ({fraction:.0%})"})

    try:
        record = yield from api.mapped_steps(steps, line)
    except Exception:
        # Recorded for the field by the round itself (``loop.round_failure``): the panel shows
        # it from there, whenever it renders next.
        yield ctx.ops.patch_panel_state({PROGRESS_KEY: None})
        return
    yield ctx.ops.patch_panel_state({PROGRESS_KEY: None, "last_round": record})


def round_outputs() -> types.Property:
    outputs = forms.titled_outputs("Curation round done")
    for key, label in (
        ("iteration", "Round"),
        ("bank_entries_added", "Bank entries added"),
        ("samples_written", "Samples written"),
        ("predictions_changed", "Predictions changed"),
        ("predictions", "Predictions"),
        ("seconds", "Seconds"),
    ):
        outputs.str(key, label=label)
    return types.Property(outputs)
