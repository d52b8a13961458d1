"""The server's door: API keys, who a request comes from, and one access-log line per request.

    textdiffusion serve --host 0.0.0.0 --api-key-file keys.txt      # keys.txt: one key a line, or name:key
    TEXTDIFFUSION_API_KEY=sk-... textdiffusion serve --host 0.0.0.0

Keys come from a file or the environment, never from a command-line value (``ps`` shows those). With keys set,
every route needs ``Authorization: Bearer <key>`` (what the official OpenAI clients send from ``api_key``), except
``/healthz``, the live page's own files (``/`` and ``/static/``: no data, and the page asks for the key once and
sends it on every call) and, with ``--public-metrics``, ``/metrics``. Keys are compared in constant time against
every key, and a missing key, a wrong key and a key in the query string all get the same 401 in OpenAI's error
shape: nothing says whether a key exists. The client a request counts against (the engine's fair sharing and
per-client queue) is the key's name, or the peer address without keys.
"""

from __future__ import annotations

import hmac
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from textdiffusion.errors import UsageError

API_KEY_ENV = "TEXTDIFFUSION_API_KEY"
OPEN_PATHS = ("/healthz", "/", "/favicon.ico")  # and everything under /static/
MIN_KEY_LENGTH = 16


def load_api_keys(path: str | None, environ=os.environ) -> dict[str, str]:
    """{key: client name} from ``path`` (one key a line, ``name:key`` to name it, ``#`` comments) and from
    ``TEXTDIFFUSION_API_KEY`` (named "env"); empty when neither is set."""
    keys: dict[str, str] = {}
    if path is not None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise UsageError(f"--api-key-file {path!r}: no such file.", field="api_key_file", value=path)
        for number, line in enumerate(file.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, key = line.partition(":")
            name, key = (name.strip(), key.strip()) if sep else (f"key-{number}", name)
            if len(key) < MIN_KEY_LENGTH or any(c.isspace() for c in key):
                raise UsageError(f"--api-key-file {path!r}, line {number}: a key must be at least {MIN_KEY_LENGTH} "
                                 "characters without spaces (e.g. `python -c 'import secrets; print(secrets.token_urlsafe())'`).",
                                 field="api_key_file", value=path)
            if key in keys:
                raise UsageError(f"--api-key-file {path!r}, line {number}: the same key appears twice.",
                                 field="api_key_file", value=path)
            keys[key] = name
        if not keys:
            raise UsageError(f"--api-key-file {path!r} holds no key.", field="api_key_file", value=path)
    from_env = environ.get(API_KEY_ENV, "").strip()
    if from_env:
        if len(from_env) < MIN_KEY_LENGTH:
            raise UsageError(f"{API_KEY_ENV} must be at least {MIN_KEY_LENGTH} characters.", field="api_key", value=None)
        keys[from_env] = "env"
    return keys


def key_owner(keys: dict[str, str], given: str) -> str | None:
    """The name of the key ``given`` matches, or None: every key is compared, each in constant time."""
    owner = None
    for key, name in keys.items():
        if hmac.compare_digest(key.encode(), given.encode()):
            owner = name
    return owner


def unauthorized() -> tuple[int, dict, bytes]:
    body = {"error": {"message": "Missing or invalid API key: send it as the header 'Authorization: Bearer <key>'.",
                      "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
    return 401, {"www-authenticate": "Bearer"}, json.dumps(body).encode()


class ApiKeyAuth:
    """ASGI middleware: checks the bearer key (when keys are set) and puts the request's client name in
    ``scope["state"]["client"]`` (the key's name, or the peer address)."""

    def __init__(self, app, keys: dict[str, str], public_metrics: bool = False):
        self.app, self.keys, self.public_metrics = app, keys, public_metrics

    def open_path(self, path: str) -> bool:
        return path in OPEN_PATHS or path.startswith("/static/") or (self.public_metrics and path == "/metrics")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        peer = scope.get("client") or ("unknown", 0)
        state["client"] = peer[0]
        if not self.keys or scope["method"] == "OPTIONS" or self.open_path(scope["path"]):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, given = header.partition(" ")
        owner = key_owner(self.keys, given.strip()) if scheme.lower() == "bearer" and given.strip() else None
        if owner is None:
            status, headers, body = unauthorized()
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"),
                                    *((k.encode(), v.encode()) for k, v in headers.items())]})
            await send({"type": "http.response.body", "body": body})
            return
        state["client"] = owner
        return await self.app(scope, receive, send)


@dataclass
class AccessLog:
    """One JSON line per request: id, client, route, status, tokens, model calls, latency; the prompt and the
    text only with ``log_text``. Never a key (the client is the key's name)."""

    stream: TextIO = field(default_factory=lambda: sys.stderr)
    log_text: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(cls, path: str | None, log_text: bool = False) -> "AccessLog | None":
        if path is None:
            return None
        if path == "-":
            return cls(sys.stderr, log_text)
        try:
            return cls(open(path, "a", buffering=1, encoding="utf-8"), log_text)  # noqa: SIM115 (lives with the server)
        except OSError as e:
            raise UsageError(f"--access-log {path!r} cannot be opened for appending ({e.strerror}).",
                             field="access_log", value=path) from None

    def write(self, *, request_id: str | None, client: str, route: str, status: int, started: float,
              tokens: int | None = None, model_calls: int | None = None, prompt: str | None = None,
              texts: list[str] | None = None) -> None:
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "id": request_id, "client": client, "route": route,
                "status": status, "tokens": tokens, "model_calls": model_calls,
                "latency_s": round(time.perf_counter() - started, 4)}
        if self.log_text:
            line.update(prompt=prompt, texts=texts)
        with self._lock:
            self.stream.write(json.dumps(line, ensure_ascii=False) + "\n")
            self.stream.flush()
