"""The HTTP service: a FastAPI app around one ``Classifier``.

    app = create_app(Classifier.load("model.onnx"), Limits(workers=2))

``POST /v1/predict`` (multipart field ``image``, or raw bytes sent as ``image/*``) and ``POST
/v1/predict/batch`` (multipart, several ``images``) return the Classifier's results as JSON (with each face's
gender and age group when the model has those heads); ``GET /v1/model`` describes the model (heads and
classes, preprocessing, calibration, model card); ``GET /healthz``; ``GET /``
is the web page; ``GET /docs`` an offline page generated from ``/openapi.json`` (FastAPI's own docs page
loads Swagger UI from a CDN, so it is switched off).

Clients send bytes only: no path from a request ever reaches the file system, and uploads are decoded from
memory, never spooled to disk. Inference runs in a pool of ``Limits.workers`` threads; requests beyond
``workers + queue`` get 503 at once. The labels are perceived, socially constructed categories.
"""
from __future__ import annotations

import asyncio
import html
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict
from http import HTTPStatus
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from race_classifier.inference.classifier import UNCERTAIN, Classifier, ImagePrediction
from race_classifier.serving.limits import (
    Admission,
    ApiError,
    Limits,
    check_image_type,
    decode_image,
    too_large,
)

log = logging.getLogger("race_classifier.serving")

STATIC = Path(__file__).resolve().parent / "static"
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around the image bytes
# The page is self-contained: nothing may load from elsewhere, and scripts run only from the page itself.
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
            "script-src 'self' 'unsafe-inline'; connect-src 'self'; object-src 'none'; base-uri 'none'")
NOTE = "Labels are perceived, socially constructed categories, not facts about a person."

_BINARY = {"type": "string", "format": "binary"}
_ERRORS = {status: {"description": text, "content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "string"}, "detail": {"type": "string"}}}}}}
    for status, text in [(413, "upload, image or batch too large"), (415, "not an image content type"),
                         (422, "empty, unreadable or truncated image, or a malformed form"),
                         (503, "at capacity: retry shortly")]}
PREDICT_DOC = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {"image": _BINARY}}},
    "image/jpeg": {"schema": _BINARY}, "image/png": {"schema": _BINARY}}}}
BATCH_DOC = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["images"],
    "properties": {"images": {"type": "array", "items": _BINARY}}}}}}}
ABSTAIN = Query(None, description="label faces below the abstention threshold 'uncertain' (1) or never (0); "
                                  "default: as the server was started")


# --- reading uploads ------------------------------------------------------------------------------------

async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused (413) as soon as it is over ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def form_files(request: Request, body: bytes, field: str) -> list[tuple[str, bytes]]:
    """(filename, bytes) of each file in multipart ``field``, parsed from the body already in memory."""
    async def stream() -> AsyncIterator[bytes]:
        yield body
    parser = MultiPartParser(request.headers, stream(), max_fields=100)
    parser.spool_max_size = len(body) + 1  # the body is bounded already: keep every part in memory
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise ApiError(422, "bad_form", f"malformed multipart form: {e.message}") from None
    try:
        out = []
        for value in form.getlist(field):
            if not isinstance(value, UploadFile):
                raise ApiError(422, "not_a_file", f"form field {field!r} must be a file upload, not text")
            check_image_type(value.content_type, f"file {value.filename!r}")
            out.append((value.filename or "upload", await value.read()))
        if not out:
            raise ApiError(422, "missing_file", f"no file in form field {field!r}")
        return out
    finally:
        await form.close()


async def single_upload(request: Request, limits: Limits) -> tuple[str, bytes]:
    kind = media_type(request)
    if kind == "multipart/form-data":
        body = await read_body(request, limits.max_bytes + MULTIPART_OVERHEAD)
        files = await form_files(request, body, "image")
        if len(files) > 1:
            raise ApiError(422, "too_many_images", "send one file as 'image' (or use /v1/predict/batch)")
    else:
        check_image_type(kind or "(none)")
        files = [("upload", await read_body(request, limits.max_bytes))]
    name, data = files[0]
    if len(data) > limits.max_bytes:
        raise too_large(len(data), limits.max_bytes)
    return name, data


async def batch_uploads(request: Request, limits: Limits) -> list[tuple[str, bytes]]:
    if media_type(request) != "multipart/form-data":
        raise ApiError(415, "unsupported_media_type", "send the images as multipart/form-data, field 'images'")
    body = await read_body(request, limits.max_batch * (limits.max_bytes + MULTIPART_OVERHEAD))
    files = await form_files(request, body, "images")
    if len(files) > limits.max_batch:
        raise ApiError(413, "too_many_images", f"{len(files)} images is over the limit of {limits.max_batch} "
                       "a request")
    for name, data in files:
        if len(data) > limits.max_bytes:
            raise ApiError(413, "payload_too_large", f"file {name!r} of {len(data)} bytes is over the limit "
                           f"of {limits.max_bytes} bytes")
    return files


# --- results --------------------------------------------------------------------------------------------

def abstention_threshold(classifier: Classifier, abstain: bool | None) -> float | None:
    """The confidence below which faces are 'uncertain' for this request (None: never)."""
    if abstain is None:
        return classifier.min_confidence
    if not abstain:
        return None
    threshold = classifier.min_confidence
    if threshold is None:
        threshold = classifier.predictor.abstention_threshold
    if threshold is None:
        raise ApiError(422, "no_abstention_threshold", "this model has no stored abstention threshold "
                       "(calibrate it with `race-classifier calibrate`)")
    return threshold


def classes_json(classifier: Classifier) -> dict:
    """The race classes of every response; for a model with gender / age-group heads, those heads' too."""
    heads = classifier.heads_description()
    return {"classes": list(classifier.classes), **({"heads": heads} if heads else {})}


def result_json(result: ImagePrediction, threshold: float | None) -> dict:
    for face in result.faces:  # relabelled per request: the classifier itself is shared; only race abstains
        face.label = UNCERTAIN if threshold is not None and face.confidence < threshold else face.top_label
    return result.to_dict()


def classify(classifier: Classifier, images: list[tuple[str, Image.Image | str]]) -> list[ImagePrediction]:
    """Results in order; an image given as a string is one that failed to decode, and that is its error."""
    decoded = [im for _, im in images if isinstance(im, Image.Image)]
    results = iter(classifier.predict_batch(decoded))
    out = []
    for name, im in images:
        result = next(results) if isinstance(im, Image.Image) else ImagePrediction(name, error=im)
        result.source = name[:200]  # the client's file name, echoed back only
        out.append(result)
    return out


def model_description(classifier: Classifier, limits: Limits, card: str | None) -> dict:
    p = classifier.predictor
    info = {k: v for k, v in p.info.items() if k != "path"}  # the server's paths are not the client's business
    return json.loads(json.dumps({
        "name": p.name, "kind": p.kind, "classes": list(classifier.classes), "taxonomy": p.taxonomy.name,
        "heads": {"race": {"classes": list(classifier.classes)}, **classifier.heads_description()},
        "preprocessing": p.preprocessing.to_dict(), "calibration": p.calibration,
        "abstention_threshold": p.abstention_threshold, "min_confidence": classifier.min_confidence,
        "detect": classifier.detect, "info": info, "limits": asdict(limits), "model_card": card, "note": NOTE,
    }, default=str))


def read_model_card(classifier: Classifier) -> str | None:
    path = classifier.predictor.info.get("path")
    card = Path(path).parent / "MODEL_CARD.md" if path else None
    return card.read_text(encoding="utf-8") if card and card.is_file() else None


def docs_page(schema: dict) -> str:
    """A plain HTML rendering of the OpenAPI schema: works offline, unlike Swagger UI from a CDN."""
    rows = []
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            params = ", ".join(f"{q['name']} ({q.get('in')})" for q in op.get("parameters", []))
            bodies = ", ".join(op.get("requestBody", {}).get("content", {}))
            codes = ", ".join(op.get("responses", {}))
            rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
                method.upper(), path, op.get("summary", ""), op.get("description", ""), params, bodies, codes)))
    return ("<!doctype html><meta charset='utf-8'><title>API</title><style>body{font:14px sans-serif;margin:2em}"
            "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}table{border-collapse:collapse}</style>"
            f"<h1>{html.escape(schema['info']['title'])} API</h1><p>Machine-readable: "
            "<a href='/openapi.json'>/openapi.json</a>. Errors are JSON: {\"error\": code, \"detail\": text}.</p>"
            "<table><tr><th>method</th><th>path</th><th>summary</th><th>description</th><th>parameters</th>"
            "<th>request body</th><th>responses</th></tr>" + "".join(rows) + "</table>")


# --- the app --------------------------------------------------------------------------------------------

def _describe_invalid(err: dict) -> str:
    """One FastAPI validation error as a phrase: "query parameter 'abstain': <why> (got 'maybe')"."""
    loc, why = err.get("loc") or (), err.get("msg", "invalid")
    if len(loc) < 2:
        return str(why)
    got = err.get("input")
    return f"{loc[0]} parameter {loc[-1]!r}: {why}" + (f" (got {got!r})" if isinstance(got, (str, int, float)) else "")


def http_error_code(status: int) -> str:
    """404 -> 'not_found', 405 -> 'method_not_allowed': the status's reason phrase as a code."""
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return f"http_{status}"


def http_error_detail(request: Request, e) -> str:
    """A sentence for a Starlette HTTPException: where and what was refused."""
    path = request.url.path
    if e.status_code == 404 and e.detail in (None, "Not Found"):
        return f"no such endpoint: {path} (see /docs)"
    if e.status_code == 405:
        allowed = (e.headers or {}).get("Allow") or (e.headers or {}).get("allow")
        return f"{request.method} is not allowed on {path}" + (f"; use {allowed}" if allowed else "")
    return str(e.detail)


def create_app(classifier: Classifier, limits: Limits | None = None, *, model_card: str | None = None) -> FastAPI:
    """The service for ``classifier``. ``model_card``: its text; default the MODEL_CARD.md beside the model."""
    limits = limits or Limits()
    card = model_card if model_card is not None else read_model_card(classifier)
    admission = Admission(limits)
    if classifier.detect:
        classifier.detector  # built now, not raced for by the first concurrent requests
    pool: list[ThreadPoolExecutor] = []  # one per run of the app (a server, or a TestClient block)

    def executor() -> ThreadPoolExecutor:
        if not pool:
            pool.append(ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="rc-infer"))
        return pool[0]

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        if pool:
            pool.pop().shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="race-classifier", description=NOTE, lifespan=lifespan, docs_url=None, redoc_url=None)

    @contextmanager
    def admitted() -> Iterator[None]:
        admission.enter()  # before the body is read: a busy service does not buffer more uploads
        try:
            yield
        finally:
            admission.leave()

    async def infer(fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(executor(), fn, *args)

    def decode_all(files: list[tuple[str, bytes]], strict: bool) -> list[tuple[str, Image.Image | str]]:
        out = []
        for name, data in files:
            try:
                out.append((name, decode_image(data, limits.max_pixels)))
            except ApiError as e:
                if strict:
                    raise
                out.append((name, e.detail))
        return out

    def predict_files(files, strict: bool) -> list[ImagePrediction]:
        return classify(classifier, decode_all(files, strict))

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse({"error": e.code, "detail": e.detail}, status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        # Starlette's own refusals (404 unknown path, 405 wrong method, ...) are {"detail": ...} by default;
        # here they are {"error": code, "detail": text} like every other error. Their headers (Allow) stay.
        return JSONResponse({"error": http_error_code(e.status_code), "detail": http_error_detail(request, e)},
                            status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameter(_request: Request, e: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422 body is a list of objects; every refusal here is {"error": code, "detail": text}.
        detail = "; ".join(_describe_invalid(err) for err in e.errors())
        return JSONResponse({"error": "invalid_parameter", "detail": detail or "invalid request"}, status_code=422)

    @app.post("/v1/predict", summary="faces in one image", openapi_extra=PREDICT_DOC, responses=_ERRORS,
              description="Boxes, landmarks, labels, confidences and probabilities of each face (and its gender "
                          "and age group, when the model has those heads).")
    async def predict(request: Request, abstain: bool | None = ABSTAIN) -> JSONResponse:
        threshold = abstention_threshold(classifier, abstain)
        with admitted():
            name, data = await single_upload(request, limits)
            [result] = await infer(predict_files, [(name, data)], True)
        return JSONResponse({**classes_json(classifier), "abstention_threshold": threshold,
                             **result_json(result, threshold)})

    @app.post("/v1/predict/batch", summary=f"faces in up to {limits.max_batch} images", responses=_ERRORS,
              openapi_extra=BATCH_DOC, description="One result per image, in order; an unreadable image "
              "gets status 'error' and the rest go on.")
    async def predict_batch(request: Request, abstain: bool | None = ABSTAIN) -> JSONResponse:
        threshold = abstention_threshold(classifier, abstain)
        with admitted():
            files = await batch_uploads(request, limits)
            results = await infer(predict_files, files, False)
        return JSONResponse({**classes_json(classifier), "abstention_threshold": threshold,
                             "results": [result_json(r, threshold) for r in results]})

    @app.get("/v1/model", summary="the model: heads and classes, taxonomy, preprocessing, calibration, model card")
    async def model() -> JSONResponse:
        return JSONResponse(model_description(classifier, limits, card))

    @app.get("/healthz", summary="liveness and load")
    async def healthz() -> dict:
        return {"status": "ok", "active": admission.active, "capacity": admission.capacity}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"})

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(docs_page(app.openapi()))

    return app
