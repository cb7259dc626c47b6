"""Operators: build a memory bank from tagged references, inspect it, delete it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import fiftyone.operators as foo
import fiftyone.operators.types as types
from fiftyone.operators.executor import ExecutionOptions

from ntt_core import NTTConfig, NTTError
from ntt_core.registry import CHECKPOINTS, resolve_checkpoint

from . import api, forms
from .api.loop import LARGE_ROUND

PRESETS = {
    "paper": NTTConfig,
    "tiny": NTTConfig.tiny,
}
"""``paper``: SAM2 hiera-large + DINOv2 ViT-L/14 at full size; ``tiny``: small and fast."""

DEFAULTS = {
    "bank_name": "ntt_bank",
    "accepted_fields": [],
    "ref_tag": "reference",
    "negative_tag": "negative",
    "tag_type": "label",
    "classes": [],
    "preset": "paper",
    "sam_model": "",
    "encoder_model": "",
    "weights": "official",
    "device": "auto",
    "overwrite": False,
}
WORDS = {"overwrite": "Replace a bank of that name"}
"""How the form names the API's options, for refusals shown in the App."""


def config_from_params(ctx: foo.ExecutionContext) -> NTTConfig:
    """The preset's config with the models/weights/device the user picked."""
    changes = {
        key: forms.param(ctx, DEFAULTS, key)
        for key in ("sam_model", "encoder_model", "weights", "device")
        if forms.param(ctx, DEFAULTS, key)
    }
    return PRESETS[forms.param(ctx, DEFAULTS, "preset")](**changes)


class BuildMemoryBank(foo.Operator):
    @property
    def config(self) -> foo.OperatorConfig:
        return foo.OperatorConfig(
            name="build_memory_bank",
            label="Build memory bank",
            description="Encode the tagged reference instances into a named memory bank",
            dynamic=True,
            execute_as_generator=True,
            **forms.HEAVY,
        )

    def resolve_execution_options(self, ctx: foo.ExecutionContext) -> ExecutionOptions:
        # Encoding a few-shot bank takes seconds: only hundreds of references are worth a queue.
        ref_tag = forms.param(ctx, DEFAULTS, "ref_tag")
        if forms.param(ctx, DEFAULTS, "tag_type") == "sample":
            tagged = ctx.dataset.count_sample_tags().get(ref_tag, 0)
        else:
            tagged = ctx.dataset.count_label_tags().get(ref_tag, 0)
        return forms.execution_options(tagged > LARGE_ROUND)

    def resolve_input(self, ctx: foo.ExecutionContext) -> types.Property:
        inputs = types.Object()
        inputs.view_target(ctx, action_description="Take references from")
        if not api.detection_fields(ctx.dataset):
            # A dataset with no labels yet: say how to draw the first references in the App.
            forms.blocking_notice(
                inputs, "no_field", "No label field to take references from yet", api.NO_FIELD_ROUTE
            )
            return types.Property(inputs, view=types.View(label="Build memory bank"))
        gt_field = forms.detections_field(
            ctx,
            inputs,
            "gt_field",
            "Reference field",
            "Ground truth, or boxes drawn in the App's Annotate tab (SAM2 makes their masks)",
        )
        _accepted_fields_choice(
            ctx,
            inputs,
            [gt_field],
            DEFAULTS["accepted_fields"],
            "E.g. the predictions field: predictions tagged with the reference tag join the "
            "bank with their predicted mask",
        )
        ref_tag = forms.tag_choice(
            ctx, inputs, "ref_tag", DEFAULTS["ref_tag"], label="Reference tag"
        )
        tag_types = types.RadioGroup()
        tag_types.add_choice("label", label="Label tag", description="Only the tagged instances")
        tag_types.add_choice(
            "sample", label="Sample tag", description="Every instance of the tagged samples"
        )
        inputs.enum(
            "tag_type",
            tag_types.values(),
            default=DEFAULTS["tag_type"],
            label="The tag is on",
            view=tag_types,
        )
        forms.tag_choice(
            ctx,
            inputs,
            "negative_tag",
            DEFAULTS["negative_tag"],
            label="Negative tag",
            description="Labels with this tag, in any field (false positives tagged in the grid "
            "or the evaluation patches), teach the bank what a class is not; empty: none",
        )
        classes = forms.classes_choice(
            ctx, inputs, gt_field, "Leave empty for every class referenced"
        )
        if gt_field:
            # Both refusals concern the references; the classes field gets a missing class.
            problem = forms.refusal(
                lambda: api.check_references(
                    ctx.target_view(),
                    [gt_field, *forms.param(ctx, DEFAULTS, "accepted_fields")],
                    forms.param(ctx, DEFAULTS, "ref_tag"),
                    forms.param(ctx, DEFAULTS, "tag_type"),
                    forms.param(ctx, DEFAULTS, "classes"),
                    forms.param(ctx, DEFAULTS, "negative_tag") or None,
                )
            )
            if problem:
                forms.mark_invalid(classes if problem.startswith("Class") else ref_tag, problem)
        name = inputs.str(
            "bank_name",
            default=DEFAULTS["bank_name"],
            label="Bank name",
            description="Letters, digits and underscores",
        )
        inputs.bool("overwrite", default=DEFAULTS["overwrite"], label=WORDS["overwrite"])
        forms.mark_invalid(
            name,
            forms.refusal(
                lambda: api.check_new_bank_name(
                    ctx.dataset,
                    forms.param(ctx, DEFAULTS, "bank_name"),
                    forms.param(ctx, DEFAULTS, "overwrite"),
                ),
                WORDS,
            ),
        )
        model_inputs(ctx, inputs)
        return types.Property(inputs, view=types.View(label="Build memory bank"))

    def execute(self, ctx: foo.ExecutionContext) -> dict | Iterator:
        return forms.run_with_progress(
            ctx, "Build memory bank", self._steps(ctx), bank_outputs, WORDS
        )

    def _steps(self, ctx: foo.ExecutionContext) -> Iterator:
        name = forms.param(ctx, DEFAULTS, "bank_name")
        yield from api.iter_build_memory_bank(
            ctx.target_view(),
            reference_fields(ctx),
            name,
            ref_tag=forms.param(ctx, DEFAULTS, "ref_tag"),
            negative_tag=forms.param(ctx, DEFAULTS, "negative_tag") or None,
            tag_type=forms.param(ctx, DEFAULTS, "tag_type"),
            classes=forms.param(ctx, DEFAULTS, "classes") or None,
            config=config_from_params(ctx),
            overwrite=forms.param(ctx, DEFAULTS, "overwrite"),
        )
        return info_summary(api.memory_bank_info(ctx.dataset, name))

    def resolve_output(self, ctx: foo.ExecutionContext) -> types.Property:
        return bank_outputs()


def reference_fields(ctx: foo.ExecutionContext) -> list[str]:
    """The reference field and the other fields accepted predictions come from, in order."""
    first = ctx.params["gt_field"]
    fields = [first] if isinstance(first, str) else list(first)
    for name in forms.param(ctx, DEFAULTS, "accepted_fields"):
        if name not in fields:
            fields.append(name)
    return fields


def model_inputs(ctx: foo.ExecutionContext, inputs: types.Object) -> None:
    """Models and weights: a preset, optionally with other checkpoints (names or local paths)."""
    inputs.view("models_header", types.Header(label="Models", divider=True))
    presets = types.RadioGroup()
    presets.add_choice("paper", label="Paper", description="SAM2 hiera-large + DINOv2 ViT-L/14")
    presets.add_choice(
        "tiny", label="Tiny", description="SAM2.1 hiera-tiny + ViT-S/14, small inputs"
    )
    inputs.enum(
        "preset", presets.values(), default=DEFAULTS["preset"], label="Preset", view=presets
    )
    for key, kind, label in (
        ("sam_model", "sam2", "SAM2 checkpoint"),
        ("encoder_model", "dinov2", "DINOv2 checkpoint"),
    ):
        names = types.AutocompleteView()
        for name, checkpoint in CHECKPOINTS.items():
            if checkpoint.kind == kind:
                names.add_choice(name, label=name)
        prop = inputs.str(
            key,
            default=DEFAULTS[key],
            label=label,
            description="A registry name or a local checkpoint path; empty: the preset's",
            view=names,
        )
        chosen = forms.param(ctx, DEFAULTS, key)
        if chosen and chosen not in CHECKPOINTS:
            # A local path must exist now; a registry name is fetched when the run needs it.
            forms.mark_invalid(
                prop, forms.refusal(lambda path=chosen: resolve_checkpoint(path, download=False))
            )
    weights = types.RadioGroup()
    weights.add_choice("official", label="Official")
    weights.add_choice("random", label="Random (tests only)")
    inputs.enum(
        "weights", weights.values(), default=DEFAULTS["weights"], label="Weights", view=weights
    )
    forms.device_choice(
        ctx, inputs, DEFAULTS["device"], "auto, cpu, cuda or cuda:N, among this machine's"
    )


def info_summary(info: dict[str, Any]) -> dict[str, Any]:
    """The bank info as the operators show it (JSON-ready, tables as lists of rows)."""
    return {
        "name": info["name"],
        "sam_model": info["sam_model"],
        "encoder": f"{info['encoder']} at {info['encoder_image_size']}px",
        "gt_field": ", ".join(info["ref_fields"]),
        "references": f"{info['num_references']} ({info['masks_from_boxes']} masks from boxes)",
        "negatives": f"{info['num_negatives']} (tag {info['negative_tag']!r})",
        "quality": info["quality"],
        "blame": info.get("blame", []),
    }


def bank_outputs(title: str = "Memory bank built") -> types.Property:
    outputs = forms.titled_outputs(title)
    outputs.str("name", label="Memory bank")
    outputs.str("sam_model", label="SAM2 model (proposals)")
    outputs.str("encoder", label="DINOv2 encoder")
    outputs.str("gt_field", label="Reference fields")
    outputs.str("references", label="References")
    outputs.str("negatives", label="Negatives")
    table = types.TableView()
    for key, label in (
        ("class", "Class"),
        ("references", "References"),
        ("negatives", "Negatives"),
        ("mean_quality", "Mean quality"),
        ("min_quality", "Lowest quality"),
        ("lowest_reference", "Lowest reference (sample:label)"),
    ):
        table.add_column(key, label=label)
    outputs.list("quality", types.Object(), label="References per class", view=table)
    return types.Property(outputs, view=types.View(label=title))


class UpdateMemoryBank(foo.Operator):
    @property
    def config(self) -> foo.OperatorConfig:
        return foo.OperatorConfig(
            name="update_memory_bank",
            label="Update memory bank",
            description="Add the newly tagged references and negatives to a bank, drop the "
            "untagged ones; only what changed is encoded",
            dynamic=True,
            execute_as_generator=True,
            **forms.HEAVY,
        )

    def resolve_input(self, ctx: foo.ExecutionContext) -> types.Property:
        inputs = types.Object()
        bank_name = forms.memory_bank(ctx, inputs)
        if bank_name:
            sources = api.memory_bank_info(ctx.dataset, bank_name)
            # No default: a field joins the bank only when the curator picks it.
            _accepted_fields_choice(
                ctx,
                inputs,
                sources["ref_fields"],
                [],
                "Predictions tagged with the reference tag in these fields join the bank with "
                "their predicted mask (recorded: later updates read them too)",
            )
            inputs.view(
                "sources",
                types.Notice(
                    label=f"Re-reads labels tagged {sources['ref_tag']!r} in "
                    f"{', '.join(sources['ref_fields'])} and labels tagged "
                    f"{sources['negative_tag']!r} in any field, over the whole dataset"
                ),
            )
            _preview(ctx, inputs, bank_name)
        return types.Property(inputs, view=types.View(label="Update memory bank"))

    def resolve_execution_options(self, ctx: foo.ExecutionContext) -> ExecutionOptions:
        # An update encodes only what changed: hundreds of new entries are worth a queue.
        bank_name = ctx.params.get("bank_name")
        add_fields = forms.param(ctx, UPDATE_DEFAULTS, "accepted_fields") or None
        try:
            pending = api.pending_changes(ctx.dataset, bank_name, add_fields)
        except NTTError:
            return forms.execution_options(False)  # the form refuses it before it runs
        added = pending["references_added"] + pending["negatives_added"]
        return forms.execution_options(added > LARGE_ROUND)

    def execute(self, ctx: foo.ExecutionContext) -> dict | Iterator:
        steps = api.iter_update_memory_bank(
            ctx.dataset,
            ctx.params["bank_name"],
            add_fields=forms.param(ctx, UPDATE_DEFAULTS, "accepted_fields") or None,
        )
        return forms.run_with_progress(
            ctx, "Update memory bank", _update_rows(steps), update_outputs
        )

    def resolve_output(self, ctx: foo.ExecutionContext) -> types.Property:
        return update_outputs()


UPDATE_DEFAULTS = {"accepted_fields": None}


def _preview(ctx: foo.ExecutionContext, inputs: types.Object, bank_name: str) -> None:
    """What Execute will change, per field and class, so a tag in an unexpected field is seen
    before it counts; an update the API would refuse disables Execute."""
    add_fields = forms.param(ctx, UPDATE_DEFAULTS, "accepted_fields") or None
    try:
        pending = api.pending_changes(ctx.dataset, bank_name, add_fields)
    except NTTError as error:
        forms.blocking_notice(inputs, "refused", "This update cannot run", str(error))
        return
    text = preview_markdown(pending)
    # The App keeps a property's first value: a name per content shows the preview afresh.
    inputs.md(text, name=f"preview_{hashlib.sha1(text.encode()).hexdigest()[:12]}")


def preview_markdown(pending: dict[str, Any]) -> str:
    """The pending changes as the Update form shows them."""
    if pending["nothing_changed"]:
        text = "**Nothing changed** since the last update: Execute leaves the bank as it is."
    else:
        rows = [
            f"| {row['field'] or '(label deleted)'} | {row['class']} | {row['role']} | "
            f"{'+' if row['change'] == 'added' else '-'}{row['count']} |"
            for row in pending["rows"]
        ]
        fields = "".join(
            f"\n\nReferences will be read from {f!r} from now on." for f in pending["fields_added"]
        )
        text = (
            f"**Execute will change** ({pending['references_added']} reference(s) and "
            f"{pending['negatives_added']} negative(s) added, {pending['removed']} removed):\n\n"
            "| Field | Class | Role | Change |\n|---|---|---|---|\n" + "\n".join(rows) + fields
        )
    ignored = ", ".join(f"{n} in {f!r}" for f, n in pending.get("ignored", {}).items())
    if ignored:
        text += (
            f"\n\nIgnored: labels tagged as references in fields this bank does not read "
            f"({ignored}); add the field above to take them"
        )
    return text


def _accepted_fields_choice(
    ctx: foo.ExecutionContext,
    inputs: types.Object,
    ref_fields: list[str],
    default: list[str],
    description: str,
) -> None:
    """The other Detections fields, to accept predictions tagged as references from."""
    others = [f for f in api.detection_fields(ctx.dataset) if f not in ref_fields]
    if not others:
        return
    choices = types.AutocompleteView(allow_duplicates=False)
    for name in others:
        choices.add_choice(name, label=name)
    inputs.list(
        "accepted_fields",
        types.String(),
        default=[f for f in default if f in others],
        label="Also take references from",
        description=description,
        view=choices,
    )


def _update_rows(steps: Iterator) -> Iterator:
    """The update summary with counts the App can show (the ids stay in the record)."""
    summary = yield from steps
    for key in ("added", "removed", "re_encoded", "kept_vanished"):
        summary[key] = len(summary[key])
    summary["outcome"] = (
        "Nothing changed since the last update: the bank and its record are as they were"
        if summary.pop("nothing_changed")
        else f"{summary['added']} entries added, {summary['removed']} removed"
    )
    return summary


def update_outputs() -> types.Property:
    outputs = forms.titled_outputs("Memory bank updated")
    outputs.str("bank_name", label="Memory bank")
    outputs.str("outcome", label="Outcome")
    outputs.int("added", label="Entries added")
    outputs.int("removed", label="Entries removed (untagged)")
    outputs.int("re_encoded", label="Entries re-encoded (class changed)")
    outputs.int("kept_vanished", label="Entries kept whose label is gone")
    outputs.int("references", label="References")
    outputs.int("negatives", label="Negatives")
    outputs.int("encoded", label="Encoded now")
    outputs.view(
        "next",
        types.Notice(
            label="Run 'Segment with references' with cached proposals and 'Update the field "
            "in place' to see the effect in seconds"
        ),
    )
    return types.Property(outputs, view=types.View(label="Memory bank updated"))


class GetMemoryBankInfo(foo.Operator):
    @property
    def config(self) -> foo.OperatorConfig:
        return foo.OperatorConfig(
            name="get_memory_bank_info",
            label="Get memory bank info",
            description="Classes, references per class, encoder and reference quality of a bank",
            dynamic=True,
        )

    def resolve_input(self, ctx: foo.ExecutionContext) -> types.Property:
        inputs = types.Object()
        forms.memory_bank(ctx, inputs)
        return types.Property(inputs, view=types.View(label="Get memory bank info"))

    def execute(self, ctx: foo.ExecutionContext) -> dict:
        return forms.reporting_failures(
            ctx,
            "Get memory bank info",
            lambda: info_summary(api.memory_bank_info(ctx.dataset, ctx.params["bank_name"])),
            WORDS,
        )

    def resolve_output(self, ctx: foo.ExecutionContext) -> types.Property:
        return forms.outputs_or_failure(ctx, "Get memory bank info", _info_outputs)


def _info_outputs() -> types.Property:
    """The bank's outputs and, per reference, the predictions it is nearest to (its blame)."""
    info = bank_outputs("Memory bank info")
    table = types.TableView()
    for key, label in (
        ("reference", "Reference (label id)"),
        ("class", "Class"),
        ("field", "Predictions field"),
        ("predictions", "Predictions it is nearest to"),
        ("false_positives", "Of which false positives"),
    ):
        table.add_column(key, label=label)
    info.type.list(
        "blame",
        types.Object(),
        label="Which reference drives which predictions (worst first)",
        description="'Show a reference's predictions' opens them in the grid",
        view=table,
    )
    return info


class DeleteMemoryBank(foo.Operator):
    @property
    def config(self) -> foo.OperatorConfig:
        return foo.OperatorConfig(
            name="delete_memory_bank",
            label="Delete memory bank",
            description="Delete a memory bank; fields it produced are kept",
            dynamic=True,
        )

    def resolve_input(self, ctx: foo.ExecutionContext) -> types.Property:
        inputs = types.Object()
        if forms.memory_bank(ctx, inputs):
            confirm = inputs.bool(
                "confirm",
                default=False,
                label="Yes, delete this memory bank",
                description="This cannot be undone; fields segmented with it are kept",
            )
            if not ctx.params.get("confirm"):
                forms.mark_invalid(confirm, "Tick to confirm the deletion")
        return types.Property(inputs, view=types.View(label="Delete memory bank"))

    def execute(self, ctx: foo.ExecutionContext) -> dict:
        return forms.reporting_failures(
            ctx,
            "Delete memory bank",
            lambda: _deleted_summary(api.delete_memory_bank(ctx.dataset, ctx.params["bank_name"])),
        )

    def resolve_output(self, ctx: foo.ExecutionContext) -> types.Property:
        return forms.outputs_or_failure(ctx, "Delete memory bank", _deleted_outputs)


def _deleted_summary(deleted: dict[str, Any]) -> dict[str, Any]:
    classes = ", ".join(deleted["classes"])
    return {
        "deleted": deleted["deleted"],
        "contents": f"{deleted['num_references']} references of {classes}",
    }


def _deleted_outputs() -> types.Property:
    outputs = types.Object()
    outputs.str("deleted", label="Deleted memory bank")
    outputs.str("contents", label="It held")
    outputs.view("kept", types.Notice(label="Fields segmented with it are kept"))
    return types.Property(outputs, view=types.View(label="Memory bank deleted"))
