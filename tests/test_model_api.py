"""The model API's HTTP behaviour, task by task: real uvicorn servers on loopback, tiny random-weight models
built here (tasks/support/tiny_task_models.py). Deploy, registry, Hub download and CLI: test_model_api_deploy.py.
"""

from __future__ import annotations

import base64
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tasks.core.errors import PermanentError
from tasks.model_api.download import readme_pipeline_tag
from tasks.model_api.inputs import FIELDS, InputKind, png_base64, wav_base64
from tasks.model_api.tasks_table import ALIASES, TASKS, ModelFacts, infer_task, task
from tasks.support.tiny_task_models import BUILDERS
from tests.model_api_helpers import LocalServer, spec_for

#: What one input's result must look like, per task (the keys every item carries).
SHAPES = {
    "text-generation": (dict, {"generated_text"}),
    "text-classification": (list, {"label", "score"}),
    "token-classification": (list, {"score", "word"}),
    "zero-shot-classification": (dict, {"sequence", "labels", "scores"}),
    "question-answering": (dict, {"answer", "score", "start", "end"}),
    "summarization": (dict, {"summary_text"}),
    "text2text-generation": (dict, {"generated_text"}),
    "fill-mask": (list, {"score", "token", "token_str", "sequence"}),
    "feature-extraction": (dict, {"embedding"}),
    "image-classification": (list, {"label", "score"}),
    "automatic-speech-recognition": (dict, {"text"}),
}


def test_every_task_has_a_builder_and_a_shape():
    assert set(TASKS) == set(BUILDERS) == set(SHAPES)
    assert ALIASES["sentiment-analysis"] == "text-classification" and ALIASES["ner"] == "token-classification"


@pytest.mark.parametrize("name", list(BUILDERS))
def test_task_is_inferred_from_the_model(name):
    folder = BUILDERS[name]()
    got = infer_task(json.loads((folder / "config.json").read_text()), readme_pipeline_tag(folder), str(folder))
    # T5 has no card here: its architecture says text2text-generation (summarization needs --task or a card)
    assert got == ("text2text-generation" if name == "summarization" else name)


def test_task_that_cannot_be_inferred_names_the_choices():
    with pytest.raises(PermanentError) as e:
        infer_task({"architectures": ["FancyNewThing"]}, None, "acme/fancy")
    assert "acme/fancy" in str(e.value) and "--task" in str(e.value) and "fill-mask" in str(e.value)
    assert infer_task({}, "sentiment-analysis", "m") == "text-classification"


@pytest.fixture(scope="module")
def servers():
    """One real server per task, started on first use and kept for the module."""
    started: dict[str, LocalServer] = {}

    def get(name: str, **over) -> LocalServer:
        key = name + json.dumps(over, sort_keys=True)
        if key not in started:
            started[key] = LocalServer(spec_for(name, BUILDERS[name](), **over))
        return started[key]

    yield get
    for s in started.values():
        s.stop()


def _numbers(x) -> list[float]:
    """The numbers in a result, flattened (pytest.approx compares flat sequences)."""
    if isinstance(x, dict):
        return [n for k in sorted(x) for n in _numbers(x[k])]
    if isinstance(x, list):
        return [n for v in x for n in _numbers(v)]
    return [float(x)] if isinstance(x, (int, float)) else []


def _batch_body(name: str, single: dict) -> dict:
    kind = task(name).input
    one, many = FIELDS[kind]
    if kind is InputKind.QA:
        items = [{"question": single["question"], "context": single["context"]}] * 3
    else:
        items = [single[one[0]]] * 3
    body = {many: items}
    if "parameters" in single:
        body["parameters"] = single["parameters"]
    return body


@pytest.mark.parametrize("name", list(BUILDERS))
def test_predict_single_and_batch(servers, name):
    srv = servers(name)
    example = srv.state.task.example(srv.state.loaded.facts)
    kind, keys = SHAPES[name]

    r = srv.predict(example)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok" and body["deployment_id"] == f"test-{name}" and body["inference_time_ms"] > 0
    result = body["result"]
    assert isinstance(result, kind), result
    items = result if kind is list else [result]
    assert items and all(keys <= set(i) for i in items), result
    from tasks.model_api.server import response_model

    response_model(srv.state.task).model_validate(body)  # /docs tells the truth about the answer

    r = srv.predict(_batch_body(name, example))
    assert r.status_code == 200, r.text
    batch = r.json()["result"]
    assert isinstance(batch, list) and len(batch) == 3
    assert all(isinstance(b, kind) for b in batch)
    response_model(srv.state.task).model_validate(r.json())
    if name in ("text-classification", "feature-extraction", "image-classification", "question-answering"):
        assert _numbers(batch[0]) == pytest.approx(_numbers(result), rel=1e-4, abs=1e-5)  # batching changes nothing


def test_parameters_pass_through(servers):
    cls = servers("text-classification")
    r = cls.predict({"text": "fine", "parameters": {"top_k": 2}})
    assert [x["label"] for x in r.json()["result"]] != [] and len(r.json()["result"]) == 2
    zs = servers("zero-shot-classification")
    r = zs.predict({"text": "a goal", "parameters": {"candidate_labels": ["a", "b", "c"], "multi_label": True}})
    assert sorted(r.json()["result"]["labels"]) == ["a", "b", "c"]
    fe = servers("feature-extraction")
    tokens = fe.predict({"text": "two words", "parameters": {"pooling": "none"}}).json()["result"]["embedding"]
    pooled = fe.predict({"text": "two words", "parameters": {"normalize": True}}).json()["result"]["embedding"]
    assert isinstance(tokens[0], list) and len(tokens) >= 3  # [CLS] two words [SEP]
    assert sum(x * x for x in pooled) == pytest.approx(1.0, rel=1e-4)
    gen = servers("text-generation")
    full = gen.predict({"text": "Once upon", "parameters": {"max_new_tokens": 3, "return_full_text": True}})
    assert full.json()["result"]["generated_text"].startswith("Once upon")


def _field_of(r: requests.Response) -> list:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    return r.json()["detail"][0]["loc"]


def test_bad_inputs_are_4xx_naming_the_field(servers):
    cls = servers("text-classification")
    assert _field_of(cls.predict({"question": "what?"})) == ["body", "question"]  # not a field of this task
    assert _field_of(cls.predict({"text": "   "})) == ["body", "text"]
    assert _field_of(cls.predict({"texts": ["ok", ""]})) == ["body", "texts", 1]
    assert _field_of(cls.predict({"texts": ["x"] * 9})) == ["body", "texts"]  # max_batch_size 8
    r = cls.predict({"texts": ["short", "word " * 100]})  # max_input_tokens 64
    assert _field_of(r) == ["body", "texts", 1] and "max_input_tokens" in r.json()["detail"][0]["msg"]
    assert _field_of(cls.predict({"text": "x", "parameters": {"top_k": 0}})) == ["body", "parameters", "top_k"]
    assert _field_of(cls.predict({"text": "x", "parameters": {"max_new_tokens": 3}})) == [
        "body",
        "parameters",
        "max_new_tokens",
    ]
    assert "send text (one input) or texts (a batch)" in cls.predict({}).json()["detail"][0]["msg"]
    zs = servers("zero-shot-classification")
    assert _field_of(zs.predict({"text": "x"})) == ["body", "parameters"]
    qa = servers("question-answering")
    assert "context" in qa.predict({"question": "who?"}).json()["detail"][0]["msg"]
    fm = servers("fill-mask")
    r = fm.predict({"text": "no mask here"})
    assert _field_of(r) == ["body", "text"] and "[MASK]" in r.json()["detail"][0]["msg"]
    img = servers("image-classification")
    assert _field_of(img.predict({"image": "not base64!"})) == ["body", "image"]
    text_png = base64.b64encode(b"plain text, not an image").decode()
    r = img.predict({"images": [png_base64(), text_png]})
    assert _field_of(r) == ["body", "images", 1] and "cannot decode the image" in r.json()["detail"][0]["msg"]
    asr = servers("automatic-speech-recognition")
    r = asr.predict({"audio": png_base64()})
    assert _field_of(r) == ["body", "audio"] and "WAV" in r.json()["detail"][0]["msg"]
    assert cls.predict({"text": "still fine"}).status_code == 200


def test_pipeline_crash_is_a_500_and_the_server_stays_up(servers):
    zs = servers("zero-shot-classification")
    # a template without "{}" makes the transformers pipeline itself raise
    bad = {"text": "x", "parameters": {"candidate_labels": ["a"], "hypothesis_template": "no placeholder"}}
    r = zs.predict(bad)
    assert r.status_code == 500 and r.json()["status"] == "error" and "hypothesis_template" in r.json()["detail"]
    assert requests.get(f"{zs.url}/health", timeout=5).status_code == 200
    assert zs.predict({"text": "x", "parameters": {"candidate_labels": ["a", "b"]}}).status_code == 200
    # concurrent with good requests, only the bad ones fail
    good = {"text": "y", "parameters": {"candidate_labels": ["a", "b"]}}
    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(lambda b: zs.predict(b).status_code, [bad, good, bad | {"text": "z"}, good]))
    assert codes == [500, 200, 500, 200]
    assert requests.get(f"{zs.url}/info", timeout=5).json()["errors"] >= 3


def test_info_fields(servers):
    srv = servers("text-classification")
    srv.predict({"text": "one"})
    info = requests.get(f"{srv.url}/info", timeout=5).json()
    for key in ("model_id", "revision", "sha", "task", "device", "dtype", "parameters", "memory", "uptime_s"):
        assert key in info
    assert info["task"] == "text-classification" and info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["parameters"] > 1000 and info["memory"]["model_bytes"] > 0 and info["memory"]["rss_bytes"] > 0
    assert (
        info["requests"] >= 1
        and info["latency_ms"]["p50"] > 0
        and info["latency_ms"]["p95"] >= info["latency_ms"]["p50"]
    )
    assert info["example"] == {"text": "I really enjoyed this film."}


def test_docs_list_the_task_schemas(servers):
    srv = servers("question-answering")
    assert "swagger" in requests.get(f"{srv.url}/docs", timeout=5).text.lower()
    api = requests.get(f"{srv.url}/openapi.json", timeout=5).json()
    schemas = api["components"]["schemas"]
    req, resp = schemas["QuestionAnsweringRequest"], schemas["QuestionAnsweringResponse"]
    assert {"question", "context", "inputs", "parameters"} <= set(req["properties"])
    assert req["examples"][0]["question"] and "inputs" in req["examples"][1]
    assert {"status", "result", "deployment_id", "inference_time_ms"} <= set(resp["properties"])
    assert "Answer" in schemas and "QAParams" in schemas
    body = api["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("QuestionAnsweringRequest")


def test_health_is_503_with_progress_while_loading():
    from tasks.support.tiny_task_models import tiny_bert

    srv = LocalServer(spec_for("text-classification", tiny_bert()), load=False)
    try:
        r = requests.get(f"{srv.url}/health", timeout=5)
        assert r.status_code == 503 and r.json()["status"] == "loading" and r.json()["progress"] == 55.0
        assert srv.predict({"text": "x"}).status_code == 503
        srv.state.load()
        assert requests.get(f"{srv.url}/health", timeout=5).status_code == 200
    finally:
        srv.stop()


def test_health_stays_fast_during_a_long_inference(servers):
    gen = servers("text-generation")
    long = {"texts": ["Once upon a time"] * 8, "parameters": {"max_new_tokens": 300}}
    box: dict = {}
    t = threading.Thread(target=lambda: box.update(r=gen.predict(long, timeout=300)))
    t0 = time.perf_counter()
    t.start()
    while gen.state.batcher is not None and not gen.state.batcher.busy and time.perf_counter() - t0 < 30:
        time.sleep(0.01)
    times = []
    while t.is_alive() and len(times) < 40:
        s = time.perf_counter()
        assert requests.get(f"{gen.url}/health", timeout=5).status_code == 200
        times.append((time.perf_counter() - s) * 1000)
        time.sleep(0.02)
    t.join()
    assert box["r"].status_code == 200
    inference_ms = box["r"].json()["inference_time_ms"]
    assert len(times) >= 5, f"the inference ({inference_ms:.0f} ms) ended before /health was polled"
    assert statistics.median(times) < 50 and max(times) < inference_ms / 3, (times, inference_ms)


def test_concurrent_requests_are_batched(servers):
    srv = servers("text-classification", max_wait_ms=50.0, deployment_id="batching")
    before = srv.state.batcher.batches
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: srv.predict({"text": f"text number {i}"}), range(16)))
    assert all(r.status_code == 200 for r in results)
    assert srv.state.batcher.batches - before < 16  # coalesced
    assert max(r.json()["inference_time_ms"] for r in results) > 0


def test_examples_are_valid_requests():
    for spec in TASKS.values():
        from tasks.model_api.server import request_model

        body = request_model(spec)
        body.model_validate(spec.example(ModelFacts(mask_token="[MASK]")))
        if spec.batch_example:
            body.model_validate(spec.batch_example(ModelFacts()))
    assert base64.b64decode(wav_base64())[:4] == b"RIFF"
