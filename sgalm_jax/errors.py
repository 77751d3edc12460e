"""Errors raised by sgalm_jax.

Every error the library raises on bad input derives from :class:`SgalmError`, so callers can catch
one type. Messages name the file, config key, data line or tensor at fault.
"""

from __future__ import annotations


class SgalmError(Exception):
    """Base class of all sgalm_jax errors."""


class ConfigError(SgalmError, ValueError):
    """A config key is unknown, of the wrong type, or has an impossible value."""


class CheckpointError(SgalmError):
    """A weight file or checkpoint is missing, truncated, or does not match the model."""


class DataError(SgalmError, ValueError):
    """A data file or record is malformed."""


class ShardingError(SgalmError, ValueError):
    """A mesh shape or sharding does not fit the available devices or array shapes."""


class NonFiniteError(SgalmError, FloatingPointError):
    """A loss or gradient norm became NaN or infinite: the run diverged (the message names the
    step; nothing of that step is checkpointed or exported)."""


class WorkdirError(SgalmError, OSError):
    """The run directory cannot be used: not a folder, not writable, full, malformed, or in use
    by another run (the message names the path)."""


class JudgeError(SgalmError):
    """A judge (LLM-as-a-judge endpoint or local model) failed or gave an unusable reply."""
