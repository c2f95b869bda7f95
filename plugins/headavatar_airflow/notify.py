"""Failure alerts: an e-mail when a stage fails for good (its retries used up, or a final error such as exit 2).

An Airflow notifier (``on_failure_callback``), so it runs in the task's own process with the task's
context; subject and body are Jinja templates rendered from that context. The SMTP server is the
Airflow connection ``headavatar_alerts`` (host, port, login/password when the server wants them;
extra ``to`` = comma-separated recipients, ``from_email``, ``starttls``/``ssl`` booleans). Without that
connection the notifier only logs: alerts are opt-in, a missing one never fails a task.
"""

from __future__ import annotations

import smtplib
from email.message import EmailMessage
from typing import Any

from airflow.sdk import BaseHook, BaseNotifier

ALERTS_CONN_ID = "headavatar_alerts"
SUBJECT = "[headavatar] capture {{ params.get('id', '-') }}: {{ ti.task_id }} failed (try {{ ti.try_number }})"
BODY = """Capture:  {{ params.get('id', '-') }}
Stage:    {{ ti.task_id }}
Try:      {{ ti.try_number }} of {{ ti.max_tries + 1 }}
DAG run:  {{ ti.dag_id }} / {{ run_id }}
Error:    {{ exception }}
Log:      {{ ti.log_url }}
"""


class StageFailureNotifier(BaseNotifier):
    """Mails who is on call which capture and stage failed, on which try, and where its log is."""

    template_fields = ("subject", "body")

    def __init__(self, conn_id: str = ALERTS_CONN_ID, subject: str = SUBJECT, body: str = BODY):
        super().__init__()
        self.conn_id, self.subject, self.body = conn_id, subject, body

    def notify(self, context: Any) -> None:
        try:
            conn = BaseHook.get_connection(self.conn_id)
        except Exception:  # no alert channel configured
            self.log.info("no %s connection: failure not mailed (%s)", self.conn_id, self.subject)
            return
        extra = conn.extra_dejson
        recipients = [a.strip() for a in str(extra.get("to", "")).split(",") if a.strip()]
        if not recipients:
            self.log.warning("connection %s has no 'to' in its extra: failure not mailed", self.conn_id)
            return
        msg = EmailMessage()
        msg["Subject"], msg["From"] = self.subject, extra.get("from_email") or "headavatar@localhost"
        msg["To"] = ", ".join(recipients)
        msg.set_content(self.body)
        smtp_cls = smtplib.SMTP_SSL if _flag(extra.get("ssl")) else smtplib.SMTP
        with smtp_cls(conn.host or "localhost", int(conn.port or 25), timeout=30) as server:
            if _flag(extra.get("starttls")):
                server.starttls()
            if conn.login:
                server.login(conn.login, conn.password or "")
            server.send_message(msg)
        self.log.info("failure mailed to %s", msg["To"])


def _flag(value: object) -> bool:
    """A connection extra's boolean, which the UI and env URIs may give as a string ("false")."""
    return value is True or str(value).strip().lower() in ("1", "true", "yes", "on")
