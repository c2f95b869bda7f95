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


class StorageUnavailable(StorageError):
    """The object store did not answer (down, timing out, 5xx) after the client's retries: a later
    attempt may succeed, so the task is retried rather than failed for good."""

    exit_code = 75  # EX_TEMPFAIL


class StageBusy(PipelineError):
    """Another process holds the stage's lock for this capture (a concurrent run): retry later."""

    exit_code = 75


class AccessDenied(StorageError):
    pass


class RawCaptureError(PipelineError):
    """The raw capture is incomplete or unreadable."""


class UpstreamMissing(PipelineError):
    """A stage's declared input has no manifest yet."""


class RefusedObject(PipelineError):
    """An object read from the bucket is not the plain data the pipeline writes (a pickle that would
    run code, a corrupt or foreign file): refused, nothing in it executed. A retry would read the
    same bytes, so the task fails for good; the message names the key."""



class ScratchFull(PipelineError):
    """The local scratch disk ran out of space; another worker (or a cleaned disk) may succeed."""

    exit_code = 75


class GpuUnavailable(PipelineError):
    """A GPU was leased to the task but torch sees no CUDA device (a driver not loaded, a GPU fallen off
    the bus, a CUDA build the driver is too old for): the stage stops before any work instead of training
    on the CPU for days, and is retried, where the driver may be back or another worker may take it."""

    exit_code = 75
