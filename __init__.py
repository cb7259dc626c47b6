"""FiftyOne plugin entry: registers the operators and the panel (code in ``ntt_operators``).

``ntt_operators`` is imported by its absolute name (``pip install -e .`` installs it), so the
App, notebooks, tests and worker processes all share one copy of the code.
"""

import importlib.util
import pathlib
import sys

if importlib.util.find_spec("ntt_operators") is None:
    # Installed with `fiftyone plugins download` but not pip: the packages sit next to this file.
    sys.path.append(str(pathlib.Path(__file__).resolve().parent))

from ntt_operators.bank import (  # noqa: E402
    BuildMemoryBank,
    DeleteMemoryBank,
    GetMemoryBankInfo,
    UpdateMemoryBank,
)
from ntt_operators.evaluate import EvaluateSegmentations, LoadEvaluationPatches  # noqa: E402
from ntt_operators.explain import (  # noqa: E402
    IndexLookAlikes,
    ReviewPredictions,
    ShowReferencePredictions,
)
from ntt_operators.panel import NoTimeToTrainPanel  # noqa: E402
from ntt_operators.references import SampleReferences  # noqa: E402
from ntt_operators.rounds import RunRound  # noqa: E402
from ntt_operators.segment import ClearProposalCache, SegmentWithReferences  # noqa: E402

OPERATORS = (
    SampleReferences,
    BuildMemoryBank,
    UpdateMemoryBank,
    GetMemoryBankInfo,
    DeleteMemoryBank,
    SegmentWithReferences,
    ClearProposalCache,
    EvaluateSegmentations,
    LoadEvaluationPatches,
    ReviewPredictions,
    ShowReferencePredictions,
    IndexLookAlikes,
    RunRound,
    NoTimeToTrainPanel,
)


def register(p) -> None:
    for operator in OPERATORS:
        p.register(operator)
