"""Exception types shared by every subpackage.

All user-facing errors derive from ``ValueError`` (bad input) or ``RuntimeError`` (a run that cannot go on), so
callers that already catch those keep working, while tests and scripts can catch the precise type.
"""

from __future__ import annotations


class MonaiFedPrivDeprecationWarning(DeprecationWarning):
    """Deprecation warnings raised by this package (turned into errors in the test-suite)."""


class DataError(ValueError):
    """A data set, data list or image file is missing, unreadable or inconsistent.

    The message always names the offending file or key.
    """


class BundleError(ValueError):
    """A bundle directory or config lacks an id this package needs, or has one of the wrong kind."""


class UpdateError(ValueError):
    """A model update is malformed: missing or extra keys, wrong shapes, NaN/Inf values."""


class PrivacyConfigError(ValueError):
    """A privacy setting is out of range. Raised at construction: privacy never fails open."""


class PrivacyBudgetExceeded(RuntimeError):
    """Raised when a step or release would push a site's epsilon past its budget."""


class ResumeError(ValueError):
    """A run cannot be resumed: its checkpoint is unreadable, of another version, or from other settings."""


class FederationError(RuntimeError):
    """A federated run cannot go on (too few sites answered a round); the last good round's checkpoint is intact."""


class InjectedFault(RuntimeError):
    """A fault raised on purpose by ``--inject-fault`` to test how a federation copes."""
