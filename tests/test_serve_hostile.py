"""Hostile requests against a real server (uvicorn on a loopback port, the bundled model): non-finite
numbers, invalid Unicode and UTF-8, wrong types, huge, negative and zero numbers, unknown fields, deep
nesting, invalid JSON, wrong content types, empty, odd and oversized bodies, adversarial templates,
guidance with nothing to guide by, bad ``n``, streaming and ``/v1/completions`` variants.

Each answer is the status the table says: a 4xx whose body is strict JSON (no NaN, valid UTF-8) naming
the field, or a 2xx where the request is valid after all (marked "valid" in the table). Never a 5xx,
the server answers /healthz after each, and nothing it logs holds a traceback."""

import json
import logging
import threading
import traceback
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

pytest.importorskip("uvicorn")

from test_serve import generator, live_server  # noqa: E402,F401  (the module-scoped model fixture)

from textdiffusion.serving.app import MAX_BODY_BYTES  # noqa: E402

G, C = "/v1/generate", "/v1/completions"
J = "application/json"
ANY = object()  # the case does not pin the error's value
OK = dict(max_length=16, steps=2)  # a valid request, kept cheap
OK_JSON = '"max_length": 16, "steps": 2'


@dataclass
class Case:
    id: str
    path: str
    body: Any  # str: JSON text exactly as sent (NaN, escapes); bytes: raw; anything else: encoded by httpx
    status: int
    param: str | None = None  # the error's field (None: a 2xx)
    value: Any = ANY
    content_type: str | None = J


def deep(n: int) -> str:
    return "[" * n + "]" * n


CASES = [
    # -- numbers JSON does not have: Python's json reads them, the server must refuse them by name
    Case("nan-temperature", G, '{"prompt": "a", "temperature": NaN}', 422, "temperature", "NaN"),
    Case("infinity-temperature", G, '{"prompt": "a", "temperature": Infinity}', 422, "temperature", "Infinity"),
    Case("minus-infinity-top-p", G, '{"prompt": "a", "top_p": -Infinity}', 422, "top_p", "-Infinity"),
    Case("nan-cfg-scale", G, '{"prompt": "a", "cfg_scale": NaN}', 422, "cfg_scale", "NaN"),
    Case("infinity-threshold", G, '{"prompt": "a", "confidence_threshold": Infinity}', 422, "confidence_threshold"),
    Case("nan-steps", G, '{"prompt": "a", "steps": NaN}', 422, "steps", "NaN"),
    Case("minus-infinity-seed", G, '{"prompt": "a", "seed": -Infinity}', 422, "seed", "-Infinity"),
    Case("1e309-top-k", G, '{"prompt": "a", "top_k": 1e309}', 422, "top_k", "Infinity"),  # overflows to inf
    Case("1e999-eb-gamma", G, '{"prompt": "a", "strategy": "eb", "eb_gamma": 1e999}', 422, "eb_gamma", "Infinity"),
    Case("nan-in-a-list", G, '{"prompt": "a", "suppress_tokens": ["the", NaN]}', 422, "suppress_tokens.1", "NaN"),
    Case("nan-nested-in-unknown-field", G, '{"prompt": "a", "extra": {"deep": [1, NaN]}}', 422, "extra.deep.1"),
    Case("nan-as-the-body", G, "NaN", 422, "body", "NaN"),
    Case("nan-completions-temperature", C, '{"prompt": "a", "temperature": NaN}', 422, "temperature", "NaN"),
    Case("infinity-completions-max-tokens", C, '{"prompt": "a", "max_tokens": 1e400}', 422, "max_tokens"),
    # -- text that is not Unicode: lone surrogates as JSON escapes, bytes that are not UTF-8
    Case("surrogate-prompt", G, r'{"prompt": "\ud800"}', 422, "prompt", "\\ud800"),
    Case("surrogate-template", G, r'{"template": "The \udc00 <mask:2>"}', 422, "template"),
    Case("surrogate-suppress-token", G, r'{"prompt": "a", "suppress_tokens": ["ok", "\ud83d"]}', 422,
         "suppress_tokens.1", "\\ud83d"),
    Case("surrogate-field-name", G, r'{"prompt": "a", "\ud800": 1}', 422, "\\ud800"),
    Case("surrogate-completions-prompt", C, r'{"prompt": "x\udfff"}', 422, "prompt"),
    Case("surrogate-pair-is-valid", G, r'{"prompt": "\ud83d\ude00 a", ' + OK_JSON + "}", 200),  # valid: an emoji
    Case("invalid-utf8-bytes", G, b'{"prompt": "\xff\xfe"}', 400, "body"),
    Case("utf8-encoded-surrogate", G, b'{"prompt": "\xed\xa0\x80"}', 400, "body"),  # CESU-style bytes
    Case("latin1-body", G, '{"prompt": "café"}'.encode("latin-1"), 400, "body"),
    # -- wrong types
    Case("prompt-list", G, {"prompt": ["a", "b"]}, 422, "prompt"),
    Case("n-string", G, {"prompt": "a", "n": "2"}, 422, "n", "2"),
    Case("n-float", G, {"prompt": "a", "n": 1.5}, 422, "n", 1.5),
    Case("stream-string", G, {"prompt": "a", "stream": "yes"}, 422, "stream", "yes"),
    Case("temperature-bool", G, {"prompt": "a", "temperature": True}, 422, "temperature", True),
    Case("suppress-tokens-string", G, {"prompt": "a", "suppress_tokens": "the"}, 422, "suppress_tokens", "the"),
    Case("completions-prompt-list", C, {"prompt": ["a", "b"]}, 422, "prompt"),
    # -- huge numbers
    Case("huge-seed", G, {"prompt": "a", "seed": 10 ** 30}, 422, "seed", 10 ** 30),
    Case("huge-max-length", G, {"prompt": "a", "max_length": 10 ** 30}, 422, "max_length", 10 ** 30),
    Case("huge-top-k-is-valid", G, {"prompt": "a", "top_k": 10 ** 30, **OK}, 200),  # valid: at most the vocabulary
    Case("5000-digit-seed", G, '{"prompt": "a", "seed": ' + "9" * 5000 + "}", 400, "body"),
    Case("huge-max-tokens", C, {"prompt": "a", "max_tokens": 10 ** 30}, 422, "max_tokens", 10 ** 30),
    Case("huge-cfg-scale", G, {"prompt": "a", "cfg_scale": 1e300}, 422, "cfg_scale", 1e300),
    # -- negative and zero
    Case("n-zero", G, {"prompt": "a", "n": 0}, 422, "n", 0),
    Case("n-negative", G, {"prompt": "a", "n": -1}, 422, "n", -1),
    Case("max-length-zero", G, {"prompt": "a", "max_length": 0}, 422, "max_length", 0),
    Case("steps-negative", G, {"prompt": "a", "steps": -5}, 422, "steps", -5),
    Case("cfg-scale-negative", G, {"prompt": "a", "cfg_scale": -1.0}, 422, "cfg_scale", -1.0),
    Case("top-k-zero", G, {"prompt": "a", "top_k": 0}, 422, "top_k", 0),
    Case("completions-n-zero", C, {"prompt": "a", "n": 0}, 422, "n", 0),
    Case("completions-max-tokens-negative", C, {"prompt": "a", "max_tokens": -3}, 422, "max_tokens", -3),
    # -- unknown fields
    Case("proto-field", G, {"prompt": "a", "__proto__": {"admin": True}}, 422, "__proto__"),
    Case("completions-logprobs", C, {"prompt": "a", "logprobs": 5}, 422, "logprobs", 5),
    # -- structure: nesting, invalid JSON, not an object
    Case("nested-100-deep", G, '{"prompt": "a", "x": ' + deep(100) + "}", 400, "x"),
    Case("nested-20000-deep", G, deep(20000), 400, "body"),
    Case("trailing-comma", G, '{"prompt": "a",}', 400, "body"),
    Case("single-quotes", G, "{'prompt': 'a'}", 400, "body"),
    Case("trailing-garbage", G, '{"prompt": "a"} x', 400, "body"),
    Case("empty-body", G, b"", 422, "body"),
    Case("null-body", G, "null", 422, "body"),
    Case("string-body", G, '"The river"', 422, "body"),
    Case("array-of-objects", G, '[{"prompt": "a"}]', 422, "body"),
    Case("completions-array", C, "[1, 2]", 422, "body"),
    # -- content types
    Case("text-plain", G, '{"prompt": "a"}', 415, "content-type", "text/plain", "text/plain"),
    Case("form-encoded", G, b"prompt=a", 415, "content-type", content_type="application/x-www-form-urlencoded"),
    Case("no-content-type", G, json.dumps({"prompt": "a", **OK}), 415, "content-type", None, content_type=None),
    Case("json-suffix-is-valid", G, json.dumps({"prompt": "a", **OK}), 200, content_type="application/vnd.x+json"),
    # -- size
    Case("oversized-body", G, {"prompt": "x" * (MAX_BODY_BYTES + 10)}, 413, "body"),
    Case("long-prompt", G, {"prompt": "word " * 12000}, 422, "prompt"),  # 60 KB: under the body limit
    Case("long-template", G, {"template": "word " * 12000 + "<mask:2>"}, 422, "template"),
    Case("long-completions-prompt", C, {"prompt": "word " * 12000}, 422, "max_tokens"),  # no room left for it
    # -- templates
    Case("mask-zero", G, {"template": "<mask:0>"}, 422, "template", "<mask:0>"),
    Case("mask-999999", G, {"template": "<mask:999999>"}, 422, "template", "<mask:999999>"),
    Case("mask-30-digits", G, {"template": "a <mask:" + "9" * 30 + ">"}, 422, "template"),
    Case("mask-negative-is-text", G, {"template": "a <mask:-1> b"}, 422, "template"),  # no span at all
    Case("prompt-and-template", G, {"prompt": "a", "template": "b <mask:2>"}, 422, "body"),
    Case("neither-prompt-nor-template", G, {"n": 2}, 422, "body"),
    # -- null bytes and control characters: valid JSON text, so valid requests
    Case("null-byte-prompt-is-valid", G, {"prompt": "a\u0000b", **OK}, 200),
    Case("control-chars-template-is-valid", G, {"template": "\u0007\u001b[2J <mask:3>", **OK}, 200),
    Case("null-byte-suppress-token-is-valid", G, {"prompt": "a", "suppress_tokens": ["\u0000"], **OK}, 200),
    # -- guidance: by the prompt it applies to a model without labels; with nothing to guide by it cannot
    Case("cfg-scale-with-a-prompt-is-valid", G, {"prompt": "The river", "cfg_scale": 2.0, **OK}, 200),
    Case("cfg-scale-on-a-bare-template", G, {"template": "<mask:4>", "cfg_scale": 2.0, **OK}, 422, "cfg_scale", 2.0),
    # -- n against the engine's rows (guidance doubles them: 32 samples need 64 > --max-batch 32)
    Case("n-33", G, {"prompt": "a", "n": 33}, 422, "n", 33),
    Case("n-32-with-guidance", G, {"prompt": "a", "n": 32, "cfg_scale": 1.0, **OK}, 422, "n", 32),
    # -- streaming: refused before the stream starts, or streamed to the end
    Case("stream-nan", G, '{"prompt": "a", "stream": true, "temperature": NaN}', 422, "temperature", "NaN"),
    Case("stream-surrogate", G, r'{"prompt": "\udead", "stream": true}', 422, "prompt"),
    Case("stream-mask-zero", G, {"template": "<mask:0>", "stream": True}, 422, "template"),
    Case("stream-is-valid", G, {"prompt": "a", "stream": True, **OK}, 200),
    Case("completions-stream-infinity", C, '{"prompt": "a", "stream": true, "top_p": Infinity}', 422, "top_p"),
    Case("completions-stream-is-valid", C, {"prompt": "a", "stream": True, "max_tokens": 4}, 200),
    # -- /v1/completions specifics
    Case("completions-model-path", C, {"prompt": "a", "model": "../../etc/passwd"}, 404, "model", "../../etc/passwd"),
    Case("completions-temperature-3", C, {"prompt": "a", "temperature": 3}, 422, "temperature", 3),
    Case("completions-blank-prompt", C, {"prompt": " \n\t "}, 422, "prompt"),
]


def _no_constants(name):
    raise ValueError(f"the answer holds {name}, which JSON does not have")


def strict_json(content: bytes) -> Any:
    """The body as strict JSON: UTF-8 without lone surrogates, no NaN or Infinity."""
    return json.loads(content.decode("utf-8"), parse_constant=_no_constants)


class Log(logging.Handler):
    """Every record the server logs, formatted as a handler would print it (tracebacks included), and
    every exception that ends a thread."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))

    def thread_died(self, args):
        self.lines.append("".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)))

    def text(self, start: int = 0) -> str:
        """The lines from ``start`` on, what cannot be printed escaped (a logged value may hold a lone surrogate)."""
        return "\n".join(self.lines[start:]).encode("utf-8", "backslashreplace").decode("utf-8")


@pytest.fixture(scope="module")
def server(generator):  # noqa: F811
    """One server for every case; yields (client, log)."""
    log = Log()
    loggers = [logging.getLogger(), logging.getLogger("uvicorn")]  # uvicorn's loggers do not reach the root
    with live_server(generator, max_batch=32, max_queue=16) as url:
        for logger in loggers:  # after uvicorn has configured its loggers (it replaces their handlers)
            logger.addHandler(log)
        threading_hook, threading.excepthook = threading.excepthook, log.thread_died
        try:
            with httpx.Client(base_url=url, timeout=60) as client:
                yield client, log
        finally:
            threading.excepthook = threading_hook
            for logger in loggers:
                logger.removeHandler(log)
    assert "Traceback" not in log.text(), log.text()


def test_the_table_is_hostile_enough():
    assert sum(c.status >= 400 for c in CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_hostile_request_is_refused_by_name_or_served(server, case):
    client, log = server
    start = len(log.lines)
    headers = {} if case.content_type is None else {"content-type": case.content_type}
    if isinstance(case.body, (str, bytes)):
        content = case.body.encode("utf-8") if isinstance(case.body, str) else case.body
        r = client.post(case.path, content=content, headers=headers)
    else:
        r = client.post(case.path, json=case.body)
    # First: the server still answers, and by that answer it has logged whatever this request made it log. Before
    # any assertion: Python 3.11 formats a traceback's carets with ast.parse, and one in the server's thread while
    # pytest formats a failure here ended the session with "AST constructor recursion depth mismatch".
    assert client.get("/healthz").status_code == 200
    assert "Traceback" not in log.text(start), log.text(start)
    assert r.status_code < 500, r.text
    assert r.status_code == case.status, r.text
    if case.status < 300:
        if r.headers["content-type"].startswith("text/event-stream"):  # streamed to its end
            assert ("event: done" in r.text) if case.path == G else r.text.rstrip().endswith("data: [DONE]"), r.text
        else:
            assert strict_json(r.content)["id"]
    else:
        error = strict_json(r.content)["error"]
        assert error["param"] == case.param and error["code"] == case.status, error
        assert error["message"] and error["type"], error
        if case.value is not ANY:
            assert error["value"] == case.value, error
