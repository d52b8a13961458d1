"""Step-level continuous batching: every request in flight denoises in the same model calls.

One background thread owns the model. Each active request keeps its own :class:`DenoisingSampler` and
:class:`DenoisingState` (its own settings, one ``torch.Generator`` per sample). Every tick the requests
that need a model call at their current step are stacked into one right-padded batch (pad id +
attention mask, at most ``max_batch`` rows); ONE forward computes the logits at the union of their
needed positions; the logits [n, V] come back in row-major order, so each request takes its own
contiguous slice and its sampler steps. New requests join at the next tick, finished or cancelled ones
leave. Because a row's logits do not depend on the other rows of the batch and each sample draws from
its own generator, a request's result is the one ``DiffusionGenerator.generate`` gives it alone.

Classifier-free guidance is a request kind of its own: such a request puts twice its rows in the batch
(the samples, then the same samples with the prompt masked out) and combines the two halves of its slice
the way ``DiffusionGenerator.logits`` does.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import UsageError
from ..generation import DiffusionGenerator
from ..modeling import masked_logits, position_limit
from ..sampler import DenoisingSampler, DenoisingState, SamplerConfig


def default_max_length(generator: DiffusionGenerator) -> int:
    """Tokens per sample when a request does not say: the checkpoint's training length."""
    return generator.config.max_length


def model_positions(generator: DiffusionGenerator) -> int:
    """The most positions the model can attend over (its position table / rotary range)."""
    return position_limit(generator.model.config) or 512


class QueueFull(Exception):
    """The waiting line is full: the caller answers 503 with Retry-After."""


@dataclass
class JobSpec:
    """What to generate: one template per sample (a prompt is a template ending in one masked span)."""

    templates: list[str]
    sampler: SamplerConfig
    seed: int = 0
    cfg_scale: float = 0.0
    suppress_tokens: list[str] = field(default_factory=list)
    stop_at_eos: bool = True
    max_length: int | None = None
    stream: bool = False  # send every step (tokens, masks, confidence); without it only the result


class Job:
    """One request in flight: its sampler, its state, and a channel of events back to the event loop."""

    _ids = itertools.count(1)

    def __init__(self, spec: JobSpec, generator: DiffusionGenerator, loop: asyncio.AbstractEventLoop | None):
        self.id = next(self._ids)
        self.spec = spec
        g = generator
        x, editable, attention = g.build_batch(spec.templates, spec.max_length)  # [b, l] each, raises UsageError
        self.attention = attention
        self.sampler = DenoisingSampler(spec.sampler, g.mask_id, g.suppress_ids(spec.suppress_tokens),
                                        eos_token_id=g.sep_id if spec.stop_at_eos else None)  # as generate() does
        self.notes = self.sampler.set_timesteps(spec.sampler.steps, editable)
        generators = [torch.Generator().manual_seed(spec.seed + i) for i in range(len(spec.templates))]
        self.state = DenoisingState(x=x, editable=editable, generators=generators)
        self.confidence = torch.full(x.shape, float("nan"))  # [b, l] model probability of each committed token
        self.max_iterations = int(editable.sum(1).max()) * 2 + self.sampler.num_steps  # generate()'s hard stop
        self.iterations = 0
        self.loop = loop
        self.events: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.started: float | None = None
        self.max_rows_seen = 0  # the largest batch (rows) this request shared a model call with
        self.result: dict | None = None

    @property
    def rows(self) -> int:
        """Rows this request occupies in a model call."""
        return self.state.x.shape[0] * (2 if self.spec.cfg_scale else 1)

    def emit(self, event: dict) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        self.cancelled.set()

    # -- the sampler's side of the loop: the same checks, in the same order, as DiffusionGenerator.generate
    def advance_to_call(self) -> bool:
        """Skip steps that commit nothing; True if the request needs a model call now, False if it is done."""
        sampler, state = self.sampler, self.state
        while self.iterations < self.max_iterations:
            if sampler.done(state):
                return False
            if bool(sampler.plan(state).any()):
                return True
            state = self.state = sampler.skip(state)
            self.iterations += 1
        return False


def check_limits(max_batch: int, max_queue: int) -> None:
    """The engine's limits, checked here only (`serve` calls it before loading the model)."""
    if max_batch < 1:
        raise UsageError(f"--max-batch must be >= 1, got {max_batch}.")
    if max_queue < 1:
        raise UsageError(f"--max-queue must be >= 1, got {max_queue}.")


class Engine:
    """The scheduler: a bounded waiting line, the active set, and the model loop in one thread."""

    def __init__(self, generator: DiffusionGenerator, max_batch: int = 32, max_queue: int = 64,
                 tick_delay: float = 0.0, on_call=None, on_finish=None):
        check_limits(max_batch, max_queue)
        self.generator = generator
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.tick_delay = tick_delay
        self.on_call = on_call  # callback(rows, requests) after each model call (metrics)
        self.on_finish = on_finish  # callback(job) when a request completes
        self.waiting: collections.deque[Job] = collections.deque()
        self.active: list[Job] = []
        self.lock = threading.Condition()
        self.model_calls = 0
        self.request_steps = 0  # sum over model calls of the requests in the call
        self._stop = False
        self._thread: threading.Thread | None = None
        vocab = generator.tokenizer.batch_decode([[i] for i in range(len(generator.tokenizer))])
        self.vocab_text = np.array(vocab, dtype=object)  # id -> its text, for showing tokens one by one
        for i in (generator.cls_id, generator.sep_id, generator.pad_id):
            if i is not None:
                self.vocab_text[i] = ""  # block markers and end of text are not shown as text
        self.special = torch.tensor([i for i in (generator.cls_id, generator.sep_id, generator.pad_id) if i is not None])

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="textdiffusion-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self.lock:
            self._stop = True
            self.lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- the HTTP side ----------------------------------------------------------------------------
    def submit(self, spec: JobSpec, loop: asyncio.AbstractEventLoop | None = None) -> Job:
        if len(spec.templates) * (2 if spec.cfg_scale else 1) > self.max_batch:
            raise UsageError(f"n={len(spec.templates)} samples need more rows than --max-batch {self.max_batch}.",
                             field="n", value=len(spec.templates))
        job = Job(spec, self.generator, loop)  # tokenises and validates outside the lock
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (the limit is {self.max_queue}).")
            self.waiting.append(job)
            self.lock.notify_all()
        return job

    def load(self) -> dict:
        with self.lock:
            return {"waiting": len(self.waiting), "active": len(self.active),
                    "active_rows": sum(j.rows for j in self.active), "max_batch": self.max_batch,
                    "max_queue": self.max_queue, "model_calls": self.model_calls}

    # -- the model loop ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.lock:
                while not self._stop and not self.waiting and not self.active:
                    self.lock.wait()
                if self._stop:
                    return
                self._admit()
                jobs = list(self.active)
            try:
                self._tick(jobs)
            except Exception as e:  # never let one bad batch kill the server: fail its requests
                for job in jobs:
                    self._fail(job, f"internal error during generation: {e!r}")
            if self.tick_delay:
                time.sleep(self.tick_delay)

    def _admit(self) -> None:
        """Move waiting requests into the active set while their rows fit (first come, first served)."""
        rows = sum(j.rows for j in self.active)
        while self.waiting and rows + self.waiting[0].rows <= self.max_batch:
            job = self.waiting.popleft()
            if job.cancelled.is_set():
                continue
            job.started = time.perf_counter()
            rows += job.rows
            self.active.append(job)
            if job.spec.stream:
                job.emit(self._frame(job, "start"))

    def _leave(self, job: Job) -> None:
        with self.lock:
            if job in self.active:
                self.active.remove(job)

    def _fail(self, job: Job, message: str) -> None:
        self._leave(job)
        job.result = {"error": message}
        job.emit({"event": "error", "message": message})

    @torch.inference_mode()
    def _tick(self, jobs: list[Job]) -> None:
        ready = []
        for job in jobs:
            if job.cancelled.is_set():
                self._leave(job)  # a client that went away frees its rows now
            elif job.advance_to_call():
                ready.append(job)
            else:
                self._finish(job)
        if not ready:
            return
        g = self.generator
        xs, atts, needed = [], [], []
        for job in ready:  # rows of each request, in order; a CFG request adds its unconditional copy
            st = job.state
            need = job.sampler.needed_positions(st)  # [b, l]
            xs.append(st.x)
            atts.append(job.attention)
            needed.append(need)
            if job.spec.cfg_scale:
                keep = ~st.editable & ~torch.isin(st.x, self.special)
                xs.append(st.x.masked_fill(keep, g.mask_id))  # the prompt masked out
                atts.append(job.attention)
                needed.append(need)
        length = max(x.shape[1] for x in xs)
        x = torch.cat([_pad(t, length, g.pad_id) for t in xs]).to(g.device)  # [B, L]
        attention = torch.cat([_pad(t, length, 0) for t in atts]).to(g.device)  # [B, L]
        positions = torch.cat([_pad(t, length, False) for t in needed]).to(g.device)  # [B, L]
        logits = masked_logits(g.denoiser, x, attention, positions)  # [n, V] row-major over the batch
        rows = x.shape[0]
        with self.lock:
            self.model_calls += 1
            self.request_steps += len(ready)
        if self.on_call is not None:
            self.on_call(rows, len(ready))
        counts = [int(n.sum()) for n in needed]
        pieces = list(torch.split(logits, counts))
        for job in ready:
            own = pieces.pop(0)
            if job.spec.cfg_scale:
                unc = pieces.pop(0)
                own = unc + (1 + job.spec.cfg_scale) * (own - unc)  # as DiffusionGenerator.logits
            job.max_rows_seen = max(job.max_rows_seen, rows)
            self._step(job, own.to(job.state.x.device))

    def _step(self, job: Job, logits: torch.Tensor) -> None:
        st, mask_id = job.state, self.generator.mask_id
        needed = job.sampler.needed_positions(st)  # [b, l]
        before = st.x
        st = job.state = job.sampler.step(logits, dataclasses.replace(st, nfe=st.nfe + 1))
        job.iterations += 1
        if not job.spec.stream:
            return  # nobody watches the steps: no confidence, no frame
        # confidence of the newly committed tokens: the model's probability of the token now at the position
        new = needed & (st.x != mask_id) & (st.x != before)  # [b, l]
        probs = logits.float().softmax(-1)  # [n, V] at the needed positions, row-major
        p_at = probs.gather(-1, st.x[needed][:, None]).squeeze(-1)  # [n]
        conf = torch.full(st.x.shape, float("nan"))
        conf[needed] = p_at.cpu()
        job.confidence = torch.where(new.cpu(), conf, job.confidence)
        job.confidence[(st.x == mask_id).cpu()] = float("nan")  # re-masked tokens lose their confidence
        job.emit(self._frame(job, "step"))

    def _finish(self, job: Job) -> None:
        g, st = self.generator, self.state_cpu(job)
        texts = [g.decode(row, ed, job.spec.stop_at_eos) for row, ed in zip(st[0], st[1])]
        now = time.perf_counter()
        job.result = {
            "texts": texts, "model_calls": job.state.nfe, "steps": job.sampler.num_steps, "notes": job.notes,
            "tokens": int(st[1].sum()), "queue_seconds": round(job.started - job.submitted, 4),
            "generate_seconds": round(now - job.started, 4), "max_batch_rows": job.max_rows_seen,
        }
        self._leave(job)
        job.emit({**(self._frame(job, "done") if job.spec.stream else {"event": "done"}), **job.result})
        if self.on_finish is not None:
            self.on_finish(job)

    @staticmethod
    def state_cpu(job: Job) -> tuple[torch.Tensor, torch.Tensor]:
        return job.state.x.cpu(), job.state.editable.cpu()

    def _frame(self, job: Job, kind: str) -> dict:
        """One step as the page and the stream see it: every position's text, masked or not, confidence."""
        x, editable = self.state_cpu(job)
        keep = job.attention.bool()  # [b, l] no padding in the output
        masked = (x == self.generator.mask_id) & editable
        texts = self.vocab_text[x.numpy()]  # [b, l] object array, vectorised lookup
        conf = job.confidence.numpy().round(4)
        rows = []
        for i in range(x.shape[0]):  # per sample (not per token): slice its real positions
            k = keep[i].numpy()
            rows.append({"ids": x[i][keep[i]].tolist(), "tokens": texts[i][k].tolist(), "masked": masked[i][keep[i]].tolist(),
                         "editable": editable[i][keep[i]].tolist(),
                         "confidence": np.where(np.isnan(conf[i][k]), None, conf[i][k]).tolist()})
        return {"event": kind, "request": job.id, "step": job.state.step_index, "model_calls": job.state.nfe,
                "num_steps": job.sampler.num_steps, "masked": int(masked.sum()),
                "elapsed": round(time.perf_counter() - (job.started or job.submitted), 4), "rows": rows}


def _pad(t: torch.Tensor, length: int, value) -> torch.Tensor:
    """Right-pad [b, l] to [b, length]."""
    if t.shape[1] == length:
        return t
    out = torch.full((t.shape[0], length), value, dtype=t.dtype)
    out[:, : t.shape[1]] = t
    return out
