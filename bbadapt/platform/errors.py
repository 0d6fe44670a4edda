"""Errors a user can cause. Each carries one line of explanation and the CLI exit code.

The CLI prints ``bbadapt: error: <message>`` for these and never a traceback; anything
else escaping is a bug in bbadapt.
"""


class BbadaptError(Exception):
    """Base class: a one-line, user-facing message."""

    exit_code = 1


class SpecError(BbadaptError, ValueError):
    """An input spec that cannot be parsed or is invalid (zero std, unknown order ...)."""

    exit_code = 2


class ModelError(BbadaptError, ValueError):
    """An unknown model name or a network bbadapt cannot adapt."""

    exit_code = 2


class WeightsError(BbadaptError):
    """Weights that cannot be read, do not fit the model, or are not finite."""


class OutputError(BbadaptError):
    """An output directory that exists, or a bundle that cannot be read."""


class OptionError(BbadaptError, ValueError):
    """An invalid option value (fold, BN mode, sizes ...)."""

    exit_code = 2


class DatasetError(BbadaptError):
    """A dataset that cannot be used: missing files, bad boxes, classes the bundle does not know."""


class DeviceError(BbadaptError):
    """A device or mode this installation cannot provide (a GPU with CPU-only mxnet, AMP on CPU, no horovod)."""

    exit_code = 2


class ResourceError(BbadaptError):
    """What was asked needs more memory (or disk) than this machine has: refused before allocating."""
