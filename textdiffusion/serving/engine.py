"""Step-level continuous batching: every request in flight denoises in the same model calls.

One background thread owns the model and one :class:`pipelines.denoising.DenoisingRun` — the same loop
``DiffusionGenerator.generate`` drives to the end. Each request is a group of that run (its own sampler
settings, one ``torch.Generator`` per sample); every tick the engine admits waiting requests (at most
``max_batch`` rows in flight), removes cancelled ones, and calls ``run.step()``: one model call for every
request that needs one, through the key/value cache for requests that generate in blocks (their cached
keys and values stay put as others join and leave). Because a row's logits do not depend on the other
rows of the batch and each sample draws from its own generator, a request's result is the one
``DiffusionGenerator.generate`` gives it alone.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from textdiffusion.config import SamplerConfig
from textdiffusion.core.denoiser import position_limit
from textdiffusion.core.sampler import DenoisingSampler, DenoisingState
from textdiffusion.errors import UsageError
from textdiffusion.pipelines.denoising import DenoisingGroup, DenoisingRun
from textdiffusion.pipelines.generation import DiffusionGenerator
from textdiffusion.pipelines.guidance import Guider


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
    guider: Guider | None = None  # classifier guidance or particles (pipelines/guidance.py)


class Job:
    """One request in flight: its group in the run, and a channel of events back to the event loop."""

    _ids = itertools.count(1)

    def __init__(self, spec: JobSpec, group: DenoisingGroup, loop: asyncio.AbstractEventLoop | None):
        self.id = next(self._ids)
        self.spec = spec
        self.group = group
        group.keep_logits = spec.stream  # the stream shows each committed token's probability
        self.confidence = torch.full(group.state.x.shape, float("nan"))  # [b, l] probability of each committed token
        self.loop = loop
        self.events: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.started: float | None = None
        self.max_rows_seen = 0  # the largest batch (rows) this request shared a model call with
        self.result: dict | None = None

    @property
    def state(self) -> DenoisingState:
        return self.group.state

    @property
    def sampler(self) -> DenoisingSampler:
        return self.group.sampler

    @property
    def notes(self) -> list[str]:
        return self.group.notes

    @property
    def attention(self) -> torch.Tensor:
        return self.group.attention

    @property
    def rows(self) -> int:
        """Rows this request occupies in a model call."""
        return self.group.rows

    def emit(self, event: dict) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        self.cancelled.set()


def check_limits(max_batch: int, max_queue: int) -> None:
    """The engine's limits, checked here only (`serve` calls it before loading the model)."""
    if max_batch < 1:
        raise UsageError(f"--max-batch must be >= 1, got {max_batch}.")
    if max_queue < 1:
        raise UsageError(f"--max-queue must be >= 1, got {max_queue}.")


class Engine:
    """The scheduler: a bounded waiting line, the active set, and the model loop in one thread."""

    def __init__(self, generator: DiffusionGenerator, max_batch: int = 32, max_queue: int = 64,
                 tick_delay: float = 0.0, on_call=None, on_finish=None, cache: str = "auto", guide=None):
        check_limits(max_batch, max_queue)
        self.generator = generator
        self.guide = guide  # a models.guide.NoisyClassifier for requests with guidance classifier|smc, or None
        self.cache = cache
        self.run = DenoisingRun(generator, cache)  # the engine thread's own; requests join and leave it
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
        particles = spec.guider.particles if spec.guider is not None else 1
        if len(spec.templates) * particles * (2 if spec.cfg_scale else 1) > self.max_batch:
            raise UsageError(f"n={len(spec.templates)} samples need more rows than --max-batch {self.max_batch}"
                             f"{f' ({particles} particles each)' if particles > 1 else ''}.",
                             field="n", value=len(spec.templates))
        group = self.run.new_group(spec.templates, spec.sampler, seed=spec.seed, cfg_scale=spec.cfg_scale,
                                   suppress_tokens=spec.suppress_tokens, stop_at_eos=spec.stop_at_eos,
                                   max_length=spec.max_length, guider=spec.guider)  # tokenises outside the lock
        job = Job(spec, group, loop)
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
            except Exception as e:  # never let one bad batch kill the server: fail its requests, start a clean run
                for job in jobs:
                    self._fail(job, f"internal error during generation: {e!r}")
                self.run = DenoisingRun(self.generator, self.cache)
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
            self.run.join(job.group)
            self.active.append(job)
            if job.spec.stream:
                job.emit(self._frame(job, "start"))

    def _leave(self, job: Job) -> None:
        try:
            self.run.remove(job.group)  # only the engine thread calls this: the run is its own
        except Exception:  # a run broken by a failed tick is replaced by a clean one right after (see _run)
            pass
        with self.lock:
            if job in self.active:
                self.active.remove(job)

    def _fail(self, job: Job, message: str) -> None:
        self._leave(job)
        job.result = {"error": message}
        job.emit({"event": "error", "message": message})

    def _tick(self, jobs: list[Job]) -> None:
        for job in jobs:
            if job.cancelled.is_set():
                self._leave(job)  # a client that went away frees its rows (and its cache rows) now
        stepped = self.run.step()  # one model call for every request that needs one
        if stepped:
            rows = self.run.last_call_rows
            with self.lock:
                self.model_calls += 1
                self.request_steps += len(stepped)
            if self.on_call is not None:
                self.on_call(rows, len(stepped))
            by_group = {job.group.id: job for job in jobs}
            for group in stepped:
                job = by_group[group.id]
                job.max_rows_seen = max(job.max_rows_seen, rows)
                if job.spec.stream:
                    self._stream_step(job)
        for job in jobs:
            if job.group.done and job.result is None and not job.cancelled.is_set():
                self._finish(job)

    def _stream_step(self, job: Job) -> None:
        """The step's frame: every position, and the model's probability of each newly committed token."""
        needed, before, logits = job.group.last
        st, mask_id = job.state, self.generator.mask_id
        if job.group.ancestors is not None:  # particles were resampled: their rows moved after the step
            index = job.group.ancestors.cpu()
            needed, before, logits = _moved(needed, before, logits, index)
            job.confidence = job.confidence[index]
        new = needed & (st.x != mask_id) & (st.x != before)  # [b, l]
        probs = logits.float().softmax(-1)  # [n, V] at the needed positions, row-major
        p_at = probs.gather(-1, st.x[needed][:, None]).squeeze(-1)  # [n]
        conf = torch.full(st.x.shape, float("nan"))
        conf[needed.cpu()] = p_at.cpu()
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
        """(x, editable) of the job's samples (with particles: every particle until done, then the kept ones)."""
        x, editable, _ = job.group.output()
        return x.cpu(), editable.cpu()

    def _frame(self, job: Job, kind: str) -> dict:
        """One step as the page and the stream see it: every position's text, masked or not, confidence."""
        x, editable = self.state_cpu(job)
        keep = job.group.output()[2].cpu().bool()  # [b, l] no padding in the output
        masked = (x == self.generator.mask_id) & editable
        texts = self.vocab_text[x.numpy()]  # [b, l] object array, vectorised lookup
        kept = job.group.kept
        conf = (job.confidence if kept is None else job.confidence[kept.cpu()]).numpy().round(4)
        rows = []
        for i in range(x.shape[0]):  # per sample (not per token): slice its real positions
            k = keep[i].numpy()
            rows.append({"ids": x[i][keep[i]].tolist(), "tokens": texts[i][k].tolist(), "masked": masked[i][keep[i]].tolist(),
                         "editable": editable[i][keep[i]].tolist(),
                         "confidence": np.where(np.isnan(conf[i][k]), None, conf[i][k]).tolist()})
        return {"event": kind, "request": job.id, "step": job.state.step_index, "model_calls": job.state.nfe,
                "num_steps": job.sampler.num_steps, "masked": int(masked.sum()),
                "elapsed": round(time.perf_counter() - (job.started or job.submitted), 4), "rows": rows}



def _moved(needed: torch.Tensor, before: torch.Tensor, logits: torch.Tensor, index: torch.Tensor):
    """A step's (needed [b, l], tokens before [b, l], logits [n, V] row-major at needed) after its rows moved:
    row r now holds what row ``index[r]`` held."""
    index = index.to(needed.device)
    starts = torch.zeros(needed.shape[0] + 1, dtype=torch.long, device=needed.device)
    starts[1:] = needed.sum(1).cumsum(0)
    order = torch.cat([torch.arange(int(starts[i]), int(starts[i + 1]), device=needed.device) for i in index.tolist()])
    return needed[index], before[index], logits[order.to(logits.device)]
