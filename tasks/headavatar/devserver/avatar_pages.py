"""The avatar pages of ``make demo-ui``: each capture's animated avatar, served from the bucket as it is now.

Stage 6 writes ``viewer/avatar.html`` (:mod:`headavatar.web_viewer`). The page needs an HTTP origin (its
sort and data workers are module workers from ``blob:`` URLs, which Chromium refuses to pages from files),
so the demo serves it: ``/`` lists the captures with an avatar, ``/<capture>/avatar.html`` is the page. Read
only; nothing else of the bucket is served.
"""

from __future__ import annotations

import argparse
import html
import logging
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from headavatar.capture_id import validate_capture_id
from headavatar.contract.stage import read_manifest
from headavatar.errors import InvalidCaptureId, MissingObject
from headavatar.layout import stage_prefix
from headavatar.settings import load_config
from headavatar.storage import ObjectStore

log = logging.getLogger("headavatar.avatar_pages")
PAGE = "viewer/avatar.html"


def captures_with_page(store: ObjectStore) -> list[str]:
    """The captures whose live stage-6 result has the page."""
    out = []
    for capture in store.list_dirs(store.key("avatars")):
        m = read_manifest(store, capture, "gaussianhead")
        if m is not None and PAGE in m.files:
            out.append(capture)
    return out


def handler(store: ObjectStore) -> type[BaseHTTPRequestHandler]:
    class Pages(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = self.path.split("?")[0].strip("/").split("/")
            try:
                if parts == [""]:
                    links = "".join(f"<li><a href='{html.escape(c)}/avatar.html'>{html.escape(c)}</a></li>"
                                    for c in captures_with_page(store))
                    body = (f"<!doctype html><meta charset=utf-8><title>Avatars</title><h1>Animated avatars</h1>"
                            f"<ul>{links or '<li>none yet: a capture run writes one when stage 6 finishes</li>'}"
                            f"</ul>").encode()
                elif len(parts) == 2 and parts[1] == "avatar.html":
                    capture = validate_capture_id(parts[0])
                    body = store.get_bytes(store.key(stage_prefix(capture, "gaussianhead"), PAGE))
                else:
                    self.send_error(404)
                    return
            except (InvalidCaptureId, MissingObject) as e:  # a bad id, a capture without the page
                self.send_error(404, str(e).splitlines()[0][:200])
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args: object) -> None:
            log.info("%s " + fmt, self.address_string(), *args)

    return Pages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store = ObjectStore(load_config("demo").storage)  # the bucket and its credentials from the environment
    server = ThreadingHTTPServer((args.host, args.port), handler(store))
    log.info("serving avatar pages on http://%s:%d/", args.host, args.port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
