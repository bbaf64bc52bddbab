"""The playground page (`GET /playground`, linked from `/`): one HTML file, no build step, that
talks to /v1 like any client (app/static/playground.html)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse

router = APIRouter(tags=["playground"])
PAGE = Path(__file__).parent / "static" / "playground.html"

INDEX = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>offramp</title></head>
<body style="font: 16px/1.5 system-ui, sans-serif; max-width: 40em; margin: 2em auto; padding: 0 1em">
<h1>offramp</h1><p>Early-exit text classification: every request picks its own speed/accuracy trade-off.</p>
<ul><li><a href="/playground">Playground</a>: try the models, move the threshold, see where each row leaves</li>
<li><a href="/docs">API documentation</a> (/v1 and the Open Inference Protocol /v2)</li>
<li><a href="/v1/models">/v1/models</a>, <a href="/metrics">/metrics</a>, <a href="/health/ready">/health/ready</a></li>
</ul></body></html>"""


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index() -> HTMLResponse:
    return HTMLResponse(INDEX)


@router.get("/playground", response_class=FileResponse, include_in_schema=False)
async def playground() -> FileResponse:
    return FileResponse(PAGE, media_type="text/html")
