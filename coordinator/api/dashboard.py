"""The coordinator's live dashboard: HTML pages and their static files.

A read-only view over the JSON API: the pages are fixed HTML (under
``static/``) whose scripts poll ``/api`` every few seconds and draw with the
vendored uPlot. Nothing is fetched from another host, and every page is sent
with a Content-Security-Policy that allows only this origin's scripts, styles
and requests. Routes only translate: they look the run up and fill its id
into the page, HTML-escaped.
"""

from __future__ import annotations

import html
from functools import cache
from pathlib import Path
from string import Template

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from crowdtrain.coordinator import records
from crowdtrain.coordinator.store import Store

STATIC_DIR = Path(__file__).parent / "static"

# Only this origin, no inline script or style (uPlot styles its elements through the
# DOM, which a CSP allows), no plugins, no framing.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@cache
def _template(name: str) -> Template:
    return Template((STATIC_DIR / name).read_text(encoding="utf-8"))


def page(name: str, status_code: int = 200, **values: str) -> HTMLResponse:
    """A page from ``static/``, its ``$placeholders`` filled with HTML-escaped values."""
    escaped = {k: html.escape(v, quote=True) for k, v in values.items()}
    body = _template(name).substitute(escaped)
    return HTMLResponse(body, status_code=status_code, headers=PAGE_HEADERS)


def mount(app: FastAPI, store: Store) -> None:
    """Add the dashboard's pages and ``/static`` to the coordinator's HTTP app."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> HTMLResponse:
        """Every run of this coordinator, live."""
        return page("index.html")

    @app.get("/runs/{run_id}", include_in_schema=False)
    def run_page(run_id: str) -> HTMLResponse:
        """One run: loss, throughput, peers, leaderboard, coverage, checkpoint."""
        try:
            records.get_run(store, run_id)
        except records.UnknownRunError as e:
            return page("missing.html", status_code=404, message=str(e))
        return page("run.html", run_id=run_id)
