"""The HTTP server on tiny saved models: endpoints, errors, micro-batching, backend choice, CLI."""

from __future__ import annotations

import asyncio
import math
import sys
import threading
import types

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError

from slimformer import models
from slimformer.errors import SlimformerError
from slimformer.evaluate import torch_runner
from slimformer.serve import Backend, Predictor, ServeConfig, create_app, merge_entities, pick_backend
from slimformer.testing import tiny_bert

# A broken batcher would leave requests waiting forever: fail fast instead.
pytestmark = pytest.mark.timeout(60)

SENTENCES = ["a charming and often affecting journey", "boring", "the worst script in years , and far too long",
             "warm , funny and moving", "flat", "an ugly , pointless movie that nobody asked for", "fine", "ok then"]


def _save(folder, task, **record):
    slim = tiny_bert(task)
    slim.record.update(record)
    return models.save(slim, folder)


@pytest.fixture(scope="module")
def cls_dir(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("serve") / "cls", "sequence-classification",
                 history=[{"stage": "finetune", "settings": {"epochs": 1}}],
                 cost={"latency_ms_p50": 1.5, "size_mb": 0.4}, quality={"eval": {"value": float("nan")}})


@pytest.fixture(scope="module")
def ner_dir(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("serve") / "ner", "token-classification")


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("serve") / "lm", "causal-lm")


@pytest.fixture(scope="module")
def client(cls_dir):
    with TestClient(create_app(cls_dir, ServeConfig(max_texts=4, max_chars=50, max_body_bytes=2000))) as c:
        yield c


def _expected_probs(folder, texts):
    slim = models.load(folder)
    enc = slim.tokenizer(texts, padding=True, return_tensors="pt")
    return torch.softmax(torch_runner(slim.model)(dict(enc)), -1)


# ---- endpoints ---------------------------------------------------------------------------------------


def test_classification_single_and_batch_match_the_model(client, cls_dir):
    probs = _expected_probs(cls_dir, SENTENCES[:3])
    one = client.post("/predict", json={"text": SENTENCES[0]})
    assert one.status_code == 200
    body = one.json()
    assert (body["task"], body["backend"], len(body["predictions"])) == ("sequence-classification", "torch", 1)
    many = client.post("/predict", json={"texts": SENTENCES[:3]}).json()["predictions"]
    assert many[0]["label"] == body["predictions"][0]["label"]
    assert many[0]["scores"] == pytest.approx(body["predictions"][0]["scores"], abs=1e-5)
    for pred, p in zip(many, probs, strict=True):
        assert set(pred["scores"]) == {"0", "1"}
        assert sum(pred["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        assert [pred["scores"]["0"], pred["scores"]["1"]] == pytest.approx(p.tolist(), abs=1e-5)
        assert pred["label"] == ["0", "1"][int(p.argmax())]


def test_health_metadata_openapi(client):
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    meta = client.get("/metadata").json()
    assert meta["task"] == "sequence-classification" and meta["labels"] == ["0", "1"]
    assert meta["history"][0]["stage"] == "finetune"
    assert meta["cost"] == {"latency_ms_p50": 1.5, "size_mb": 0.4}
    assert meta["quality"]["eval"]["value"] is None  # NaN is not JSON: it is sent as null
    assert meta["serving"]["max_texts"] == 4
    spec = client.get("/openapi.json").json()
    assert {"/predict", "/health", "/metadata", "/metrics"} <= set(spec["paths"])
    req = spec["components"]["schemas"]["PredictRequest"]
    assert req["additionalProperties"] is False
    assert req["properties"]["texts"]["anyOf"][0]["maxItems"] == 4
    assert all(req["properties"][f]["description"] for f in ("text", "texts"))
    assert "413" in spec["paths"]["/predict"]["post"]["responses"]


def test_metrics_count_requests_latency_and_errors(cls_dir):
    with TestClient(create_app(cls_dir)) as c:
        c.post("/predict", json={"text": "fine"})
        c.post("/predict", json={"text": "fine"})
        c.post("/predict", json={"nope": 1})
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    assert 'slimformer_requests_total{endpoint="/predict",status="200"} 2' in text
    assert 'slimformer_requests_total{endpoint="/predict",status="422"} 1' in text
    assert 'slimformer_request_errors_total{endpoint="/predict",kind="client"} 1' in text
    assert 'slimformer_request_duration_seconds_count{endpoint="/predict"} 3' in text
    assert 'slimformer_request_duration_seconds_bucket{endpoint="/predict",le="+Inf"} 3' in text
    assert "slimformer_batch_size_count 2" in text and "slimformer_texts_total 2" in text
    assert "# TYPE slimformer_request_duration_seconds histogram" in text


def test_ner_entities_have_character_spans(ner_dir, tmp_path):
    # Force the head: every word B-PER, then every word I-PER, so the expected entities are known exactly.
    # "Schwarzenegger" is several sub-words: its span must cover all of them.
    text = "John  Schwarzenegger lives in Paris."
    for label, expected in (("B-PER", [(0, 4), (6, 20), (21, 26), (27, 29), (30, 35), (35, 36)]),
                            ("I-PER", [(0, 36)])):
        slim = models.load(ner_dir)
        head = slim.model.classifier
        torch.nn.init.zeros_(head.weight)
        with torch.no_grad():
            head.bias.copy_(torch.tensor([0.0, 0.0, 0.0]))
            head.bias[slim.label_names.index(label)] = 5.0
        folder = models.save(slim, tmp_path / label)
        with TestClient(create_app(folder)) as c:
            pred = c.post("/predict", json={"text": text}).json()["predictions"][0]
        spans = [(e["start"], e["end"]) for e in pred["entities"]]
        assert spans == expected
        assert all(e["entity"] == "PER" and e["text"] == text[e["start"]:e["end"]] for e in pred["entities"])
        assert pred["truncated"] is False


def test_ner_reports_truncation(ner_dir):
    with TestClient(create_app(ner_dir, ServeConfig(max_length=8))) as c:
        preds = c.post("/predict", json={"texts": ["a b c d e f g h i j k", "a b"]}).json()["predictions"]
    assert [p["truncated"] for p in preds] == [True, False]


def test_max_length_is_capped_by_the_position_table(cls_dir):
    # The tiny model has 128 positions: a longer max_length must not make long texts crash the model.
    with TestClient(create_app(cls_dir, ServeConfig(max_length=512))) as c:
        r = c.post("/predict", json={"text": "word " * 400})
        assert r.status_code == 200 and c.get("/metadata").json()["max_length"] == 128


def test_merge_entities_iob2():
    text = "Mary Ann Smith met Bob in Rome"
    words = [[0, 4, "B-PER", 0.9], [5, 8, "I-PER", 0.8], [9, 14, "I-PER", 0.7], [15, 18, "O", 0.9],
             [19, 22, "B-PER", 0.6], [23, 25, "I-LOC", 0.5], [26, 30, "B-LOC", 0.4]]
    ents = merge_entities(text, words)
    assert [(e["entity"], e["text"]) for e in ents] == [("PER", "Mary Ann Smith"), ("PER", "Bob"), ("LOC", "in"),
                                                        ("LOC", "Rome")]
    assert ents[0]["score"] == pytest.approx(0.8)


def test_causal_lm_perplexity(lm_dir):
    slim = models.load(lm_dir)
    text = "the cat sat on the mat"
    ids = torch.tensor([slim.tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(slim.model(input_ids=ids).logits[0, :-1], -1)
    expected = math.exp(float(-logp.gather(1, ids[0, 1:, None]).mean()))
    long_text = " ".join(["word"] * 40)
    with TestClient(create_app(lm_dir, ServeConfig(max_length=16))) as c:
        preds = c.post("/predict", json={"texts": [text, "x", long_text]}).json()["predictions"]
    assert preds[0]["tokens"] == ids.shape[1] - 1
    assert preds[0]["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert preds[1] == {"perplexity": None, "tokens": 0}  # one token: nothing to predict
    assert preds[2]["tokens"] > 16 and math.isfinite(preds[2]["perplexity"])  # sliding window, not truncated


# ---- bad input -----------------------------------------------------------------------------------------

JSON = {"content-type": "application/json"}


@pytest.mark.parametrize(("content", "headers", "status", "fragment"), [
    ('{"text": ', JSON, 400, "not valid JSON"),
    ('{"text": 5}', JSON, 422, "text: Input should be a valid string"),
    ('{"texts": ["a", 5]}', JSON, 422, "texts.1"),
    ('{"texts": "abc"}', JSON, 422, "valid list"),
    ('{"texts": []}', JSON, 422, "texts is empty"),
    ('{"text": "a", "lang": "en"}', JSON, 422, "unknown field 'lang'"),
    ('{"text": "a", "texts": ["b"]}', JSON, 422, "exactly one"),
    ("{}", JSON, 422, "exactly one"),
    ("[1, 2]", JSON, 422, "not an array"),
    ("", JSON, 422, "body is empty"),
    ('{"text": "a"}', {"content-type": "text/plain"}, 422, "Content-Type: application/json"),
    ('{"texts": ["a", "b", "c", "d", "e"]}', JSON, 413, "too many texts: 5 (limit 4"),
    ('{"texts": ["a", "' + "b" * 51 + '"]}', JSON, 413, "texts[1] is longer than 50"),
    ('{"text": "' + "b" * 51 + '"}', JSON, 413, "text is longer than 50"),
    ('{"text": "' + "b" * 2100 + '"}', JSON, 413, "larger than 2000 bytes"),
])
def test_bad_input_gets_a_json_4xx(client, content, headers, status, fragment):
    r = client.post("/predict", content=content, headers=headers)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]
    assert client.post("/predict", json={"text": "still serving"}).status_code == 200


def test_oversized_chunked_body_is_refused_while_reading(client):
    def chunks():  # no Content-Length: the limit is enforced by counting bytes
        for _ in range(10):
            yield b"x" * 500

    r = client.post("/predict", content=chunks(), headers=JSON)
    assert r.status_code == 413 and "2000 bytes" in r.json()["error"]


def test_unknown_route_and_method_are_json(client):
    assert client.get("/nope").json() == {"error": "Not Found"}
    r = client.get("/predict")
    assert r.status_code == 405 and "error" in r.json()


def test_config_is_strict():
    with pytest.raises(ValidationError):
        ServeConfig(max_batch=0)
    with pytest.raises(ValidationError):
        ServeConfig(max_wiat_ms=3)
    with pytest.raises(ValidationError):
        ServeConfig().max_batch = 4  # frozen


# ---- micro-batching ------------------------------------------------------------------------------------


async def _concurrent(app, bodies):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        responses = await asyncio.gather(*(c.post("/predict", json=b) for b in bodies))
        metrics = (await c.get("/metrics")).text
    await app.state.batcher.stop()
    return responses, metrics


@pytest.mark.parametrize(("batching", "batches"), [(True, 1), (False, 8)])
def test_concurrent_requests_are_batched_and_answered_correctly(cls_dir, batching, batches):
    probs = _expected_probs(cls_dir, SENTENCES)
    # A long wait and max_batch = the number of requests: with batching all 8 must share one forward pass.
    app = create_app(cls_dir, ServeConfig(batching=batching, max_batch=8, max_wait_ms=1000))
    responses, metrics = asyncio.run(_concurrent(app, [{"text": s} for s in SENTENCES]))
    assert [r.status_code for r in responses] == [200] * 8
    for r, p in zip(responses, probs, strict=True):  # each answer belongs to its own request
        scores = r.json()["predictions"][0]["scores"]
        assert [scores["0"], scores["1"]] == pytest.approx(p.tolist(), abs=1e-5)
    assert f"slimformer_batch_size_count {batches}" in metrics
    assert "slimformer_texts_total 8" in metrics


def test_request_larger_than_max_batch_is_chunked(cls_dir):
    with TestClient(create_app(cls_dir, ServeConfig(max_batch=3))) as c:
        preds = c.post("/predict", json={"texts": SENTENCES}).json()["predictions"]
    probs = _expected_probs(cls_dir, SENTENCES)
    assert [p["scores"]["1"] for p in preds] == pytest.approx(probs[:, 1].tolist(), abs=1e-5)


def test_a_failing_text_fails_only_its_request_and_the_worker_lives(cls_dir):
    predictor = Predictor(cls_dir)

    def fragile(texts):
        if "boom" in texts:
            raise RuntimeError("kernel exploded")
        return predictor(texts)

    app = create_app(predictor, ServeConfig(max_batch=8, max_wait_ms=500))
    app.state.batcher.predict = fragile
    responses, _ = asyncio.run(_concurrent(app, [{"text": "boom"}, {"text": "fine"}, {"texts": ["ok", "good"]}]))
    assert [r.status_code for r in responses] == [500, 200, 200]
    assert "kernel exploded" in responses[0].json()["error"]
    assert len(responses[2].json()["predictions"]) == 2


def test_full_queue_answers_503(cls_dir):
    predictor = Predictor(cls_dir)
    release = threading.Event()

    def slow(texts):
        release.wait(10)
        return predictor(texts)

    app = create_app(predictor, ServeConfig(max_queue=1))
    app.state.batcher.predict = slow

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            first = asyncio.create_task(c.post("/predict", json={"text": "one"}))
            while app.state.batcher.pending < 1:
                await asyncio.sleep(0.01)
            second = await c.post("/predict", json={"text": "two"})
            release.set()
            return await first, second

    first, second = asyncio.run(scenario())
    assert first.status_code == 200
    assert second.status_code == 503 and "busy" in second.json()["error"] and second.headers["retry-after"] == "1"


# ---- backends and CLI ----------------------------------------------------------------------------------


def test_backend_choice(cls_dir, tmp_path, monkeypatch):
    with pytest.raises(SlimformerError, match="no model.onnx"):
        pick_backend(cls_dir, Backend.ONNX)
    assert pick_backend(cls_dir, Backend.AUTO) == Backend.TORCH
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    (onnx_dir / "model.onnx").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "slimformer.export", None)  # the exporter is not installed
    with pytest.raises(SlimformerError, match="lacks slimformer.export"):
        pick_backend(onnx_dir, Backend.AUTO)


def test_onnx_folder_is_served_through_the_exporters_runner(cls_dir, tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "exported"
    shutil.copytree(cls_dir, folder)
    (folder / "model.onnx").write_bytes(b"")
    calls = []
    slim = models.load(cls_dir)

    def load_onnx_runner(path):  # stands in for slimformer.export: same Runner contract
        calls.append(path)
        return torch_runner(slim.model)

    monkeypatch.setitem(sys.modules, "slimformer.export", types.SimpleNamespace(load_onnx_runner=load_onnx_runner))
    with TestClient(create_app(folder)) as c:
        body = c.post("/predict", json={"texts": SENTENCES[:2]}).json()
        meta = c.get("/metadata").json()
    assert calls == [folder] and body["backend"] == "onnx" and meta["backend"] == "onnx"
    probs = _expected_probs(cls_dir, SENTENCES[:2])
    assert [p["scores"]["1"] for p in body["predictions"]] == pytest.approx(probs[:, 1].tolist(), abs=1e-5)
    assert Predictor(folder, Backend.TORCH).backend == Backend.TORCH  # --backend torch overrides


def test_real_onnx_export_serves_the_same_predictions(cls_dir, tmp_path):
    export = pytest.importorskip("slimformer.export")
    export.export_job(cls_dir, out=tmp_path / "onnx")
    with TestClient(create_app(tmp_path / "onnx")) as c:
        body = c.post("/predict", json={"texts": SENTENCES[:3]}).json()
    probs = _expected_probs(cls_dir, SENTENCES[:3])
    assert body["backend"] == "onnx"
    assert [p["scores"]["1"] for p in body["predictions"]] == pytest.approx(probs[:, 1].tolist(), abs=1e-5)


def test_cli_serve_starts_uvicorn_with_the_settings(cls_dir, monkeypatch):
    import uvicorn
    from typer.testing import CliRunner

    from slimformer.cli import app

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda asgi, **kw: seen.update(kw, app=asgi))
    result = CliRunner().invoke(app, ["serve", str(cls_dir), "--port", "8123", "--no-batching", "--max-batch", "4",
                                      "--max-queue", "7"])
    assert result.exit_code == 0, result.output
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8123)
    assert seen["timeout_keep_alive"] > 5  # longer than client pools keep idle connections
    cfg = seen["app"].state.config
    assert (cfg.batching, cfg.max_batch, cfg.max_queue) == (False, 4, 7)


def test_cli_serve_refuses_a_missing_folder_and_bad_settings(tmp_path):
    from typer.testing import CliRunner

    from slimformer.cli import app

    result = CliRunner().invoke(app, ["serve", str(tmp_path / "missing")])
    assert isinstance(result.exception, SlimformerError) and "does not exist" in str(result.exception)
    result = CliRunner().invoke(app, ["serve", str(tmp_path), "--max-batch", "0"])
    assert isinstance(result.exception, SlimformerError) and "max_batch" in str(result.exception)
