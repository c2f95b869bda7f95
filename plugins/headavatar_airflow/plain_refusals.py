"""The trigger form's refusal of a run parameter, in plain words.

Airflow's API refuses a parameter that fails its JSON schema with the validator's text: the value,
the regular expression, then the schema dumped as a dict ("Failed validating 'pattern' in schema:
..."), which the trigger form shows as is. This API-server middleware (an Airflow plugin: the demo's
and the compose stack's API servers load it from the plugins folder) rewrites that one response, a
refused ``POST /api/v2/dags/headavatar_capture*/dagRuns``, to one sentence naming the field, the value
and what it should be (``PARAM_RULES``). Every other request passes through untouched.
"""

from __future__ import annotations

import json
import re
from typing import Any, ClassVar

from airflow.plugins_manager import AirflowPlugin

from headavatar_airflow.pipeline import PARAM_RULES, param_schema

TRIGGER = re.compile(r"/api/v2/dags/headavatar_capture[A-Za-z0-9_.-]*/dagRuns/?$")  # under any base path
REFUSAL = re.compile(r"^Invalid input for param (?P<param>\w+): (?P<why>[^\n]*)")
VALUE = re.compile(r"^(?P<value>.*?) (?:does not match|is not of type|is too long|is too short|should be non-empty|"
                   r"is less than|is greater than|is not valid under|is not one of)\b")


def plain(detail: str) -> str | None:
    """The sentence for Airflow's refusal ``detail``, or None when it is not a parameter's refusal."""
    m = REFUSAL.match(detail)
    if m is None:
        return None
    param, why = m["param"], m["why"]
    schema = param_schema().get(param, {})
    title = schema.get("title", param)
    value = VALUE.match(why)
    if param in PARAM_RULES and value is not None:
        return f"{title} {value['value']} is not valid: {PARAM_RULES[param]}."
    return f"{title}: {why}."  # a range or type error, whose first line is plain already


class PlainParamRefusals:
    """ASGI middleware: buffers only the capture DAG's trigger responses and rewrites a 400 refusal."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or not TRIGGER.search(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        messages: list[dict] = []

        async def keep(message: dict) -> None:
            messages.append(message)

        await self.app(scope, receive, keep)
        start = next(m for m in messages if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
        if start["status"] == 400 and (sentence := _rewrite(body)) is not None:
            body = sentence
            start = {**start, "headers": [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                     + [(b"content-length", str(len(body)).encode())]}
        await send(start)
        await send({"type": "http.response.body", "body": body})


def _rewrite(body: bytes) -> bytes | None:
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    detail = doc.get("detail") if isinstance(doc, dict) else None
    sentence = plain(detail) if isinstance(detail, str) else None
    return None if sentence is None else json.dumps({**doc, "detail": sentence}).encode()


class HeadavatarPlugin(AirflowPlugin):
    name = "headavatar"
    fastapi_root_middlewares: ClassVar[list[dict[str, Any]]] = [
        {"middleware": PlainParamRefusals, "name": "plain parameter refusals"}]
