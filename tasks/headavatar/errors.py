"""Errors a user can act on. The CLI prints them as one line and exits non-zero.

The CLI's exit codes, here and nowhere else (the Airflow operators import them to decide what a
non-zero exit means for the task, ``plugins/headavatar_airflow/operators.py``; docs/failures.md
lists them for people):
"""

EXIT_FINAL = 2  # a retry cannot help (bad input, bad config, missing upstream stage): the task fails for good
EXIT_TEMPFAIL = 75  # sysexits' EX_TEMPFAIL: a later attempt may succeed; the task is retried
# Another run holds the stage's lock (it is computing the same capture and stage): the task waits for it
# without using a retry and then takes its result. 79 is the first code past sysexits' range (64-78,
# EX__MAX = 78), so no library or shell convention gives it another meaning (126-165: shell, signals).
EXIT_BUSY = 79


class PipelineError(Exception):
    """Base class: the message names the file, key or setting at fault."""

    exit_code = EXIT_FINAL


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

    exit_code = EXIT_TEMPFAIL


class StageBusy(PipelineError):
    """Another process holds the stage's lock for this capture (a concurrent run, alive: it renews the
    lock): the orchestrator waits until it has finished (its result is then a cache hit) or died (its lock
    expires and this run computes the stage), without counting a failed attempt."""

    exit_code = EXIT_BUSY


class LostLock(StageBusy):
    """This run lost its stage lock while computing (paused or cut off from the store past the lock's ttl):
    it writes nothing more. A failed attempt, retried like other temporary errors; the retry meets the
    other run's lock (waits) or a cache hit."""

    exit_code = EXIT_TEMPFAIL


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

    exit_code = EXIT_TEMPFAIL


class GpuUnavailable(PipelineError):
    """A GPU was leased to the task but torch sees no CUDA device (a driver not loaded, a GPU fallen off
    the bus, a CUDA build the driver is too old for): the stage stops before any work instead of training
    on the CPU for days, and is retried, where the driver may be back or another worker may take it."""

    exit_code = EXIT_TEMPFAIL
