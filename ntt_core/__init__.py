"""No Time to Train! — training-free reference-based instance segmentation (arXiv 2507.02798).

The engine: torch/numpy only, no FiftyOne. Build an ``NTTPredictor`` once, turn reference
instances into a ``MemoryBank``, and call ``predict(image, bank)`` per target image.
"""

from .bank import MemoryBank, Negatives
from .config import NTTConfig
from .errors import (
    BankError,
    BankMismatchError,
    CheckpointError,
    DeviceError,
    ImageError,
    NTTError,
    ReferenceInputError,
)
from .images import load_image
from .pipeline import NTTPredictor
from .proposals import Proposals
from .references import Reference
from .result import Instances

__all__ = [
    "BankError",
    "BankMismatchError",
    "CheckpointError",
    "DeviceError",
    "ImageError",
    "Instances",
    "MemoryBank",
    "Negatives",
    "NTTConfig",
    "NTTError",
    "NTTPredictor",
    "Proposals",
    "Reference",
    "ReferenceInputError",
    "load_image",
]
