"""``ptune serve``: saved adapters on one frozen base behind a small HTTP API (FastAPI + uvicorn).

    ptune serve bbc=runs/bbc wnut=runs/wnut-lora --port 8000
    curl -s localhost:8000/v1/predict -H 'content-type: application/json' \\
         -d '{"adapter": "bbc", "inputs": ["The striker scored twice"]}'

Labelling adapters (classification, tagging, verbalizer heads; every method an
:class:`~ptune.adapter_set.AdapterSet` accepts) share one base in one ``AdapterSet``. **Dynamic
batching across tasks**: requests of any adapters wait in one asyncio queue; a single background task
gathers them for up to ``max_wait_ms`` or ``max_batch_size`` rows and scores them in one
``AdapterSet.predict_batch`` call, i.e. one forward pass of the body for the whole mixed batch. Every
model call (batches, generation, loading and unloading adapters) runs in ONE worker thread, so
requests never race on the model and the event loop stays free to accept more requests.

Causal-LM adapters (``causal_lm`` head) answer ``POST /v1/generate``. An ``AdapterSet`` cannot hold
them, so each is held as a :class:`ptune.engine.Run`, which loads **its own copy** of the base; it must
be the same base as the labelling adapters' (same name, or the same fingerprint), otherwise startup
fails. Generation is not batched across requests: one request's prompts are generated together on
the worker thread, between scoring batches.

Endpoints: ``POST /v1/predict``, ``POST /v1/generate``, ``GET /v1/adapters``, ``POST /v1/adapters``
and ``DELETE /v1/adapters/{name}`` (only with ``allow_admin``), ``GET /health``, ``GET /metrics``
(Prometheus text), ``GET /`` (a playground page) and FastAPI's ``/docs``. Every error is JSON,
``{"error": "<what is wrong and how to fix it>"}``, with a 4xx status for a bad request; a batch that
fails fails only its own requests (each is retried alone), never the server.

``create_app`` builds the app in-process (tests use ``fastapi.testclient.TestClient``); ``serve``
runs it under uvicorn, with a graceful shutdown on SIGTERM / Ctrl-C (uvicorn stops accepting
connections and waits for open requests, then the app's lifespan drains the queue).
"""

# The names below were importable from the single-module ``ptune.serve``; they stay importable from here.
from .app import create_app, serve
from .page import PLAYGROUND  # noqa: F401
from .schemas import (ERRORS, NAME_RE, AddAdapterRequest, ApiError, ErrorResponse, GenerateRequest,  # noqa: F401
                      GenerateResponse, Generation, Input, Limits, PredictRequest, Prediction, PredictResponse)
from .adapters import Adapters  # noqa: F401
from .metrics import Metrics  # noqa: F401
from .service import Service  # noqa: F401

__all__ = ["Adapters", "Limits", "create_app", "serve"]
