"""Form pieces shared by the operators, and how heavy operators report progress.

``execute_operator`` does not apply form defaults, so each operator keeps one ``DEFAULTS`` dict,
passes its values as ``default=`` here and reads params with ``param(ctx, DEFAULTS, key)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import fiftyone.operators as foo
import fiftyone.operators.types as types

from . import api

HEAVY = dict(
    allow_immediate_execution=True,
    allow_delegated_execution=True,
    default_choice_to_delegated=True,
)
"""Config options of operators that run the models: delegated by default, immediate possible."""


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
) -> str | None:
    """A dropdown of the dataset's ``fo.Detections`` fields; returns the chosen one.

    The default is the first of ``preferred`` that exists, else the first field.
    """
    fields = api.detection_fields(ctx.dataset)
    if not fields:
        inputs.view(
            f"no_{name}",
            types.Warning(label="This dataset has no fo.Detections field", description=description),
        )
        return None
    default = next((field for field in preferred if field in fields), fields[0])
    choices = types.DropdownView()
    for field in fields:
        choices.add_choice(field, label=field)
    inputs.enum(
        name,
        choices.values(),
        required=True,
        default=default,
        label=label,
        description=description,
        view=choices,
    )
    return ctx.params.get(name, default)


def memory_bank(ctx: foo.ExecutionContext, inputs: types.Object) -> str | None:
    """A dropdown of the dataset's memory banks; returns the chosen one."""
    banks = api.list_memory_banks(ctx.dataset)
    if not banks:
        inputs.view(
            "no_bank",
            types.Warning(
                label="No memory bank yet",
                description="Tag references and run 'Build memory bank' first",
            ),
        )
        return None
    choices = types.DropdownView()
    for name in banks:
        choices.add_choice(name, label=name)
    inputs.enum(
        "bank_name",
        choices.values(),
        required=True,
        default=banks[-1],
        label="Memory bank",
        view=choices,
    )
    return ctx.params.get("bank_name", banks[-1])


def tag_choice(
    ctx: foo.ExecutionContext, inputs: types.Object, name: str, default: str, **kwargs: Any
) -> None:
    """A free-text tag with the dataset's existing sample and label tags as suggestions."""
    tags = set(ctx.dataset.distinct("tags")) | set(ctx.dataset.count_label_tags())
    choices = types.AutocompleteView()
    for tag in sorted(tags | {default}):
        choices.add_choice(tag, label=tag)
    inputs.str(name, default=default, view=choices, **kwargs)


def classes_choice(
    ctx: foo.ExecutionContext, inputs: types.Object, gt_field: str | None, description: str
) -> None:
    """An optional multi-select of the classes found in ``gt_field`` (empty: all)."""
    classes = ctx.dataset.distinct(f"{gt_field}.detections.label") if gt_field else []
    choices = types.AutocompleteView(allow_duplicates=False)
    for name in classes:
        choices.add_choice(name, label=name)
    inputs.list("classes", types.String(), label="Classes", description=description, view=choices)


def run_with_progress(
    ctx: foo.ExecutionContext,
    steps: Iterator[tuple[float, str]],
    outputs: Callable[[], types.Property],
) -> dict[str, Any] | Iterator:
    """Runs an ``api.iter_*`` step generator and reports its progress where the user sees it.

    Delegated: progress goes to the run's record and the summary is returned (the Runs page
    shows it). Immediate: a generator of App progress-bar messages that ends by showing the
    summary, since a generator operator's return value is dropped by FiftyOne.
    """
    if ctx.delegated:
        return api.drive_steps(steps, lambda f, label: ctx.set_progress(progress=f, label=label))
    return _stream(ctx, steps, outputs)


def _stream(ctx: foo.ExecutionContext, steps: Iterator, outputs: Callable[[], types.Property]):
    try:
        while True:
            try:
                fraction, label = next(steps)
            except StopIteration as done:
                summary = done.value
                break
            yield ctx.ops.set_progress(progress=fraction, label=label)
    finally:
        steps.close()  # a cancelled run still writes what it finished
    yield ctx.ops.show_output(outputs().to_json(), summary)
    yield ctx.ops.reload_dataset()
