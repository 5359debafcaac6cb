"""Errors that defectscope raises on purpose.

Every error a user can cause (a missing file, an unreadable image, a malformed data set, absent
weights, a tampered model directory) is a :class:`DefectscopeError`. Its message is one line that
names the file and says what to do; the command line prints it without a traceback and exits
non-zero.
"""


class DefectscopeError(Exception):
    """Base class of every error defectscope raises for bad input or a missing resource."""


class ImageReadError(DefectscopeError):
    """An image (or mask) file is missing, unreadable, corrupt, or of an unsupported kind."""


class DatasetError(DefectscopeError):
    """A data set folder is missing or does not have the expected layout."""


class WeightsNotFoundError(DefectscopeError):
    """Pretrained weights were asked for and no file was found where they are looked for."""


class ModelFileError(DefectscopeError):
    """A saved model directory is missing, incomplete, tampered with, or from a newer version."""
