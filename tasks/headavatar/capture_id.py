"""Capture ids are validated before they touch any path or object key."""

import re

from headavatar.errors import InvalidCaptureId

# NeRSemble participant ids are three digits ("018"); letters, digits, '-' and '_' are allowed
# for other captures. Nothing that can walk a path, split a key or reach a shell gets through.
CAPTURE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
_CAPTURE_ID = re.compile(CAPTURE_ID_PATTERN)


def is_capture_id(value: object) -> bool:
    return isinstance(value, str) and _CAPTURE_ID.fullmatch(value) is not None


def validate_capture_id(capture_id: object) -> str:
    if not isinstance(capture_id, str) or not _CAPTURE_ID.fullmatch(capture_id):
        shown = repr(capture_id) if len(repr(capture_id)) <= 40 else repr(capture_id)[:37] + "..."
        raise InvalidCaptureId(
            f"invalid capture id {shown}: expected 1-64 ASCII letters, digits, '-' or '_', "
            "starting with a letter or digit (e.g. '018')"
        )
    return capture_id
