"""FiftyOne plugin entry: registers the operators (the code lives in ``ntt_operators``).

``ntt_operators`` is imported by its absolute name (it is installed with the plugin), so the
App, notebooks, tests and worker processes all share one copy of the code.
"""

from ntt_operators.bank import BuildMemoryBank, DeleteMemoryBank, GetMemoryBankInfo
from ntt_operators.evaluate import EvaluateSegmentations, LoadEvaluationPatches
from ntt_operators.references import SampleReferences
from ntt_operators.segment import SegmentWithReferences

OPERATORS = (
    SampleReferences,
    BuildMemoryBank,
    GetMemoryBankInfo,
    DeleteMemoryBank,
    SegmentWithReferences,
    EvaluateSegmentations,
    LoadEvaluationPatches,
)


def register(p) -> None:
    for operator in OPERATORS:
        p.register(operator)
