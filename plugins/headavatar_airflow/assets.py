"""The finished avatar as an Airflow Asset: the last stage's task updates it, DAGs that compare avatars consume it.

One Asset for all captures (Assets are declared when DAG files are parsed, captures arrive later);
each event's ``extra`` says which capture and which manifest, so a consumer can tell them apart.
A cache hit updates it too: the avatar is (still) there.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import Asset

AVATAR = Asset(name="headavatar_avatar", uri="headavatar://avatars", group="headavatar")


def describe_outlet_events(operator: Any, context: Any, result: dict[str, Any] | None) -> None:
    """Attach the capture and the stage result to the events the task's outlets emit on success."""
    assets = [o for o in operator.outlets or () if isinstance(o, Asset)]
    if not assets:
        return
    extra = {"capture": str(context["params"].get("id")), "run_id": str(context["run_id"])}
    if result:
        extra.update(manifest=result.get("manifest"), cached=bool(result.get("cached")))
    for asset in assets:
        context["outlet_events"][asset].extra = extra
