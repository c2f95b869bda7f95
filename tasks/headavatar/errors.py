"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""


class PipelineError(Exception):
    """Base class: the message names the file, key or setting at fault."""

    exit_code = 2


class InvalidCaptureId(PipelineError):
    pass


class ConfigError(PipelineError):
    pass


class StorageError(PipelineError):
    pass


class MissingObject(StorageError):
    pass


class AccessDenied(StorageError):
    pass


class RawCaptureError(PipelineError):
    """The raw capture is incomplete or unreadable."""


class UpstreamMissing(PipelineError):
    """A stage's declared input has no manifest yet."""

