"""`textdiffusion serve`: the HTTP API and the live page on one model.

    textdiffusion serve --checkpoint wiki-small                 # http://127.0.0.1:8000/
    textdiffusion serve --checkpoint wiki-small --max-batch 64 --port 9000
    curl -s localhost:8000/v1/completions -d '{"prompt": "The river", "max_tokens": 24}' -H 'content-type: application/json'

Loopback by default; ``--host 0.0.0.0`` binds every interface (with a warning: there is no authentication).
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
    guide: Optional[str] = field(default=None, metadata={
        "help": "A guide folder (`textdiffusion train-guide`) for requests with guidance classifier or smc; its "
                "labels are offered when the checkpoint has none."})

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be in [0, 65535], got {self.port}.")
        from textdiffusion.serving.engine import check_limits

        check_limits(self.max_batch, self.max_queue)
        if self.step_delay < 0:
            raise UsageError(f"--step-delay must be >= 0, got {self.step_delay}.")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_app(args: ServeArgs):
    """Load the model, start the engine, return (app, engine)."""
    from textdiffusion.models.bundled import resolve_checkpoint
    from textdiffusion.pipelines.generation import DiffusionGenerator, resolve_device, resolve_dtype
    from textdiffusion.serving.app import create_app
    from textdiffusion.serving.engine import Engine

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    path = resolve_checkpoint(args.checkpoint)
    generator = DiffusionGenerator.from_pretrained(path, device=str(device), dtype=dtype)
    guide = generator.open_guide(args.guide)  # refused here, in one line, if its tokenizer is not the model's
    engine = Engine(generator, max_batch=args.max_batch, max_queue=args.max_queue, tick_delay=args.step_delay,
                    guide=guide)
    app = create_app(engine, model_id=Path(args.checkpoint).name or args.checkpoint)
    engine.start()
    return app, engine


def run_serve(args: ServeArgs) -> None:
    try:
        import uvicorn
    except ImportError:
        raise UsageError("serve needs the server packages: pip install 'textdiffusion[serve]'.") from None
    if not is_loopback(args.host):
        logger.warning("binding %s: the API is reachable from other machines and has no authentication.", args.host)
    app, engine = build_app(args)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.stop()
