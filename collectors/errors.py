"""The one exception family of kubeworld.

Every failure that a user can act on (bad data, an unreachable source, a fault that could not
be applied or rolled back, a configuration that does not fit) raises a subclass of
`KubeworldError` whose message names the file, run, column or field at fault.
"""


class KubeworldError(Exception):
    """Base class of every error kubeworld raises on purpose."""


class DataError(KubeworldError):
    """A dataset, table, file or column is missing, malformed or inconsistent."""


class SourceError(KubeworldError):
    """A metrics source or cluster API could not be read or acted on."""


class FaultError(KubeworldError):
    """A fault could not be injected, or could not be rolled back."""


class ConfigError(KubeworldError):
    """A configuration value is out of its allowed set or inconsistent with the data."""
