"""The "No Time to Train" panel: the curation loop in one place, opened from the + next to Samples.

Two screens, chosen by the dataset: a start screen while it has no ``fo.Detections`` field (create
one with your classes, then draw in the Annotate tab), then the loop: where it stands, the
selection marked as references or negatives, one click per round, the outcome, what to look at
next. Every handler calls ``ntt_operators.api`` (the functions a script calls), then stores what
happened in the panel's state; the state holds only the curator's choices and the last outcome.
"""

from __future__ import annotations

from typing import Any

import fiftyone.operators as foo
import fiftyone.operators.types as types
from fiftyone import ViewField as F

from ntt_core import NTTConfig

from . import api, messages
from .api import loop
from .evaluate import evaluation_patches
from .proposal_cache import cached_proposal_count
from .rounds import MODELS, PROGRESS_KEY, QUEUE_COMMAND, ROUND_OPERATOR, round_params
from .terminal import plural

PANEL_NAME = "no_time_to_train"
DEFAULTS = {
    "bank": "ntt_bank",
    "predictions": "ntt_predictions",
    "new_field": "boxes",
    "models": "paper",
    "shots": 1,
}


def state(ctx: foo.ExecutionContext, key: str) -> Any:
    value = ctx.panel.state.get(key)
    return DEFAULTS.get(key) if value in (None, "") else value


class NoTimeToTrainPanel(foo.Panel):
    @property
    def config(self) -> foo.PanelConfig:
        return foo.PanelConfig(
            name=PANEL_NAME,
            label="No Time to Train",
            icon="auto_fix_high",
            help_markdown=(
                "Training-free instance segmentation from a few references: mark references and "
                "negatives, run a round, review, repeat."
            ),
        )

    # -- events -------------------------------------------------------------------------------

    def on_load(self, ctx: foo.ExecutionContext) -> None:
        ctx.panel.state.set("reference_field", self._reference_field(ctx))

    def on_change_selected_labels(self, ctx: foo.ExecutionContext) -> None:
        pass  # the render after each event counts the selection

    def on_change_selected(self, ctx: foo.ExecutionContext) -> None:
        pass

    def on_change_dataset(self, ctx: foo.ExecutionContext) -> None:
        ctx.panel.state.clear()
        self.on_load(ctx)

    def create_field(self, ctx: foo.ExecutionContext) -> None:
        name = state(ctx, "new_field")
        classes = (state(ctx, "new_classes") or "").split(",")
        if self._attempt(ctx, lambda: loop.create_label_field(ctx.dataset, name, classes)):
            ctx.panel.state.set("reference_field", name)
            ctx.panel.state.set("created", name)
            ctx.ops.reload_dataset()

    def sample_references(self, ctx: foo.ExecutionContext) -> None:
        field = self._reference_field(ctx)
        shots = int(state(ctx, "shots"))
        if self._attempt(ctx, lambda: api.sample_references(ctx.dataset, field, shots)):
            ctx.ops.reload_samples()

    def mark_reference(self, ctx: foo.ExecutionContext) -> None:
        self._mark(ctx, loop.REFERENCE)

    def mark_negative(self, ctx: foo.ExecutionContext) -> None:
        self._mark(ctx, loop.NEGATIVE)

    def clear_marks(self, ctx: foo.ExecutionContext) -> None:
        self._mark(ctx, None)

    def _mark(self, ctx: foo.ExecutionContext, role: str | None) -> None:
        marked = self._attempt(ctx, lambda: self._mark_selection(ctx, role))
        if marked is not None:
            what = {None: "cleared", loop.REFERENCE: "references", loop.NEGATIVE: "negatives"}
            ctx.panel.state.set("notice", f"{marked} label(s) marked: {what[role]}")
            ctx.ops.clear_selected_labels()
            ctx.ops.clear_selected_samples()
            ctx.ops.reload_samples()

    def _mark_selection(self, ctx: foo.ExecutionContext, role: str | None) -> int:
        """The selected labels of the named fields; with no label selected, the predictions of
        the patches ticked in the *Review* grid, or else every label of the reference field in
        the selected samples (never a negative: pick those one by one)."""
        fields = self._named_fields(ctx)
        if any(s.get("field") in fields for s in ctx.selected_labels) or not ctx.selected:
            return loop.mark_labels(ctx.dataset, ctx.selected_labels, fields, role)
        predictions = state(ctx, "predictions")
        if ctx.view._is_patches and ctx.view.has_field(predictions):
            # The Review grid: each ticked patch is one prediction.
            labels = loop.patch_labels(ctx.view, ctx.selected, predictions)
            return loop.mark_labels(ctx.dataset, labels, fields, role)
        if role == loop.NEGATIVE:
            raise api.PluginInputError(
                "Select the labels to mark negative (click them in the sample), not samples"
            )
        return loop.mark_samples(ctx.dataset, ctx.selected, self._reference_field(ctx), role)

    def run_round(self, ctx: foo.ExecutionContext) -> None:
        """Starts the round operator: a small round at once (its progress streams into the
        panel), a large one through its form, where Schedule is the default."""
        bank, predictions = state(ctx, "bank"), state(ctx, "predictions")
        plan = self._attempt(
            ctx, lambda: loop.plan_round(ctx.dataset, bank, predictions, self._config(ctx))
        )
        if plan is None:
            return
        ctx.panel.state.set("last_round", None)
        if not plan["large"]:
            ctx.panel.state.set(PROGRESS_KEY, f"Round {plan['iteration']}: starting")
        params = round_params(
            bank,
            self._reference_field(ctx),
            predictions,
            state(ctx, "models"),
            self._ground_truth(ctx),
        )
        ctx.prompt(
            ROUND_OPERATOR,
            params=params,
            on_success=self.round_ended,
            on_error=self.round_failed,
            skip_prompt=not plan["large"],
        )

    def round_ended(self, ctx: foo.ExecutionContext) -> None:
        """After the round operator: it left its summary in the panel's state and any failure
        in the dataset (``loop.round_failure``); a scheduled round has not run yet."""
        result = ctx.params.get("result")
        if isinstance(result, dict) and "run_state" in result:
            ctx.panel.state.set(
                "notice",
                f"Round scheduled: start the queue with `{QUEUE_COMMAND}` in a terminal; the "
                "round history shows its outcome once it has run",
            )
        ctx.panel.state.set(PROGRESS_KEY, None)
        ctx.ops.reload_dataset()

    def round_failed(self, ctx: foo.ExecutionContext) -> None:
        ctx.panel.state.set(PROGRESS_KEY, None)
        error = ctx.params.get("error") or "the App server's log has the details"
        ctx.panel.state.set("error", f"The round failed: {error}")

    def choose_bank(self, ctx: foo.ExecutionContext) -> None:
        """Another bank: the loop goes on in the newest field segmented with it."""
        bank = ctx.params.get("value") or state(ctx, "bank")
        ctx.panel.state.set("bank", bank)
        predictions = loop.predictions_of_bank(ctx.dataset, bank) or f"{bank}_predictions"
        ctx.panel.state.set("predictions", predictions)
        ctx.panel.state.set("last_round", None)

    def show_references(self, ctx: foo.ExecutionContext) -> None:
        ctx.ops.set_view(loop.tagged_view(ctx.dataset, loop.REFERENCE, self._named_fields(ctx)))

    def show_negatives(self, ctx: foo.ExecutionContext) -> None:
        ctx.ops.set_view(loop.tagged_view(ctx.dataset, loop.NEGATIVE, self._named_fields(ctx)))

    def review(self, ctx: foo.ExecutionContext) -> None:
        view, order = loop.review_view(ctx.dataset, state(ctx, "predictions"))
        ctx.panel.state.set("notice", order)
        ctx.ops.set_view(view)

    def show_evaluation(self, ctx: foo.ExecutionContext) -> None:
        patches = self._attempt(
            ctx, lambda: evaluation_patches(ctx.dataset, loop.ROUND_EVAL_KEY, "all")
        )
        if patches is not None:
            ctx.ops.set_view(patches)

    def show_all(self, ctx: foo.ExecutionContext) -> None:
        ctx.ops.clear_view()

    def _attempt(self, ctx: foo.ExecutionContext, action) -> Any:
        """Runs ``action``, returns its result; a failure becomes its sentence in the panel
        (None returned)."""
        ctx.panel.state.set("error", None)
        ctx.panel.state.set("notice", None)
        try:
            result = action()
        except Exception as error:
            ctx.panel.state.set("error", messages.sentence(error))
            return None
        return result

    # -- what the panel names -----------------------------------------------------------------

    def _reference_field(self, ctx: foo.ExecutionContext) -> str | None:
        """The field references are drawn or tagged in: the curator's, else the first
        ``fo.Detections`` field this plugin did not write."""
        chosen = ctx.panel.state.get("reference_field")
        fields = api.detection_fields(ctx.dataset)
        if chosen in fields:
            return chosen
        ours = set(api.segmented_fields(ctx.dataset))
        return next((f for f in fields if f not in ours), None)

    def _named_fields(self, ctx: foo.ExecutionContext) -> list[str]:
        """The fields the selection buttons act on: the reference field and the predictions."""
        return [f for f in (self._reference_field(ctx), state(ctx, "predictions")) if f]

    def _ground_truth(self, ctx: foo.ExecutionContext) -> str | None:
        """The reference field when it labels at least half of the samples (ground truth to
        sample references from and evaluate against); None for a few boxes drawn by hand."""
        field = self._reference_field(ctx)
        if field is None:
            return None
        labelled = len(ctx.dataset.match(F(f"{field}.detections").length() > 0))
        return field if labelled and 2 * labelled >= len(ctx.dataset) else None

    def _config(self, ctx: foo.ExecutionContext) -> NTTConfig:
        return MODELS[state(ctx, "models")][1]()

    # -- render -------------------------------------------------------------------------------

    def render(self, ctx: foo.ExecutionContext) -> types.Property:
        panel = types.Object()
        if self._reference_field(ctx) is None:
            self._render_start(ctx, panel)
        else:
            self._render_loop(ctx, panel)
        if ctx.panel.state.get(PROGRESS_KEY):
            # Bound to the state key the running round patches: the line follows the round.
            panel.md(ctx.panel.state.get(PROGRESS_KEY), name=PROGRESS_KEY)
        # A property's name is also a state key: these names differ from the state's keys.
        for key, view in (("error", types.Error), ("notice", types.Notice)):
            if ctx.panel.state.get(key):
                panel.view(f"{key}_message", view(label=ctx.panel.state.get(key)))
        return types.Property(panel, view=types.GridView(orientation="vertical"))

    def _render_start(self, ctx: foo.ExecutionContext, panel: types.Object) -> None:
        panel.md(
            "This dataset has no `fo.Detections` field yet. Create one with your classes, then "
            "draw a few boxes in it.",
            name="start",
        )
        panel.str("new_field", label="Field name", default=DEFAULTS["new_field"])
        panel.str("new_classes", label="Classes", description="Comma-separated, e.g. cat, dog")
        panel.btn(
            "create_field", label="Create field", on_click=self.create_field, variant="contained"
        )

    def _render_loop(self, ctx: foo.ExecutionContext, panel: types.Object) -> None:
        dataset = ctx.dataset
        field = self._reference_field(ctx)
        predictions = state(ctx, "predictions")
        bank = state(ctx, "bank")
        if ctx.panel.state.get("created") == field and bank not in api.list_memory_banks(dataset):
            panel.md(_NEXT_AFTER_CREATE.format(field=field), name="next_steps")
        banks = api.list_memory_banks(dataset)
        if len(set(banks) | {bank}) > 1:
            choices = types.DropdownView()
            for name in sorted(set(banks) | {bank}):
                choices.add_choice(name, label=name)
            panel.enum(
                "bank",
                choices.values(),
                default=bank,
                label="Memory bank",
                view=choices,
                on_change=self.choose_bank,
            )
        panel.md(self._where_it_stands(ctx, field, bank, predictions), name="status")
        panel.md(_class_table(loop.tagged_per_class(dataset, [field, predictions])), name="classes")
        row = panel.h_stack("show", align_x="left")
        row.btn("show_references", label="Show references", on_click=self.show_references)
        row.btn("show_negatives", label="Show negatives", on_click=self.show_negatives)
        row.btn("show_all", label="Show all samples", on_click=self.show_all)
        if self._ground_truth(ctx) and bank not in api.list_memory_banks(dataset):
            panel.int("shots", label="References per class", default=DEFAULTS["shots"])
            panel.btn(
                "sample_references", label="Sample references", on_click=self.sample_references
            )

        selected = [s for s in ctx.selected_labels if s.get("field") in self._named_fields(ctx)]
        fields = " and ".join(f"'{f}'" for f in self._named_fields(ctx))
        samples = f", {len(ctx.selected)} sample(s)" if ctx.selected and not selected else ""
        panel.md(
            f"**Selection:** {len(selected)} label(s) selected in {fields}{samples}",
            name="selection",
        )
        marks = panel.h_stack("marks", align_x="left")
        marks.btn(
            "mark_reference", label="Reference", on_click=self.mark_reference, variant="contained"
        )
        marks.btn(
            "mark_negative", label="Negative", on_click=self.mark_negative, variant="contained"
        )
        marks.btn("clear_marks", label="Clear", on_click=self.clear_marks)

        if bank not in api.list_memory_banks(dataset):
            self._render_models(panel)
        plan = self._attempt_plan(ctx, bank, predictions)
        if plan is not None:
            panel.md(_describe_plan(plan), name="plan")
            if plan["large"]:
                panel.view("large", types.Warning(label=_LARGE.format(n=plan["uncached"])))
            panel.btn(
                "run_round",
                label=f"Run round {plan['iteration']}",
                on_click=self.run_round,
                variant="contained",
            )

        failure = loop.round_failure(dataset, predictions)
        if failure:
            panel.view("round_failure", types.Error(label=failure))
        last = ctx.panel.state.get("last_round")
        history = loop.round_history(dataset, predictions)
        if last or history:
            panel.md(_round_summary(last or history[-1]), name="round_summary")
            panel.md(_history_table(history), name="history")
            after = panel.h_stack("after", align_x="left")
            after.btn("review", label="Review", on_click=self.review, variant="contained")
            if loop.ROUND_EVAL_KEY in dataset.list_evaluations():
                after.btn("show_evaluation", label="Evaluate", on_click=self.show_evaluation)

    def _render_models(self, panel: types.Object) -> None:
        choices = types.RadioGroup()
        for key, (label, _) in MODELS.items():
            choices.add_choice(key, label=label)
        panel.enum(
            "models", choices.values(), default=DEFAULTS["models"], label="Models", view=choices
        )

    def _pending(self, ctx: foo.ExecutionContext, bank: str, predictions: str) -> str:
        """What an update would change, in words; what the update would refuse, as its sentence."""
        try:
            accepted = loop.accepted_fields(ctx.dataset, predictions)
            return loop.describe_pending(api.pending_changes(ctx.dataset, bank, accepted))
        except Exception as error:
            return messages.sentence(error)

    def _attempt_plan(self, ctx: foo.ExecutionContext, bank: str, predictions: str) -> dict | None:
        try:
            return loop.plan_round(ctx.dataset, bank, predictions, self._config(ctx))
        except Exception as error:
            ctx.panel.state.set("error", messages.sentence(error))
            return None

    def _where_it_stands(
        self, ctx: foo.ExecutionContext, field: str, bank: str, predictions: str
    ) -> str:
        dataset = ctx.dataset
        banks = api.list_memory_banks(dataset)
        lines = [f"**Reference field:** `{field}`  ·  **Predictions:** `{predictions}`"]
        if bank not in banks:
            others = f" (other banks: {', '.join(banks)})" if banks else ""
            lines.append(f"**Bank:** `{bank}` is not built yet{others}")
        else:
            info = api.memory_bank_config(dataset, bank)
            cfg = info["ntt_config"]
            lines.append(
                f"**Bank:** `{bank}`: {plural(info['num_references'], 'reference')}, "
                f"{plural(info.get('num_negatives', 0), 'negative')}, "
                f"classes {', '.join(info['classes'])}"
            )
            lines.append(f"**Models:** {cfg['sam_model']} + {info['encoder']}")
            lines.append(f"**Tags:** {self._pending(ctx, bank, predictions)}")
        status = api.segment_status(dataset, predictions)
        if status:
            # The field, not the last run: a re-score's run counts only the samples it scored.
            held = dataset.count(f"{predictions}.detections")
            cached = cached_proposal_count(dataset)
            lines.append(
                f"**`{predictions}`:** last run {status['status']} "
                f"({plural(status['processed'], 'sample')}); the field holds "
                f"{plural(held, 'prediction')}; {plural(cached, 'sample')} with cached proposals"
            )
        return "\n\n".join(lines)


_NEXT_AFTER_CREATE = (
    "**Next:** field `{field}` is ready for the box tool (no reload needed). Open a sample, "
    "*Annotate* tab, pick the box tool and drag a box around each object. Then, in the *Explore* "
    "tab, click the boxes to select them, click outside the sample to close it (Escape would "
    "clear the selection) and press *Reference* here. Then *Run round*."
)
_LARGE = (
    "{n} samples have no cached proposals: this round loads the models and may take long. "
    "Run round opens its form with Schedule as the default, to run it in the background"
)


def _describe_plan(plan: dict) -> str:
    bank = "build the bank" if plan["build"] else "update the bank from the tags"
    how = {
        "new": "segment with proposals cached",
        "rescore": "re-score in place from the cache",
    }[plan["mode"].value]
    return (
        f"**Next round ({plan['iteration']}):** {bank}, then {how}: {plan['targets']} samples, "
        f"{plan['targets'] - plan['uncached']} with cached proposals"
    )


def _class_table(rows: list[dict]) -> str:
    if not rows:
        return "No label is tagged as a reference or a negative yet."
    lines = ["| class | references | negatives |", "|---|---|---|"]
    lines += [f"| {r['class']} | {r['references']} | {r['negatives']} |" for r in rows]
    return "\n".join(lines)


def _round_summary(record: dict) -> str:
    return (
        f"**Round {record['iteration']} done** in {record['seconds']} s: "
        f"{record['bank_entries_added']} bank "
        f"{'entry' if record['bank_entries_added'] == 1 else 'entries'} added, "
        f"{record['samples_written']} samples written, "
        f"{record['predictions_changed']} predictions changed label or confidence, "
        f"{record['predictions']} predictions"
        + (f", {record['failed']} samples failed" if record["failed"] else "")
    )


def _history_table(history: list[dict]) -> str:
    lines = [
        "| round | bank (refs / negs) | predictions | changed | mAP |",
        "|---|---|---|---|---|",
    ]
    for r in history:
        score = "—" if r.get("mAP") is None else f"{r['mAP']:.3f}"
        lines.append(
            f"| {r['iteration']} | {r['references']} / {r['negatives']} | {r['predictions']} "
            f"| {r['predictions_changed']} | {score} |"
        )
    return "\n".join(lines)
