"""The demo page and the browser client, served on the WebSocket port.

A plain HTTP ``GET /`` (no upgrade) returns ``clients/index.html`` and
``GET /clients/<file>`` the files beside it, same origin as the WebSocket, with a
strict Content-Security-Policy. ``SERVE_DEMO=false`` turns it off.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from ttsstream.core.admission import HttpAnswer

__all__ = ["CLIENTS_DIR", "load_static"]

logger = logging.getLogger("ttsstream.http.demo")

#: The browser client and the demo page, served on the WebSocket port: clients/ in
#: a source checkout, else where a non-editable install put it.
CLIENTS_DIR = next(
    (
        directory
        for directory in (
            Path(__file__).resolve().parents[2] / "clients",
            Path(sys.prefix) / "share" / "ttsstream" / "clients",
        )
        if (directory / "index.html").is_file()
    ),
    Path(__file__).resolve().parents[2] / "clients",
)
_STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
_DEMO_HEADERS = (
    (
        "Content-Security-Policy",
        "default-src 'self'; connect-src 'self'; media-src 'self' blob:; img-src 'self' data:; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-cache"),
)


def load_static() -> dict[str, HttpAnswer]:
    """URL path -> response, for the demo page and the files beside it."""
    if not CLIENTS_DIR.is_dir():
        logger.warning("demo: %s not found; GET / is not served", CLIENTS_DIR)
        return {}
    files = {}
    for file in sorted(CLIENTS_DIR.iterdir()):
        content_type = _STATIC_TYPES.get(file.suffix)
        if content_type is not None and file.is_file():
            headers = (("Content-Type", content_type), *_DEMO_HEADERS)
            files[f"/clients/{file.name}"] = HttpAnswer(200, headers, file.read_bytes())
    if "/clients/index.html" in files:
        files["/"] = files["/clients/index.html"]
    return files
