"""`textdiffusion serve` against a real uvicorn server on a free loopback port, with httpx as the client:
step-level batching (and results identical to generating alone), streaming, the OpenAI subset, metrics,
the bounded queue, disconnects, and every kind of bad request (the server keeps serving after each)."""

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

uvicorn = pytest.importorskip("uvicorn")

from textdiffusion.cli.main import main
from textdiffusion.pipelines.generation import DiffusionGenerator
from textdiffusion.serving.app import MAX_BODY_BYTES, _continuation, create_app
from textdiffusion.serving.engine import Engine


@pytest.fixture(scope="module")
def generator():
    return DiffusionGenerator.from_pretrained("wiki-small", device="cpu")


@contextlib.contextmanager
def live_server(generator, **engine_kwargs):
    """uvicorn in a thread on port 0 (the OS picks a free one); yields the base URL. Keyword arguments go to the
    Engine, except the app's own (api_keys, public_metrics, cors_origins, access_log)."""
    app_kwargs = {k: engine_kwargs.pop(k) for k in ("api_keys", "public_metrics", "cors_origins", "access_log")
                  if k in engine_kwargs}
    engine = Engine(generator, **engine_kwargs)
    engine.start()
    app = create_app(engine, model_id="wiki-small", **app_kwargs)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.stop()


@pytest.fixture(scope="module")
def url(generator):
    # a short pause per step, so that concurrent requests are sure to overlap
    with live_server(generator, max_batch=32, max_queue=16, tick_delay=0.01) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c


def sse_events(lines):
    """Parse server-sent events from an iterator of lines into (event, data) pairs."""
    event, data = None, []
    for line in lines:
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line == "" and data:
            text = "\n".join(data)
            yield event, (text if text == "[DONE]" else json.loads(text))
            event, data = None, []


SHORT = dict(max_length=24, steps=8)


def test_generate_returns_texts_model_calls_and_timings(client, generator):
    r = client.post("/v1/generate", json={"prompt": "The river", "n": 2, "seed": 3, **SHORT})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["texts"]) == 2 and all(t.startswith("The river") for t in body["texts"])
    assert 1 <= body["model_calls"] <= 8 and body["steps"] == 8
    assert body["generate_seconds"] > 0 and body["tokens"] == 2 * (24 - 2 - 2)
    alone = generator.generate(["The river"] * 2, max_length=24, steps=8, seed=3).texts
    assert body["texts"] == alone


REQUESTS = [  # heterogeneous: lengths, templates, strategies, blocks, thresholds, guidance, several samples
    {"prompt": "The river", "seed": 1, "max_length": 32, "steps": 12},
    {"prompt": "In 1905 the", "seed": 7, "n": 3, "max_length": 20, "steps": 6, "sampling": "categorical"},
    {"template": "The <mask:6> was built in <mask:2>.", "seed": 2, "steps": 8},
    {"prompt": "Music", "seed": 4, "max_length": 40, "strategy": "remask-random", "steps": 10},
    {"prompt": "Paris is", "seed": 5, "max_length": 28, "block_length": 8, "steps": 12},
    {"prompt": "Water", "seed": 6, "max_length": 24, "confidence_threshold": 0.3, "steps": 20},
    {"prompt": "A city", "seed": 8, "max_length": 24, "cfg_scale": 1.5, "steps": 8, "n": 2},
    {"prompt": "The war", "seed": 9, "max_length": 30, "remask_fraction": 0.3, "sampling": "nucleus", "top_p": 0.8},
    {"prompt": "Rome", "seed": 10, "max_length": 28, "strategy": "eb", "eb_gamma": 2.0, "steps": 4},  # adaptive: past the plan
]


def alone(generator, req):
    kwargs = {k: v for k, v in req.items() if k not in ("prompt", "template", "n", "stream")}
    n = req.get("n", 1)
    if "template" in req:
        return generator.generate(templates=[req["template"]] * n, **kwargs).texts
    kwargs.setdefault("max_length", 128)
    return generator.generate([req["prompt"]] * n, **kwargs).texts


def test_concurrent_requests_share_model_calls_and_match_generating_alone(url, client, generator):
    def metric(text, name):
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))

    before = client.get("/metrics").text

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/v1/generate", json=r) for r in REQUESTS))

    responses = asyncio.run(go())
    after = client.get("/metrics").text
    bodies = [r.json() for r in responses]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    rows = [r.get("n", 1) * (2 if r.get("cfg_scale") else 1) for r in REQUESTS]
    # batched: every request shared at least one model call with other requests' rows
    assert all(b["max_batch_rows"] > own for b, own in zip(bodies, rows)), [b["max_batch_rows"] for b in bodies]
    calls = metric(after, "textdiffusion_model_calls_total") - metric(before, "textdiffusion_model_calls_total")
    request_steps = (metric(after, "textdiffusion_request_steps_total")
                     - metric(before, "textdiffusion_request_steps_total"))
    assert request_steps == sum(b["model_calls"] for b in bodies)
    assert request_steps / calls > 2  # requests per model call
    # ... and each result is exactly what generating it alone with the same seed gives
    for req, body in zip(REQUESTS, bodies):
        assert body["texts"] == alone(generator, req), req


def test_stream_yields_every_step_with_masks_and_confidence(client):
    req = {"prompt": "The river", "seed": 11, "max_length": 24, "steps": 6}
    with client.stream("POST", "/v1/generate", json={**req, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r.iter_lines()))
    kinds = [k for k, _ in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and set(kinds[1:-1]) == {"step"}
    frames = [d for _, d in events]
    row0 = frames[0]["rows"][0]
    assert row0["masked"] == row0["editable"] and sum(row0["editable"]) == 20  # all generated positions masked
    assert all(c is None for c in row0["confidence"])
    masked = [f["masked"] for f in frames]
    assert masked[0] == 20 and masked[-1] == 0 and all(a >= b for a, b in zip(masked, masked[1:]))
    assert any(0 < m < 20 for m in masked)  # intermediate steps with masks left
    assert [f["model_calls"] for f in frames[1:-1]] == list(range(1, len(frames) - 1))
    for f in frames[1:]:
        row = f["rows"][0]
        for m, e, c in zip(row["masked"], row["editable"], row["confidence"]):
            assert (c is None) == (m or not e)  # every committed generated token has a confidence
            assert c is None or 0 < c <= 1
    plain = client.post("/v1/generate", json=req).json()
    assert frames[-1]["texts"] == plain["texts"] and frames[-1]["model_calls"] == plain["model_calls"]


def test_completions_openai_shape_seed_and_stream(client, generator):
    req = {"model": "wiki-small", "prompt": "The river", "max_tokens": 12, "n": 2, "seed": 5}
    a = client.post("/v1/completions", json=req).json()
    b = client.post("/v1/completions", json=req).json()
    assert a["object"] == "text_completion" and a["model"] == "wiki-small"
    assert [c["index"] for c in a["choices"]] == [0, 1]
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]  # same seed, same text
    assert all(c["finish_reason"] in ("stop", "length") for c in a["choices"])
    assert a["usage"]["completion_tokens"] == 24 and a["usage"]["prompt_tokens"] > 0
    # temperature 0 is greedy, top_p is nucleus sampling: the same text as the generator given those settings
    for extra, settings in (({"temperature": 0}, {"sampling": "greedy"}),
                            ({"top_p": 0.5, "temperature": 0.8}, {"sampling": "nucleus", "top_p": 0.5, "temperature": 0.8})):
        got = client.post("/v1/completions", json={"prompt": "The river", "max_tokens": 8, "seed": 2, **extra}).json()
        template = "The river<mask:8>"
        ref = generator.generate(templates=[template], seed=2, **settings).token_ids[0]
        editable = generator.build_batch([template])[1][0]
        assert got["choices"][0]["text"] == _continuation(generator, ref, editable)[0]
    with client.stream("POST", "/v1/completions", json={**req, "stream": True}) as r:
        events = [d for _, d in sse_events(r.iter_lines())]
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) > 2 and all(c["object"] == "text_completion" for c in chunks)
    streamed = ["".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i) for i in (0, 1)]
    assert streamed == [c["text"] for c in a["choices"]]  # the deltas add up to the final text
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert len(finals) == 2


def test_models_healthz_and_metrics(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "wiki-small"
    assert models["data"][0]["max_length"] == 128 and models["data"][0]["positions"] == 512
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["max_batch"] == 32
    client.post("/v1/generate", json={"prompt": "x", "steps": 0})  # one error, counted
    text = client.get("/metrics").text
    for name in ("textdiffusion_requests_total", "textdiffusion_errors_total", "textdiffusion_queue_depth",
                 "textdiffusion_batch_rows_bucket", "textdiffusion_model_calls_total",
                 "textdiffusion_request_latency_seconds_bucket", "textdiffusion_tokens_per_second",
                 "textdiffusion_generated_tokens_total"):
        assert name in text, name
    assert 'textdiffusion_errors_total{code="422",endpoint="/v1/generate"}' in text


def test_the_page_and_its_assets_are_served_locally(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assets = ["/static/app.js", "/static/style.css"]
    for asset in assets:
        assert asset in page.text and client.get(asset).status_code == 200
    assert "http" not in page.text.replace("http-equiv", "")  # no CDN, no external fonts


BAD = [  # (endpoint, body or raw bytes, status, field, value)
    ("/v1/generate", b'{"prompt": "The river",', 400, "body", None),
    ("/v1/generate", {"prompt": "The river", "colour": "red"}, 422, "colour", "red"),
    ("/v1/generate", {"prompt": 5}, 422, "prompt", 5),
    ("/v1/generate", {"prompt": "a", "steps": "8"}, 422, "steps", "8"),
    ("/v1/generate", {"prompt": ""}, 422, "prompt", ""),
    ("/v1/generate", {"prompt": "   "}, 422, "prompt", "   "),
    ("/v1/generate", {}, 422, "body", None),
    ("/v1/generate", [1, 2], 422, "body", [1, 2]),
    ("/v1/generate", {"prompt": "a", "steps": 0}, 422, "steps", 0),
    ("/v1/generate", {"prompt": "a", "steps": 5000}, 422, "steps", 5000),
    ("/v1/generate", {"prompt": "a", "max_length": 100000}, 422, "max_length", 100000),
    ("/v1/generate", {"prompt": "a", "n": 1000}, 422, "n", 1000),
    ("/v1/generate", {"prompt": "a", "top_p": 1.5}, 422, "top_p", 1.5),
    ("/v1/generate", {"prompt": "a", "strategy": "best"}, 422, "strategy", "best"),
    ("/v1/generate", {"prompt": "a", "strategy": "remask-random", "remask_fraction": 0.5}, 422, "strategy", "remask-random"),
    ("/v1/generate", {"prompt": "a", "strategy": "eb", "remask_fraction": 0.5}, 422, "remask_fraction", 0.5),
    ("/v1/generate", {"prompt": "word " * 40, "max_length": 8}, 422, "prompt", "word " * 40),
    ("/v1/generate", {"template": "no spans here"}, 422, "template", "no spans here"),
    ("/v1/generate", {"template": "A <mask:100000> B"}, 422, "template", "A <mask:100000> B"),
    ("/v1/generate", {"prompt": "a", "suppress_tokens": ["two words"]}, 422, "suppress_tokens", "two words"),
    ("/v1/generate", {"prompt": "x" * (MAX_BODY_BYTES + 10)}, 413, "body", None),
    ("/v1/completions", {"prompt": "The river", "max_tokens": 10000}, 422, "max_tokens", 10000),
    ("/v1/completions", {"prompt": "The river", "max_tokens": 0}, 422, "max_tokens", 0),
    ("/v1/completions", {"prompt": "The river", "temperature": -1}, 422, "temperature", -1),
    ("/v1/completions", {"prompt": "The river", "top_p": 0}, 422, "top_p", 0),
    ("/v1/completions", {"prompt": ""}, 422, "prompt", ""),
    ("/v1/completions", {"prompt": "a", "n": "2"}, 422, "n", "2"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {}}, 422, "logit_bias", {}),
    ("/v1/completions", {"prompt": "a", "model": "gpt-4"}, 404, "model", "gpt-4"),
]


@pytest.mark.parametrize("endpoint,body,status,field,value", BAD, ids=[f"{b[0]}-{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_requests_name_the_field_and_value_and_the_server_keeps_serving(client, endpoint, body, status, field, value):
    if isinstance(body, bytes):
        r = client.post(endpoint, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(endpoint, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == field and error["message"]
    if status == 413:
        assert error["value"] > MAX_BODY_BYTES
    elif value is not None:
        assert error["value"] == value
    if field not in ("body",):
        assert field in error["message"]  # the message itself names the field
    ok = client.post("/v1/generate", json={"prompt": "The river", **SHORT})
    assert ok.status_code == 200 and ok.json()["texts"][0].startswith("The river")


def test_a_chunked_body_over_the_limit_is_refused(client):
    def chunks():
        for _ in range(MAX_BODY_BYTES // 1024 + 2):
            yield b"x" * 1024

    r = client.post("/v1/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["param"] == "body"


@pytest.fixture(scope="module")
def slow_url(generator):
    """One row per model call, one waiting request at most, 30 ms per step: easy to fill and to watch."""
    with live_server(generator, max_batch=1, max_queue=1, tick_delay=0.03) as base:
        yield base


def test_a_full_queue_answers_503_with_retry_after(slow_url):
    req = {"prompt": "The river", "max_length": 24, "steps": 10}

    async def go():
        async with httpx.AsyncClient(base_url=slow_url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/v1/generate", json={**req, "seed": i}) for i in range(4)))

    responses = asyncio.run(go())
    codes = [r.status_code for r in responses]
    busy = [r for r in responses if r.status_code == 503]
    assert codes.count(200) >= 2 and 503 in codes, codes
    assert busy and busy[0].headers["retry-after"] == "1" and busy[0].json()["error"]["type"] == "server_busy"
    with httpx.Client(base_url=slow_url) as c:
        assert c.post("/v1/generate", json=req).status_code == 200  # served again once the line is short


def test_a_client_that_disconnects_mid_stream_frees_its_rows(slow_url):
    req = {"prompt": "The river", "max_length": 100, "steps": 90, "stream": True}  # ~3 s if left to run
    with httpx.Client(base_url=slow_url, timeout=30) as c:
        t0 = time.time()
        with c.stream("POST", "/v1/generate", json=req) as r:
            lines = r.iter_lines()
            events = sse_events(lines)
            assert next(events)[0] == "start" and next(events)[0] == "step"
        # the connection is closed here; the engine drops the request at its next step
        while c.get("/healthz").json()["active"] and time.time() - t0 < 10:
            time.sleep(0.05)
        health = c.get("/healthz").json()
        assert health["active"] == 0 and health["waiting"] == 0
        calls = health["model_calls"]
        assert time.time() - t0 < 2.5  # well before the 90 steps would have finished
        time.sleep(0.3)
        assert c.get("/healthz").json()["model_calls"] == calls  # nothing runs for it any more


def test_only_loopback_addresses_count_as_local():
    from textdiffusion.cli.serve import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "192.168.1.4", "::", "example.org"))


def test_serve_flags_are_checked(capsys):
    assert main(["serve", "--port", "70000"]) == 2
    assert "--port must be in [0, 65535], got 70000" in capsys.readouterr().err
    assert main(["serve", "--max-batch", "0"]) == 2
    assert main(["serve", "--step-delay", "-1"]) == 2


@pytest.mark.slow
def test_the_serve_command_runs_on_the_bundled_model(tmp_path):
    """The real console entry point in a subprocess: starts, answers, and says where it listens."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "textdiffusion", "serve", "--checkpoint", "wiki-small",
                             "--port", str(port), "--max-batch", "4"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "serve did not start within 60 s"
            time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "The river", "max_tokens": 6})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert f"127.0.0.1:{port}" in (tmp_path / "serve.log").read_text()


def test_the_load_benchmark_measures_batching(url):
    """benchmarks/serve_load.py's client against the live server: no errors, more than one request per call."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from serve_load import run_load

    r = asyncio.run(run_load(url, clients=6, requests=12, max_tokens=8, timeout=60))
    assert r["completed"] == 12 and r["errors"] == 0 and len(r["texts"]) == 12
    assert r["requests_per_model_call"] > 1 and r["latency_p99_s"] >= r["latency_p50_s"] > 0


def test_the_openai_client_works_unchanged(url):
    """The official client against /v1, unchanged (`openai` is in the test extra)."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=url + "/v1", api_key="not-needed")
    out = client.completions.create(model="wiki-small", prompt="The river", max_tokens=8, n=2, seed=3)
    assert len(out.choices) == 2 and all(c.finish_reason in ("stop", "length") for c in out.choices)
    streamed = ["", ""]
    for chunk in client.completions.create(model="wiki-small", prompt="The river", max_tokens=8, n=2, seed=3, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == [c.text for c in out.choices]
    assert [m.id for m in client.models.list()] == ["wiki-small"]
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="wiki-small", prompt="The river", max_tokens=100000)
