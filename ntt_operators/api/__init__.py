"""The plugin's steps as plain functions over a dataset or view (the operators call these).

One module per step of the curator's flow:

1. ``references``: ``sample_references`` tags N references per class, the paper's few-shot way.
2. ``bank``: ``build_memory_bank`` encodes the tagged references (and the labels tagged
   ``negative``); the bank is a custom run. ``update_memory_bank`` brings it up to date with the
   tags, encoding only what changed.
3. ``segment``: ``segment`` predicts instance masks for target samples into a new field.
4. ``evaluate``: ``evaluate`` runs COCO-style mask evaluation with per-sample TP/FP/FN.

Every refusal is raised before the dataset is changed. The heavy steps also exist as generators
(``iter_build_memory_bank``, ``iter_segment``) that yield ``(fraction, label)`` progress steps and
return the result, so the App can stream a progress bar without threads.
"""

from .bank import (
    NO_FIELD_ROUTE,
    build_memory_bank,
    check_new_bank_name,
    check_references,
    delete_memory_bank,
    iter_build_memory_bank,
    iter_update_memory_bank,
    load_memory_bank,
    memory_bank_config,
    memory_bank_info,
    pending_changes,
    update_memory_bank,
)
from .common import (
    BANK_METHOD,
    SEGMENT_METHOD,
    PluginInputError,
    detection_fields,
    drive_steps,
    list_memory_banks,
    mapped_steps,
    require_bank,
)
from .evaluate import (
    check_evaluation,
    class_report,
    evaluate,
    fields_without_masks,
    left_out_tag,
    missing_ground_truth,
    segmented_samples,
)
from .references import check_sampling, reference_view, sample_references
from .segment import (
    check_backend,
    check_output_field,
    evaluations_on,
    iter_segment,
    segment,
    segment_run_key,
    segment_status,
    segment_targets,
    segmented_fields,
)

__all__ = [
    "BANK_METHOD",
    "NO_FIELD_ROUTE",
    "SEGMENT_METHOD",
    "PluginInputError",
    "build_memory_bank",
    "check_evaluation",
    "missing_ground_truth",
    "check_new_bank_name",
    "check_output_field",
    "check_references",
    "check_sampling",
    "class_report",
    "delete_memory_bank",
    "detection_fields",
    "drive_steps",
    "mapped_steps",
    "evaluate",
    "evaluations_on",
    "fields_without_masks",
    "iter_build_memory_bank",
    "iter_segment",
    "iter_update_memory_bank",
    "left_out_tag",
    "list_memory_banks",
    "load_memory_bank",
    "memory_bank_config",
    "memory_bank_info",
    "pending_changes",
    "reference_view",
    "require_bank",
    "sample_references",
    "check_backend",
    "segment",
    "segment_run_key",
    "segment_status",
    "segment_targets",
    "segmented_samples",
    "segmented_fields",
    "update_memory_bank",
]
