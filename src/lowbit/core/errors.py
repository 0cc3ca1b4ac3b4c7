"""Exception types. Every error lowbit raises on bad input derives from ``LowbitError``.

The CLI turns any ``LowbitError`` into one line on stderr and exit code 2.
"""

from __future__ import annotations


class LowbitError(ValueError):
    """Bad input or state that the user can fix; the message names the file, module or value."""


class NonFiniteError(LowbitError):
    """A tensor that must be finite holds NaN or Inf."""


class FormatVersionError(LowbitError):
    """A saved artefact was written by a newer (unknown) format version."""


class CheckpointError(LowbitError):
    """A checkpoint file is missing, truncated or does not match its config."""
