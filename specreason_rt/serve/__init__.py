"""The HTTP server: an OpenAI-compatible API over a ReasonerPool (`specreason serve`).

Needs the serve extra: pip install 'specreason-rt[serve]' (starlette, uvicorn, pydantic, prometheus-client).
Modules: schema (request bodies and their mapping to ReasonConfig), errors (OpenAI-style error bodies),
metrics (Prometheus), app (routes), responses (OpenAI response objects and SSE chunks), runner (uvicorn).
"""

from __future__ import annotations

import importlib.util

_NEEDED = ("starlette", "uvicorn", "pydantic", "prometheus_client")
_missing = [m for m in _NEEDED if importlib.util.find_spec(m) is None]
if _missing:
    raise ImportError(f"specreason_rt.serve needs {', '.join(_missing)}: pip install 'specreason-rt[serve]'")
