"""Operator: segment target samples with a memory bank into a new instance-mask field."""

from __future__ import annotations

from collections.abc import Iterator

import fiftyone.operators as foo
import fiftyone.operators.types as types
from fiftyone.operators.executor import ExecutionOptions

from ntt_core import NTTConfig

from . import api, forms
from .api import loop
from .api.request import RayOptions, SegmentMode, SegmentRequest
from .proposal_cache import ProposalCache, cached_proposal_count, clear_proposal_cache

DEFAULTS = {
    "label_field": "ntt_predictions",
    "exclude_tag": "reference",
    "overwrite": False,
    "skip_done": False,
    "reuse_proposals": False,
    "rescore": False,
    "batch_size": 16,
    "device": "",
    "backend": "local",
    "ray_address": "",
    "num_actors": 2,
    "gpus_per_actor": None,
}
WORDS = {
    "overwrite": "Replace the field if it exists",
    "skip_done": "Skip samples already done",
    "rescore": "Update the field in place (keeps your tags)",
}
"""How the form names the API's options, for refusals shown in the App."""


class SegmentWithReferences(foo.Operator):
    @property
    def config(self) -> foo.OperatorConfig:
        return foo.OperatorConfig(
            name="segment_with_references",
            label="Segment with references",
            description="Predict instance masks of the memory bank's classes into a new field",
            dynamic=True,
            execute_as_generator=True,
            **forms.HEAVY,
        )

    def resolve_execution_options(self, ctx: foo.ExecutionContext) -> ExecutionOptions:
        return forms.execution_options(_needs_models_on_many(ctx))

    def resolve_input(self, ctx: foo.ExecutionContext) -> types.Property:
        inputs = types.Object()
        inputs.view_target(ctx, action_description="Segment")
        bank_name = forms.memory_bank(ctx, inputs)
        output_field = inputs.str(
            "label_field",
            default=DEFAULTS["label_field"],
            required=True,
            label="Output field",
            description="A new fo.Detections field; the ground truth is never written",
        )
        if bank_name:
            forms.mark_invalid(
                output_field,
                forms.refusal(
                    lambda: api.check_output_field(
                        ctx.dataset,
                        bank_name,
                        forms.param(ctx, DEFAULTS, "label_field"),
                        forms.param(ctx, DEFAULTS, "overwrite"),
                        forms.param(ctx, DEFAULTS, "skip_done"),
                        forms.param(ctx, DEFAULTS, "rescore"),
                    ),
                    WORDS,
                ),
            )
        exclude = forms.tag_choice(
            ctx,
            inputs,
            "exclude_tag",
            DEFAULTS["exclude_tag"],
            label="Skip samples tagged",
            description="Samples with this sample or label tag (the references) are not "
            "segmented; empty: segment every target sample",
        )
        forms.mark_invalid(
            exclude,
            forms.refusal(
                lambda: api.segment_targets(
                    ctx.target_view(), forms.param(ctx, DEFAULTS, "exclude_tag") or None
                )
            ),
        )
        inputs.bool(
            "skip_done",
            default=DEFAULTS["skip_done"],
            label=WORDS["skip_done"],
            description="Continue an interrupted run into the same field",
        )
        inputs.bool(
            "overwrite",
            default=DEFAULTS["overwrite"],
            label=WORDS["overwrite"],
        )
        inputs.bool(
            "rescore",
            default=DEFAULTS["rescore"],
            label=WORDS["rescore"],
            description="Re-score the targets into this plugin's existing field: predictions "
            "that persist keep their id and tags (e.g. 'negative'), only changed samples are "
            "written, references are left alone",
        )
        inputs.bool(
            "reuse_proposals",
            default=DEFAULTS["reuse_proposals"],
            label="Re-use cached proposals",
            description="Keep each image's SAM2 proposals and re-score them with later banks: "
            "after adding or removing references, only the matching reruns (local backend)",
        )
        inputs.view(
            "advanced_header",
            types.Header(
                label="Advanced", description="Where and how the models run", divider=True
            ),
        )
        inputs.int("batch_size", default=DEFAULTS["batch_size"], min=1, label="Write batch size")
        models = api.memory_bank_config(ctx.dataset, bank_name)["ntt_config"] if bank_name else {}
        forms.device_choice(
            ctx,
            inputs,
            DEFAULTS["device"],
            "auto, cpu, cuda or cuda:N, among this machine's; empty: as the bank was built",
            fallback=models.get("device"),
        )
        _backend_fields(ctx, inputs)
        if bank_name:
            inputs.view(
                "models_notice",
                types.Notice(
                    label=f"Models: {models['sam_model']} + {models['encoder_model']} "
                    f"({models['weights']} weights), as recorded with the bank"
                ),
            )
        return types.Property(inputs, view=types.View(label="Segment with references"))

    def execute(self, ctx: foo.ExecutionContext) -> dict | Iterator:
        return forms.run_with_progress(
            ctx,
            "Segment with references",
            self._steps(ctx),
            segment_outputs,
            WORDS,
            first=forms.leave_evaluation_patches(ctx, self._evaluations_to_delete(ctx)),
        )

    @staticmethod
    def _evaluations_to_delete(ctx: foo.ExecutionContext) -> list[str]:
        """Replacing or re-scoring an existing field deletes the evaluations made on it."""
        field = forms.param(ctx, DEFAULTS, "label_field")
        replaces = forms.param(ctx, DEFAULTS, "overwrite") or forms.param(ctx, DEFAULTS, "rescore")
        if not (replaces and ctx.dataset.has_sample_field(field)):
            return []
        return api.evaluations_on(ctx.dataset, field)

    def _steps(self, ctx: foo.ExecutionContext) -> Iterator:
        bank_name = ctx.params["bank_name"]
        config = NTTConfig.from_dict(api.memory_bank_config(ctx.dataset, bank_name)["ntt_config"])
        if forms.param(ctx, DEFAULTS, "device"):
            config = config.replace(device=forms.param(ctx, DEFAULTS, "device"))
        request = SegmentRequest(
            ctx.target_view(),
            bank_name,
            forms.param(ctx, DEFAULTS, "label_field"),
            mode=SegmentMode.from_flags(
                forms.param(ctx, DEFAULTS, "overwrite"),
                forms.param(ctx, DEFAULTS, "skip_done"),
                forms.param(ctx, DEFAULTS, "rescore"),
            ),
            reuse_proposals=forms.param(ctx, DEFAULTS, "reuse_proposals"),
            backend=forms.param(ctx, DEFAULTS, "backend"),
            ray=RayOptions(
                forms.param(ctx, DEFAULTS, "ray_address") or None,
                forms.param(ctx, DEFAULTS, "num_actors"),
                forms.param(ctx, DEFAULTS, "gpus_per_actor"),
            ),
            exclude_tag=forms.param(ctx, DEFAULTS, "exclude_tag") or None,
            config=config,
            batch_size=forms.param(ctx, DEFAULTS, "batch_size"),
        )
        steps = api.iter_segment(
            request.target, bank_name, request.label_field, **request.segment_kwargs()
        )
        return (yield from _with_failure_rows(steps))

    def resolve_output(self, ctx: foo.ExecutionContext) -> types.Property:
        return segment_outputs()


def _needs_models_on_many(ctx: foo.ExecutionContext) -> bool:
    """Whether more than ``loop.LARGE_ROUND`` targets need the models: cached proposals are
    re-scored in seconds, so a cached run counts only the targets without them."""
    targets = ctx.target_view()
    exclude_tag = forms.param(ctx, DEFAULTS, "exclude_tag")
    if exclude_tag:
        targets = targets.match_tags(exclude_tag, bool=False)
    if len(targets) <= loop.LARGE_ROUND:
        return False
    bank_name = ctx.params.get("bank_name")
    cached = forms.param(ctx, DEFAULTS, "reuse_proposals")
    if not (cached and bank_name in api.list_memory_banks(ctx.dataset)):
        return True
    config = NTTConfig.from_dict(api.memory_bank_config(ctx.dataset, bank_name)["ntt_config"])
    sample_ids = targets.values("id")
    present = ProposalCache(ctx.dataset, config).present(sample_ids)
    return len(sample_ids) - len(present) > loop.LARGE_ROUND


def _backend_fields(ctx: foo.ExecutionContext, inputs: types.Object) -> None:
    """The execution backend; the Ray settings only once Ray is chosen."""
    choices = types.RadioGroup(orientation="vertical")
    choices.add_choice("local", label="Local", description="This process, one image at a time")
    choices.add_choice(
        "ray",
        label="Ray",
        description="Ray Data actors (one per GPU) on a local or existing cluster",
    )
    backend = inputs.enum(
        "backend",
        choices.values(),
        default=DEFAULTS["backend"],
        label="Execution backend",
        view=choices,
    )
    forms.mark_invalid(
        backend,
        forms.refusal(
            lambda: api.check_backend(
                forms.param(ctx, DEFAULTS, "backend"),
                forms.param(ctx, DEFAULTS, "num_actors"),
                forms.param(ctx, DEFAULTS, "reuse_proposals"),
            )
        ),
    )
    if forms.param(ctx, DEFAULTS, "backend") != "ray":
        return
    inputs.str(
        "ray_address",
        default=DEFAULTS["ray_address"],
        label="Ray cluster address",
        description="'auto' from a node of a running cluster, or ray://host:10001; "
        "empty: start a local cluster",
    )
    inputs.int(
        "num_actors",
        default=DEFAULTS["num_actors"],
        min=1,
        label="Actors",
        description="How many model replicas run at once (one per GPU)",
    )
    inputs.float(
        "gpus_per_actor",
        min=0,
        label="GPUs per actor",
        description="Empty: 1 when the device is CUDA (or auto on a cluster with GPUs), else 0",
    )


def _with_failure_rows(steps: Iterator) -> Iterator:
    """The summary with failures as table rows, which the App can display."""
    summary = yield from steps
    failures = summary.pop("failed")
    summary["failed"] = len(failures)
    summary["failures"] = [{"sample_id": k, "error": v} for k, v in failures.items()]
    summary["deleted_evaluations"] = ", ".join(summary["deleted_evaluations"]) or "none"
    return summary


def segment_outputs() -> types.Property:
    outputs = forms.titled_outputs("Segmentation done")
    outputs.str("label_field", label="Output field")
    outputs.str("bank_name", label="Memory bank")
    outputs.int("processed", label="Samples segmented")
    outputs.int("written", label="Samples written (predictions changed)")
    outputs.int("skipped", label="Samples skipped (already done)")
    outputs.int("instances", label="Instances predicted")
    outputs.int("failed", label="Samples failed")
    outputs.str("deleted_evaluations", label="Evaluations deleted (made on the old field)")
    table = types.TableView()
    table.add_column("sample_id", label="Sample")
    table.add_column("error", label="Error")
    outputs.list("failures", types.Object(), label="Failures", view=table)
    return types.Property(outputs, view=types.View(label="Segmentation done"))


class ClearProposalCache(foo.Operator):
    @property
    def config(self) -> foo.OperatorConfig:
        return foo.OperatorConfig(
            name="clear_proposal_cache",
            label="Clear cached proposals",
            description="Delete the SAM2 proposals kept for re-scoring; predictions are kept",
        )

    def resolve_input(self, ctx: foo.ExecutionContext) -> types.Property:
        inputs = types.Object()
        count = cached_proposal_count(ctx.dataset)
        inputs.view("count", types.Notice(label=f"{count} cached image(s) in this dataset"))
        return types.Property(inputs, view=types.View(label="Clear cached proposals"))

    def execute(self, ctx: foo.ExecutionContext) -> dict:
        return forms.reporting_failures(
            ctx, "Clear cached proposals", lambda: {"removed": clear_proposal_cache(ctx.dataset)}
        )

    def resolve_output(self, ctx: foo.ExecutionContext) -> types.Property:
        return forms.outputs_or_failure(ctx, "Clear cached proposals", _cleared_outputs)


def _cleared_outputs() -> types.Property:
    outputs = forms.titled_outputs("Cached proposals cleared")
    outputs.int("removed", label="Cached images removed")
    return types.Property(outputs, view=types.View(label="Cached proposals cleared"))
