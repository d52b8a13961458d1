"""`textdiffusion serve`: the HTTP API and the live page on one model.

    textdiffusion serve --checkpoint wiki-small                 # http://127.0.0.1:8000/
    textdiffusion serve --checkpoint wiki-small --max-batch 64 --port 9000
    curl -s localhost:8000/v1/completions -d '{"prompt": "The river", "max_tokens": 24}' -H 'content-type: application/json'

Loopback by default. To face a network, give keys (serving/door.py):

    TEXTDIFFUSION_API_KEY=$(python -c 'import secrets; print(secrets.token_urlsafe())') \
        textdiffusion serve --host 0.0.0.0 --access-log - --request-timeout 60
    textdiffusion serve --host 0.0.0.0 --api-key-file keys.txt --cors-origin https://app.example.org

Without keys, a non-loopback --host is refused unless --allow-no-auth says so.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from textdiffusion.errors import UsageError

logger = logging.getLogger("textdiffusion.serve")


@dataclass
class ServeArgs:
    checkpoint: str = field(default="wiki-small", metadata={
        "help": "A checkpoint directory of this project, a bundled model (wiki-small), or any masked LM directory."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind (loopback by default; others warn)."})
    port: int = field(default=8000, metadata={"help": "TCP port (0: any free port)."})
    max_batch: int = field(default=32, metadata={"help": "Most rows (samples) in one model call across requests."})
    max_queue: int = field(default=64, metadata={"help": "Requests that may wait to join; beyond it, 503 + Retry-After."})
    step_delay: float = field(default=0.0, metadata={
        "help": "Seconds to pause between scheduler steps (slows every request; for demos and tests)."})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N, mps or auto."})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16."})
    log_level: str = field(default="info", metadata={"help": "uvicorn's log level (warning: quieter)."})
    api_key_file: Optional[str] = field(default=None, metadata={
        "help": "File of API keys, one a line (or name:key): every route but /healthz and the page then needs "
                "'Authorization: Bearer <key>'. Or set TEXTDIFFUSION_API_KEY. Never a key on the command line."})
    public_metrics: bool = field(default=False, metadata={"help": "With keys: /metrics answers without one."})
    allow_no_auth: bool = field(default=False, metadata={
        "help": "Bind a non-loopback --host without API keys (anyone who reaches the port can use the model)."})
    max_queue_per_client: int = field(default=16, metadata={
        "help": "Requests one client (API key, or address without keys) may have waiting; beyond it, 429 + Retry-After."})
    request_timeout: Optional[float] = field(default=None, metadata={
        "help": "Seconds after which a request is dropped from the run and answered 504 (a request's `timeout` "
                "field may ask for less or more)."})
    cors_origin: list[str] = field(default_factory=list, metadata={
        "help": "An origin whose pages may call this API from a browser (repeatable); none by default."})
    access_log: Optional[str] = field(default=None, metadata={
        "help": "Append one JSON line per request (id, client, route, status, tokens, model calls, latency) to this "
                "file ('-': standard error)."})
    log_text: bool = field(default=False, metadata={"help": "Also log each request's prompt and texts."})
    guide: Optional[str] = field(default=None, metadata={
        "help": "A guide folder (`textdiffusion train-guide`) for requests with guidance classifier or smc; its "
                "labels are offered when the checkpoint has none."})

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be in [0, 65535], got {self.port}.")
        from textdiffusion.serving.engine import check_limits

        check_limits(self.max_batch, self.max_queue, self.max_queue_per_client, self.request_timeout)
        for origin in self.cors_origin:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise UsageError(f"--cors-origin {origin!r}: give an origin such as https://app.example.org (or *).",
                                 field="cors_origin", value=origin)
        if self.step_delay < 0:
            raise UsageError(f"--step-delay must be >= 0, got {self.step_delay}.")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_door(args: ServeArgs) -> dict:
    """The API keys ({key: name}); a non-loopback --host without keys is refused unless --allow-no-auth."""
    from textdiffusion.serving.door import load_api_keys

    keys = load_api_keys(args.api_key_file)
    if not keys and not is_loopback(args.host) and not args.allow_no_auth:
        raise UsageError(f"--host {args.host!r} is reachable from other machines and no API key is set: give "
                         "--api-key-file FILE or TEXTDIFFUSION_API_KEY (or --allow-no-auth to serve anyone).",
                         field="host", value=args.host)
    return keys


def build_app(args: ServeArgs):
    """Load the model, start the engine, return (app, engine)."""
    from textdiffusion.models.bundled import resolve_checkpoint
    from textdiffusion.pipelines.generation import DiffusionGenerator, resolve_device, resolve_dtype
    from textdiffusion.serving.app import create_app
    from textdiffusion.serving.door import AccessLog
    from textdiffusion.serving.engine import Engine

    keys = check_door(args)  # before the (slow) model load
    access_log = AccessLog.open(args.access_log, args.log_text)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    path = resolve_checkpoint(args.checkpoint)
    generator = DiffusionGenerator.from_pretrained(path, device=str(device), dtype=dtype)
    guide = generator.open_guide(args.guide)  # refused here, in one line, if its tokenizer is not the model's
    engine = Engine(generator, max_batch=args.max_batch, max_queue=args.max_queue, tick_delay=args.step_delay,
                    guide=guide, max_queue_per_client=args.max_queue_per_client, request_timeout=args.request_timeout)
    app = create_app(engine, model_id=Path(args.checkpoint).name or args.checkpoint, api_keys=keys,
                     public_metrics=args.public_metrics, cors_origins=args.cors_origin, access_log=access_log)
    engine.start()
    return app, engine


def run_serve(args: ServeArgs) -> None:
    try:
        import uvicorn
    except ImportError:
        raise UsageError("serve needs the server packages: pip install 'textdiffusion[serve]'.") from None
    app, engine = build_app(args)
    if not is_loopback(args.host) and args.allow_no_auth and not args.api_key_file:
        logger.warning("binding %s without API keys (--allow-no-auth): anyone who reaches it can use it.", args.host)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.stop()
