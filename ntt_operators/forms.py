"""Form pieces shared by the operators, and how heavy operators report progress.

``execute_operator`` does not apply form defaults, so each operator keeps one ``DEFAULTS`` dict,
passes its values as ``default=`` here and reads params with ``param(ctx, DEFAULTS, key)``.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

import fiftyone as fo
import fiftyone.core.stages as fos
import fiftyone.operators as foo
import fiftyone.operators.types as types
import torch
from fiftyone.operators.executor import ExecutionOptions

from ntt_core import NTTError
from ntt_core.models import resolve_device

from . import api, messages
from .messages import Words

HEAVY = dict(
    allow_immediate_execution=True,
    allow_delegated_execution=True,
    default_choice_to_delegated=True,
)
"""Config options of operators that run the models: both choices offered; the default is
chosen per run by ``execution_options``."""


def execution_options(large: bool) -> ExecutionOptions:
    """Execute is the default choice for a small or cached run, Schedule only for a large one."""
    return ExecutionOptions(
        allow_immediate_execution=True,
        allow_delegated_execution=True,
        default_choice_to_delegated=large,
    )


def param(ctx: foo.ExecutionContext, defaults: dict[str, Any], key: str) -> Any:
    value = ctx.params.get(key)
    return defaults[key] if value is None else value


def detections_field(
    ctx: foo.ExecutionContext,
    inputs: types.Object,
    name: str,
    label: str,
    description: str,
    preferred: Sequence[str] = ("ground_truth",),
    check: Callable[[str], str | None] | None = None,
) -> str | None:
    """A dropdown of the dataset's ``fo.Detections`` fields; returns the chosen one.

    The default is the first of ``preferred`` that exists, else the first field. ``check``
    returns a refusal of the chosen field to show on it, if any.
    """
    fields = api.detection_fields(ctx.dataset)
    if not fields:
        blocking_notice(
            inputs, f"no_{name}", "This dataset has no fo.Detections field", description
        )
        return None
    default = next((field for field in preferred if field in fields), fields[0])
    choices = types.DropdownView()
    for field in fields:
        choices.add_choice(field, label=field)
    chosen = ctx.params.get(name) or default
    prop = inputs.enum(
        name,
        choices.values(),
        required=True,
        default=default,
        label=label,
        description=description,
        view=choices,
    )
    if check is not None:
        mark_invalid(prop, check(chosen))
    return chosen


def memory_bank(ctx: foo.ExecutionContext, inputs: types.Object) -> str | None:
    """A dropdown of the dataset's memory banks; returns the chosen one.

    With no bank yet the form says so and cannot be executed.
    """
    banks = api.list_memory_banks(ctx.dataset)
    if not banks:
        blocking_notice(
            inputs,
            "no_bank",
            "No memory bank yet",
            "Tag references and run 'Build memory bank' first",
        )
        return None
    chosen = ctx.params.get("bank_name") or banks[-1]
    choices = types.DropdownView()
    # A bank deleted while the form was open stays listed, marked, so that Execute (or a
    # scheduled run's validation) refuses it with a sentence rather than "invalid value".
    for name in banks if chosen in banks else [*banks, chosen]:
        choices.add_choice(name, label=name)
    prop = inputs.enum(
        "bank_name",
        choices.values(),
        required=True,
        default=banks[-1],
        label="Memory bank",
        view=choices,
    )
    mark_invalid(prop, refusal(lambda: api.require_bank(ctx.dataset, chosen)))
    return chosen if chosen in banks else None


def device_choice(
    ctx: foo.ExecutionContext,
    inputs: types.Object,
    default: str,
    description: str,
    fallback: str | None = None,
) -> None:
    """A device among those this machine has (free text allowed); a device that cannot work
    here, or the ``fallback`` used when the field is empty, is refused on the field."""
    choices = types.AutocompleteView()
    for name in available_devices():
        choices.add_choice(name, label=name)
    prop = inputs.str(
        "device", default=default, label="Device", description=description, view=choices
    )
    value = ctx.params.get("device")
    chosen = (default if value is None else value) or fallback
    if chosen:
        mark_invalid(prop, refusal(lambda: resolve_device(chosen)))


def available_devices() -> list[str]:
    """The device names that work on this machine."""
    cuda = (
        [f"cuda:{k}" for k in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    return ["auto", "cpu", *(["cuda"] if cuda else []), *cuda]


def tag_choice(
    ctx: foo.ExecutionContext, inputs: types.Object, name: str, default: str, **kwargs: Any
) -> types.Property:
    """A free-text tag with the dataset's existing sample and label tags as suggestions."""
    tags = set(ctx.dataset.distinct("tags")) | set(ctx.dataset.count_label_tags())
    choices = types.AutocompleteView()
    for tag in sorted(tags | {default}):
        choices.add_choice(tag, label=tag)
    return inputs.str(name, default=default, view=choices, **kwargs)


def classes_choice(
    ctx: foo.ExecutionContext, inputs: types.Object, gt_field: str | None, description: str
) -> types.Property:
    """An optional multi-select of the classes found in ``gt_field`` (empty: all)."""
    classes = ctx.dataset.distinct(f"{gt_field}.detections.label") if gt_field else []
    choices = types.AutocompleteView(allow_duplicates=False)
    for name in classes:
        choices.add_choice(name, label=name)
    return inputs.list(
        "classes", types.String(), label="Classes", description=description, view=choices
    )


def run_with_progress(
    ctx: foo.ExecutionContext,
    title: str,
    steps: Iterator[tuple[float, str]],
    outputs: Callable[[], types.Property],
    words: Words | None = None,
    first: Sequence = (),
) -> dict[str, Any] | Iterator:
    """Runs an ``api.iter_*`` step generator and reports its progress where the user sees it.

    ``first``: App operations to trigger before the steps start (immediate runs only).

    Delegated: progress goes to the run's record and the summary is returned (``fiftyone
    delegated info`` shows both); a failure is recorded there as one sentence, then raised so
    the run is marked failed. Immediate: a generator of App progress-bar messages that ends by
    showing the summary (a generator operator's return value is dropped by FiftyOne), or the
    failure as one sentence (the App would otherwise show nothing).
    """
    if ctx.delegated:
        return _drive_delegated(ctx, title, steps, words)
    return _stream(ctx, title, steps, outputs, words, first)


def _drive_delegated(ctx: foo.ExecutionContext, title: str, steps: Iterator, words) -> Any:
    try:
        return api.drive_steps(steps, lambda f, label: ctx.set_progress(progress=f, label=label))
    except Exception as error:
        ctx.set_progress(label=f"{title} failed: {messages.sentence(error, words)}")
        raise


def _stream(
    ctx: foo.ExecutionContext,
    title: str,
    steps: Iterator,
    outputs: Callable[[], types.Property],
    words: Words | None,
    first: Sequence,
):
    yield from first
    try:
        summary = yield from api.mapped_steps(
            steps, lambda fraction, label: ctx.ops.set_progress(progress=fraction, label=label)
        )
    except Exception as error:
        yield from show_failure(ctx, title, error, words)
        return
    yield ctx.ops.show_output(outputs().to_json(), summary)
    yield ctx.ops.reload_dataset()


def leave_evaluation_patches(ctx: foo.ExecutionContext, eval_keys: Sequence[str]) -> list:
    """The App operation that takes the App off an evaluation patches view of ``eval_keys``
    (to the view it was made from), if it is on one: once such an evaluation is deleted, the
    App shows an error page instead of the grid. Empty when the App is elsewhere."""
    stage_dicts = ctx.request_params.get("view") or []  # as the App sent them
    for index, stage in enumerate(map(fos.ViewStage._from_dict, stage_dicts)):
        if isinstance(stage, fos.ToEvaluationPatches) and stage.eval_key in eval_keys:
            if not index:
                return [ctx.ops.clear_view()]
            return [ctx.ops.set_view(view=fo.DatasetView._build(ctx.dataset, stage_dicts[:index]))]
    return []


def show_failure(
    ctx: foo.ExecutionContext, title: str, error: BaseException, words: Words | None = None
) -> Generator:
    """App messages that show a failure as one sentence: a notification and a result dialog."""
    text = messages.sentence(error, words)
    yield ctx.ops.notify(f"{title} failed: {text}", variant="error")
    yield ctx.ops.show_output(failure_outputs(title, text).to_json(), {"error": text})


def titled_outputs(title: str) -> types.Object:
    """Result fields under a title: the App's ``show_output`` dialog shows no view label."""
    outputs = types.Object()
    outputs.view("title", types.Header(label=title, divider=True))
    return outputs


def failure_outputs(title: str, text: str) -> types.Property:
    """The result dialog of a failed run: the sentence that says why and what to do (the App
    shows an Error view's label and description, not its value)."""
    outputs = titled_outputs(f"{title} failed")
    outputs.str(
        "error",
        label="What went wrong",
        view=types.Error(label="What went wrong", description=text),
    )
    return types.Property(outputs, view=types.View(label=f"{title} failed"))


def reporting_failures(
    ctx: foo.ExecutionContext, title: str, work: Callable[[], Any], words: Words | None = None
) -> Any:
    """Runs a non-generator operator's work so that a failure reaches the user as one sentence.

    Immediate: the App would show the raw traceback, so the failure is returned as
    ``{"error": sentence}`` (``resolve_output`` shows it, see ``outputs_or_failure``) and
    notified. Delegated: recorded on the run as its progress label, then raised so the run is
    marked failed.
    """
    try:
        return work()
    except Exception as error:
        text = messages.sentence(error, words)
        if ctx.delegated:
            ctx.set_progress(label=f"{title} failed: {text}")
            raise
        ctx.ops.notify(f"{title} failed: {text}", variant="error")
        return {"error": text}


def outputs_or_failure(
    ctx: foo.ExecutionContext, title: str, outputs: Callable[[], types.Property]
) -> types.Property:
    """``resolve_output`` of an operator run through ``reporting_failures``."""
    if isinstance(ctx.results, dict) and "error" in ctx.results:
        return failure_outputs(title, ctx.results["error"])
    return outputs()


# -- refusals shown in the form, before Execute ---------------------------------------------


def refusal(check: Callable[[], Any], words: Words | None = None) -> str | None:
    """The message of an API check that refuses the current inputs, in the form's words."""
    try:
        check()
    except NTTError as error:
        return messages.in_form_words(str(error), words)
    return None


def blocking_notice(inputs: types.Object, name: str, label: str, description: str) -> None:
    """A warning that disables Execute; a direct execution is refused with the same words."""
    notice = inputs.view(name, types.Warning(label=label, description=description))
    notice.invalid = True
    notice.error_message = f"{label}: {description}"


def mark_invalid(prop: types.Property, message: str | None) -> None:
    """Shows ``message`` on the field and disables Execute (nothing when ``message`` is None)."""
    if message:
        prop.invalid = True
        prop.error_message = message
