"""Error hierarchy. Every error carries a one-line hint saying what to do.

Only cli.py turns these into exit codes (see EXIT_CODES and the README).
"""

from __future__ import annotations


class EdgepackError(Exception):
    """Base of every error edgepack reports to a user."""

    exit_code = 2
    kind = "error"

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ConfigError(EdgepackError):
    """A target profile (YAML) is missing, malformed or invalid."""

    kind = "profile error"


class SpecError(EdgepackError):
    """A model spec cannot be loaded or does not describe a usable model."""

    kind = "spec error"


class StageError(EdgepackError):
    """A compression stage failed on the model."""

    exit_code = 3
    kind = "stage error"


class ExportError(EdgepackError):
    """An exporter could not produce an artifact."""

    exit_code = 3
    kind = "export error"


class UntraceableModel(ExportError):
    """torch.export cannot capture the model: data-dependent control flow, in the user's code."""


class NothingToQuantize(ExportError):
    """A quantized precision was asked for, and the recipe found no op in the model to quantize."""


class RuntimeUnavailable(EdgepackError):
    """A runtime or exporter package is not installed."""

    exit_code = 2
    kind = "runtime unavailable"


class EmulatorUnavailable(RuntimeUnavailable):
    """Something edgepack sets up by itself on first use (a software GPU driver from Debian's
    archive, say) cannot be set up here: the download was refused, the host is not one the
    recipe runs on, a tool is missing or the cache is not writable. Nothing is half-installed."""

    kind = "emulator unavailable"


class RuntimeCheckError(EdgepackError):
    """A runtime failed, crashed or hung while running an artifact."""

    exit_code = 3
    kind = "runtime error"


class BundleError(EdgepackError):
    """A bundle on disk is missing files, tampered with or malformed."""

    exit_code = 2
    kind = "bundle error"


class ParityError(EdgepackError):
    """An artifact's outputs differ from the float reference beyond the profile's tolerance."""

    exit_code = 1
    kind = "parity failure"


class BudgetError(EdgepackError):
    """An artifact exceeds the profile's size or latency budget."""

    exit_code = 1
    kind = "budget exceeded"


# Documented in README.md ("Exit codes"). Stable: pipelines depend on them.
EXIT_OK = 0
EXIT_PARITY_OR_BUDGET = 1
EXIT_USAGE = 2
EXIT_EXPORT_OR_RUNTIME = 3
EXIT_INTERRUPTED = 130


# A SIGINT/SIGTERM seen by the CLI. The handler only records it: raising KeyboardInterrupt
# wherever Python happens to be can land inside a native module's import or a C++ callback,
# which may swallow it or abort (std::terminate). The build checks this flag at every step
# boundary, and runtime sessions while they wait, and stop there; a second signal stops at once.
_interrupted_by: str | None = None


def note_interrupt(what: str) -> None:
    global _interrupted_by
    _interrupted_by = what


def interrupted_by() -> str | None:
    return _interrupted_by


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if the process was interrupted (the signal is recorded, not raised)."""
    if _interrupted_by is not None:
        raise KeyboardInterrupt(_interrupted_by)
