"""The HTTP service (race_classifier.serving): API, limits and refusals, and the web page in a real browser.

API tests use FastAPI's TestClient with a small trained checkpoint; without ../shared they classify the
synthetic images whole (``detect=False``), with it they detect the faces of a photo composed from FairFace
crops. The browser test drives headless Chromium (Debian's chromium + chromium-driver) through selenium
against a real uvicorn server; it skips when those are absent, unless RC_REQUIRE_BROWSER=1.
"""
from __future__ import annotations

import dataclasses
import io
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from race_classifier.cli import build_parser
from race_classifier.inference.classifier import Classifier
from race_classifier.inference.compose import compose_photo
from race_classifier.serving.app import create_app
from race_classifier.serving.cli import build_app, serve_in_thread
from race_classifier.serving.limits import Limits

FAIRFACE = pytest.mark.shared("data/fairface/train")
LIMITS = Limits(max_bytes=200_000, max_pixels=500_000, max_batch=3, workers=2, queue=2)


def encode(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def checkpoint(trained_checkpoints) -> Path:
    return trained_checkpoints[1]


@pytest.fixture(scope="module")
def crop_classifier(checkpoint) -> Classifier:
    return Classifier.load(checkpoint, detect=False)


@pytest.fixture(scope="module")
def client(crop_classifier):
    with TestClient(create_app(crop_classifier, LIMITS)) as c:
        yield c


@pytest.fixture(scope="module")
def images(manifests) -> list[bytes]:
    """Three synthetic pattern images as PNG bytes."""
    return [p.read_bytes() for p in sorted((manifests.parent / "images").rglob("*.png"))[:3]]


@pytest.fixture
def photo(shared_dir) -> tuple[bytes, list]:
    """A 640x480 JPEG with 4 FairFace faces, and where they were placed."""
    shared = shared_dir / "data/fairface/train"
    crops = [Image.open(shared / f"{i}.jpg") for i in range(2001, 2005)]
    im, placements = compose_photo(crops, seed=3)
    return encode(im, "JPEG"), placements


def error(r, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code, body
    assert body["detail"]
    return body["detail"]


# --- predictions ------------------------------------------------------------------------------------------

def test_predict_multipart_and_raw_bytes_give_the_same_result(client, images, crop_classifier):
    a = client.post("/v1/predict", files={"image": ("a.png", images[0], "image/png")})
    b = client.post("/v1/predict", content=images[0], headers={"content-type": "image/png"})
    assert a.status_code == b.status_code == 200, a.text
    ja, jb = a.json(), b.json()
    assert ja["classes"] == list(crop_classifier.classes)
    assert ja["status"] == "ok" and ja["source"] == "a.png" and (ja["width"], ja["height"]) == (32, 32)
    [face] = ja["faces"]
    assert face["box"] is None and face["label"] in ja["classes"]
    assert sum(face["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    assert face["probabilities"] == jb["faces"][0]["probabilities"]
    direct = crop_classifier.predict(Image.open(io.BytesIO(images[0])))
    assert face["probabilities"] == pytest.approx(direct.faces[0].probabilities, abs=1e-6)


def test_batch_keeps_order_and_reports_unreadable_images(client, images):
    files = [("images", ("a.png", images[0], "image/png")), ("images", ("bad.jpg", b"not an image", "image/jpeg")),
             ("images", ("c.png", images[2], "image/png"))]
    r = client.post("/v1/predict/batch", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["source"] for x in results] == ["a.png", "bad.jpg", "c.png"]
    assert [x["status"] for x in results] == ["ok", "error", "ok"]
    assert "not an image" in results[1]["error"]


def test_abstention_per_request(crop_classifier, images):
    strict = Classifier(crop_classifier.predictor, detect=False, min_confidence=1.01)  # every face uncertain
    with TestClient(create_app(strict, LIMITS)) as c:
        default = c.post("/v1/predict", content=images[0], headers={"content-type": "image/png"}).json()
        off = c.post("/v1/predict?abstain=0", content=images[0], headers={"content-type": "image/png"}).json()
    assert default["faces"][0]["label"] == "uncertain" and default["abstention_threshold"] == 1.01
    assert off["faces"][0]["label"] == off["faces"][0]["top_label"] and off["abstention_threshold"] is None
    bare = Classifier(dataclasses.replace(crop_classifier.predictor, calibration=None), detect=False)
    with TestClient(create_app(bare, LIMITS)) as c:
        r = c.post("/v1/predict?abstain=1", content=images[0], headers={"content-type": "image/png"})
    assert "abstention threshold" in error(r, 422, "no_abstention_threshold")


# --- refusals ---------------------------------------------------------------------------------------------

def test_bad_inputs_are_refused_with_clear_json_errors(client, images):
    jpeg = encode(Image.open(io.BytesIO(images[0])).convert("RGB").resize((200, 200)), "JPEG")

    def raw(body, content_type):
        return client.post("/v1/predict", content=body, headers={"content-type": content_type})

    assert "empty" in error(raw(b"", "image/jpeg"), 422, "empty_image")
    assert "text/plain" in error(raw(b"hello", "text/plain"), 415, "unsupported_media_type")
    error(raw(b'{"path": "/etc/passwd"}', "application/json"), 415, "unsupported_media_type")  # bytes only
    error(raw(os.urandom(2000), "image/jpeg"), 422, "not_an_image")
    assert "truncated" in error(raw(jpeg[:len(jpeg) // 2], "image/jpeg"), 422, "unreadable_image")
    error(client.post("/v1/predict", files={"image": ("a.txt", b"hello", "text/plain")}), 415,
          "unsupported_media_type")
    error(client.post("/v1/predict", files={"photo": ("a.png", images[0], "image/png")}), 422, "missing_file")
    error(client.post("/v1/predict", data={"image": "/etc/passwd"}, files={"x": ("x", b"x", "image/png")}),
          422, "not_a_file")
    error(client.post("/v1/predict/batch", content=images[0], headers={"content-type": "image/png"}), 415,
          "unsupported_media_type")


def test_size_pixel_and_count_limits(client, images):
    big = os.urandom(LIMITS.max_bytes + 1)
    assert "over the limit" in error(client.post("/v1/predict", content=big, headers={"content-type": "image/png"}),
                                     413, "payload_too_large")
    error(client.post("/v1/predict", files={"image": ("big.png", big, "image/png")}), 413, "payload_too_large")
    # 1000x1000 pixels in a few kB: refused from its header, over max_pixels (500,000).
    flat = encode(Image.new("RGB", (1000, 1000), (90, 120, 150)))
    assert len(flat) < LIMITS.max_bytes
    assert "1000x1000" in error(client.post("/v1/predict", files={"image": ("flat.png", flat, "image/png")}),
                                413, "too_many_pixels")
    files = [("images", (f"{i}.png", images[i % 3], "image/png")) for i in range(LIMITS.max_batch + 1)]
    error(client.post("/v1/predict/batch", files=files), 413, "too_many_images")


class SlowClassifier(Classifier):
    """Holds every prediction until ``release`` is set: fills the worker pool on demand."""
    release = threading.Event()

    def predict_batch(self, *args, **kwargs):
        self.release.wait(30)
        return super().predict_batch(*args, **kwargs)


def test_requests_beyond_workers_and_queue_get_503(crop_classifier, images):
    slow = SlowClassifier(crop_classifier.predictor, detect=False)
    with TestClient(create_app(slow, Limits(workers=1, queue=0))) as c:
        first = {}
        t = threading.Thread(target=lambda: first.setdefault("r", c.post(
            "/v1/predict", content=images[0], headers={"content-type": "image/png"})))
        t.start()
        deadline = time.monotonic() + 20
        while c.get("/healthz").json()["active"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        busy = c.post("/v1/predict", content=images[0], headers={"content-type": "image/png"})
        slow.release.set()
        t.join(30)
    error(busy, 503, "busy")
    assert first["r"].status_code == 200


# --- model, health, docs, page ----------------------------------------------------------------------------

def test_healthz_model_and_offline_docs(client, checkpoint, crop_classifier):
    assert client.get("/healthz").json()["status"] == "ok"
    m = client.get("/v1/model").json()
    assert m["classes"] == list(crop_classifier.classes) and m["taxonomy"] == crop_classifier.predictor.taxonomy.name
    assert m["preprocessing"]["image_size"] == 32 and m["detect"] is False
    assert m["calibration"] == crop_classifier.predictor.calibration
    assert m["model_card"] == (checkpoint.parent / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "path" not in m["info"]  # the server's file system stays private
    schema = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/predict/batch", "/v1/model", "/healthz"} <= set(schema["paths"])
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/v1/predict/batch" in docs.text
    assert "http://" not in docs.text and "https://" not in docs.text  # nothing loaded from a CDN


def test_page_is_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and "<canvas" in r.text
    assert "http://" not in r.text and "https://" not in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]


def test_serve_command_is_registered():
    args = build_parser().parse_args(["serve", "--model_path", "m.onnx", "--port", "0", "--workers", "3", "--abstain"])
    assert (args.model_path, args.port, args.workers, args.abstain) == ("m.onnx", 0, 3, True)


def test_serve_describes_a_model_file_without_metadata_as_predict_does(checkpoint, manifests, tmp_path):
    """A TorchScript model trained at 32 px with mean/std 0.5 is served at that size and normalisation."""
    import torch

    from race_classifier.models.checkpoint import load_model
    from race_classifier.serving.cli import build_app
    scripted = tmp_path / "model.torchscript.pt"
    torch.jit.trace(load_model(checkpoint).model, torch.randn(1, 3, 32, 32)).save(str(scripted))
    args = build_parser().parse_args(["serve", "--model", str(scripted), "--labels", str(manifests / "classes.txt"),
                                      "--image_size", "32", "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5",
                                      "0.5", "--no-detect"])
    app, _ = build_app(args)
    client = TestClient(app)
    info = client.get("/v1/model").json()
    assert info["preprocessing"]["image_size"] == 32 and info["preprocessing"]["mean"] == [0.5, 0.5, 0.5]


def test_serve_runs_the_model_as_told_tta_and_precision(checkpoint, images):
    """serve --tta --amp bf16 answers what Classifier.load with those options answers, and says so in
    /v1/model; precision the device cannot run is refused when the server starts."""
    from race_classifier.models.loaders import ModelLoadError
    from race_classifier.serving.cli import build_app
    args = build_parser().parse_args(["serve", "--model", str(checkpoint), "--no-detect", "--tta", "--amp", "bf16"])
    app, _ = build_app(args)
    with TestClient(app) as c:
        served = c.post("/v1/predict", content=images[0], headers={"content-type": "image/png"}).json()
        info = c.get("/v1/model").json()["info"]
    assert info["tta"] != "none" and "bf16" in str(info)
    same = Classifier.load(checkpoint, detect=False, tta=True, amp="bf16").predict(Image.open(io.BytesIO(images[0])))
    plain = Classifier.load(checkpoint, detect=False).predict(Image.open(io.BytesIO(images[0])))
    got = served["faces"][0]["probabilities"]
    assert got == pytest.approx(same.faces[0].probabilities, abs=1e-6)
    assert got != pytest.approx(plain.faces[0].probabilities, abs=1e-6)
    with pytest.raises(ModelLoadError, match="fp16 needs a CUDA device"):
        build_app(build_parser().parse_args(["serve", "--model", str(checkpoint), "--amp", "fp16"]))


# --- real faces ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def face_app(checkpoint):
    return create_app(Classifier.load(checkpoint), Limits(workers=2))


@FAIRFACE
def test_faces_of_a_photo_are_found_where_they_were_placed(face_app, photo):
    data, placements = photo
    with TestClient(face_app) as c:
        r = c.post("/v1/predict", files={"image": ("group.jpg", data, "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"]) == (640, 480) and len(body["faces"]) == 4
    for p in placements:
        centres = [((f["box"][0] + f["box"][2]) / 2, (f["box"][1] + f["box"][3]) / 2) for f in body["faces"]]
        assert min(np.hypot(x - p.centre[0], y - p.centre[1]) for x, y in centres) < 0.25 * p.side
    assert all(len(f["landmarks"]) == 5 and f["label"] in body["classes"] for f in body["faces"])


# --- the web page in headless Chromium ---------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def require_browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    if not missing:
        return
    if os.environ.get("RC_REQUIRE_BROWSER", "").strip().lower() in ("1", "true", "yes"):
        pytest.fail(f"RC_REQUIRE_BROWSER is set but these are missing: {', '.join(missing)}")
    pytest.skip(f"browser test needs {', '.join(missing)} (apt-get install chromium chromium-driver); "
                "set RC_REQUIRE_BROWSER=1 to make this a failure")


@pytest.fixture
def browser(tmp_path):
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def upload_in_page(browser, url: str, path: Path) -> str:
    """Open the page, choose ``path`` as the photo, wait until it is done; the status line it shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    browser.get(url + "/")
    WebDriverWait(browser, 30).until(lambda d: "classes:" in d.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "file").send_keys(str(path))
    WebDriverWait(browser, 60).until(lambda d: d.execute_script("return document.body.dataset.state") == "done")
    return browser.find_element(By.ID, "status").text


@FAIRFACE
def test_page_uploads_a_photo_and_shows_boxes_labels_and_bars(browser, face_app, photo, tmp_path):
    from selenium.webdriver.common.by import By
    path = tmp_path / "group.jpg"
    path.write_bytes(photo[0])
    with serve_in_thread(face_app) as url:
        status = upload_in_page(browser, url, path)
        cards = browser.find_elements(By.CSS_SELECTOR, "#faces .face")
        boxes = browser.execute_script("return window.rcBoxesDrawn")
        width = browser.execute_script("return document.getElementById('canvas').width")
        classes = browser.find_element(By.ID, "model").text.split("classes:")[1].split(", ")
        labels = [c.get_attribute("data-label") for c in cards]
        bars = browser.find_elements(By.CSS_SELECTOR, "#faces .face .bar")
    assert status == "4 faces", status
    assert boxes == 4 and len(cards) == 4 and width == 640
    assert all(label.strip() in [c.strip() for c in classes] + ["uncertain"] for label in labels)
    assert len(bars) == 4 * len(classes)


def test_page_with_the_bundled_model_labels_every_face_of_the_bundled_group_photo(browser):
    """What a new user sees first: `race-classifier serve` (the bundled seed5 model), the demo's group photo
    uploaded, a box and a real class label on each face."""
    from selenium.webdriver.common.by import By

    from race_classifier.models.bundled import manifest
    photo = Path(__file__).resolve().parents[1] / "demo" / "group_photo.jpg"
    faces = manifest()["demo"]["group_photo"]["faces"]
    app, _ = build_app(build_parser().parse_args(["serve"]))
    with serve_in_thread(app) as url:
        status = upload_in_page(browser, url, photo)
        labels = [c.get_attribute("data-label") for c in browser.find_elements(By.CSS_SELECTOR, "#faces .face")]
        boxes = browser.execute_script("return window.rcBoxesDrawn")
        model = browser.find_element(By.ID, "model").text
        # The drop box sits below the model line (an inline label's padding used to overlap it).
        gap = browser.execute_script("return document.getElementById('drop').getBoundingClientRect().top - "
                                     "document.getElementById('model').getBoundingClientRect().bottom")
    assert gap >= 0, gap
    assert status == f"{faces} faces", status
    assert boxes == faces and len(labels) == faces
    assert "Asian, Black, Indian, White, Latino_Hispanic" in model
    assert all(label.strip() in ("Asian", "Black", "Indian", "White", "Latino_Hispanic") for label in labels)


def test_page_shows_a_refusal_that_is_not_json_as_an_error(browser, crop_classifier, images, tmp_path):
    """A proxy, or uvicorn at its connection limit, answers 503 in plain text: the page says so, instead of
    a JSON parse error."""
    from starlette.responses import PlainTextResponse
    app = create_app(crop_classifier, LIMITS)

    @app.middleware("http")
    async def overloaded(request, call_next):
        if request.url.path == "/v1/predict":
            return PlainTextResponse("Service Unavailable", status_code=503)
        return await call_next(request)
    path = tmp_path / "pattern.png"
    path.write_bytes(images[0])
    with serve_in_thread(app) as url:
        status = upload_in_page(browser, url, path)
    assert status == "Error: HTTP 503 Service Unavailable", status


def test_decompression_bomb_refused_by_concurrent_decodes_without_touching_global_warnings(monkeypatch):
    """Uploads are decoded in worker threads at once. ``warnings.catch_warnings`` is not thread-safe: when one
    decode left its block it took away the other's "bomb warning is an error" filter (that upload was then
    decoded), and the last to leave put its own filter back process-wide. The limit must hold either way."""
    import warnings

    from race_classifier.serving import limits as limits_module
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL warns over 1000 pixels, refuses over 2000
    small, bomb = encode(Image.new("RGB", (20, 20))), encode(Image.new("RGB", (40, 40)))  # 400 and 1600 pixels
    a_in, b_in, a_done = threading.Event(), threading.Event(), threading.Event()
    real_open = Image.open

    def open_in_turn(fp, *args, **kwargs):  # A opens, then B enters, A finishes, then B opens its bomb
        if threading.current_thread().name == "A":
            a_in.set()
            b_in.wait(10)
        else:
            b_in.set()
            a_done.wait(10)
        return real_open(fp, *args, **kwargs)
    monkeypatch.setattr(Image, "open", open_in_turn)
    before = list(warnings.filters)
    results = {}

    def decode(name, data):
        try:
            results[name] = limits_module.decode_image(data, max_pixels=10**9).size
        except limits_module.ApiError as e:
            results[name] = (e.status, e.code)
        finally:
            if name == "A":
                a_done.set()
    threads = [threading.Thread(target=decode, args=("A", small), name="A")]
    threads[0].start()
    assert a_in.wait(10)
    threads.append(threading.Thread(target=decode, args=("B", bomb), name="B"))
    threads[1].start()
    for t in threads:
        t.join(20)
    assert results == {"A": (20, 20), "B": (413, "too_many_pixels")}
    assert warnings.filters == before


def test_an_invalid_query_parameter_is_refused_in_the_documented_error_format(client, images):
    """Every refusal is {"error": code, "detail": text} (README, /docs), FastAPI's own validation errors too."""
    r = client.post("/v1/predict?abstain=maybe", content=images[0], headers={"content-type": "image/png"})
    detail = error(r, 422, "invalid_parameter")
    assert "abstain" in detail and "maybe" in detail


def test_unknown_paths_and_wrong_methods_are_refused_in_the_documented_error_format(client):
    """404 and 405 come from Starlette's routing, not from our endpoints: they too are {"error", "detail"},
    not FastAPI's {"detail": ...}; a 405 keeps its Allow header."""
    r = client.get("/v1/nope")
    assert set(r.json()) == {"error", "detail"}
    assert "/v1/nope" in error(r, 404, "not_found")
    r = client.get("/v1/predict")
    assert set(r.json()) == {"error", "detail"}
    detail = error(r, 405, "method_not_allowed")
    assert "GET" in detail and "POST" in detail and r.headers["allow"] == "POST"
    r = client.delete("/healthz")
    assert error(r, 405, "method_not_allowed") and set(r.json()) == {"error", "detail"}
