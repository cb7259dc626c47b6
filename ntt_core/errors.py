"""Errors the engine raises on bad input; each message says what to do about it."""


class NTTError(Exception):
    """Base class: anything the user can fix by changing an input."""


class CheckpointError(NTTError):
    """A checkpoint is missing, unreadable, or belongs to another model."""


class DeviceError(NTTError):
    """The requested device does not exist on this machine."""


class ImageError(NTTError):
    """An image cannot be read or decoded."""


class ReferenceInputError(NTTError):
    """Reference instances are missing or unusable (no mask, empty mask, unknown class)."""


class BankError(NTTError):
    """A memory bank is corrupt or of an unknown format."""


class BankMismatchError(BankError):
    """A memory bank was built with another encoder, image size, or class set."""
