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


# how fast a client's past use of the model is forgotten by the fair scheduler (seconds to halve it)
FAIR_HALF_LIFE = 2.0


class ClientQueueFull(Exception):
    """This client already has its most requests waiting: the caller answers 429 with Retry-After."""


class DeadlinePassed(Exception):
    """The request ran past its deadline: it was dropped from the run; the caller answers 504."""


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
    client: str = "local"  # who asked (a key's name or an address): fair sharing and the per-client queue
    timeout: float | None = None  # seconds from submission; past it the request is dropped and answered 504


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
        self.deadline = self.submitted + spec.timeout if spec.timeout else None
        self.started: float | None = None
        self.last_stepped = 0  # the engine tick this request last took part in (round-robin within a client)
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


def check_limits(max_batch: int, max_queue: int, max_queue_per_client: int | None = None,
                 request_timeout: float | None = None) -> None:
    """The engine's limits, checked here only (`serve` calls it before loading the model)."""
    if max_batch < 1:
        raise UsageError(f"--max-batch must be >= 1, got {max_batch}.")
    if max_queue < 1:
        raise UsageError(f"--max-queue must be >= 1, got {max_queue}.")
    if max_queue_per_client is not None and max_queue_per_client < 1:
        raise UsageError(f"--max-queue-per-client must be >= 1, got {max_queue_per_client}.")
    if request_timeout is not None and request_timeout <= 0:
        raise UsageError(f"--request-timeout must be > 0 seconds, got {request_timeout}.")


class Engine:
    """The scheduler: a waiting line per client, the active set, and the model loop in one thread.

    **Fair sharing.** Waiting requests are admitted round-robin across clients; a client holds at most
    ``max_batch`` rows in the active set, which has room for ``max_batch // 2`` more, so a newcomer joins at the
    next tick instead of waiting for a flood to drain. Each tick steps at most ``max_batch`` rows, least attained
    service first: every client's rows stepped lately are counted (forgotten with a half-life of
    ``FAIR_HALF_LIFE`` seconds), the least-served client steps all its requests, and the others join it while
    they are within one batch of it. Clients that ask alike share every call (the batching is intact); a client
    that just arrived runs ahead of one that has been flooding, so its lone request takes about its time alone
    plus the call in flight, and the flooder, forgotten within seconds, is never shut out for long. A client has
    at most ``max_queue_per_client`` requests waiting (429 beyond).
    **Deadlines.** A request past its ``timeout`` leaves the run (its rows and cache rows freed) at the next
    tick and is answered 504.
    """

    def __init__(self, generator: DiffusionGenerator, max_batch: int = 32, max_queue: int = 64,
                 tick_delay: float = 0.0, on_call=None, on_finish=None, cache: str = "auto", guide=None,
                 max_queue_per_client: int | None = None, request_timeout: float | None = None):
        check_limits(max_batch, max_queue, max_queue_per_client, request_timeout)
        self.generator = generator
        self.guide = guide  # a models.guide.NoisyClassifier for requests with guidance classifier|smc, or None
        self.cache = cache
        self.run = DenoisingRun(generator, cache)  # the engine thread's own; requests join and leave it
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.tick_delay = tick_delay
        self.on_call = on_call  # callback(rows, requests) after each model call (metrics)
        self.on_finish = on_finish  # callback(job) when a request completes
        self.max_queue_per_client = max_queue_per_client or max_queue
        self.request_timeout = request_timeout
        self.waiting: collections.OrderedDict[str, collections.deque[Job]] = collections.OrderedDict()  # by client
        self.active: list[Job] = []
        self.ticks = 0
        self.attained: dict[str, float] = {}  # client -> rows stepped lately (decaying): least-served first
        self._accounted = time.perf_counter()
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
        if spec.timeout is None and self.request_timeout:
            spec.timeout = self.request_timeout
        job = Job(spec, group, loop)
        with self.lock:
            waiting = self.waiting_count()
            if waiting >= self.max_queue:
                raise QueueFull(f"{waiting} requests are waiting (the limit is {self.max_queue}).")
            own = self.waiting.get(spec.client)
            if own is not None and len(own) >= self.max_queue_per_client:
                raise ClientQueueFull(f"this client already has {len(own)} requests waiting (the limit is "
                                      f"{self.max_queue_per_client} per client).")
            self.waiting.setdefault(spec.client, collections.deque()).append(job)
            self.lock.notify_all()
        return job

    def waiting_count(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    def load(self) -> dict:
        with self.lock:
            return {"waiting": self.waiting_count(), "active": len(self.active),
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
        """Move waiting requests into the active set, one per client in turn, while their rows fit: the active
        set holds ``max_batch`` rows plus half as many again for newcomers, and one client at most ``max_batch``."""
        room = self.max_batch + self.max_batch // 2 - sum(j.rows for j in self.active)
        held = collections.Counter()
        for j in self.active:
            held[j.spec.client] += j.rows
        progress = True
        while progress and self.waiting:
            progress = False
            for client in list(self.waiting):
                queue = self.waiting[client]
                while queue and (queue[0].cancelled.is_set() or queue[0].result is not None):
                    queue.popleft()  # went away, or expired, while waiting
                if not queue:
                    del self.waiting[client]
                    continue
                job = queue[0]
                if job.rows > room or held[client] + job.rows > self.max_batch:
                    continue
                queue.popleft()
                self.waiting.move_to_end(client)  # round-robin: the next turn starts after this client
                job.started = time.perf_counter()
                room -= job.rows
                held[client] += job.rows
                self.run.join(job.group)
                self.active.append(job)
                if job.spec.stream:
                    job.emit(self._frame(job, "start"))
                progress = True

    def _expire(self, now: float) -> None:
        """Drop every request past its deadline: waiting ones leave the line, active ones the run."""
        with self.lock:
            late = [j for q in self.waiting.values() for j in q if j.deadline is not None and now > j.deadline]
        for job in late + [j for j in self.active if j.deadline is not None and now > j.deadline and j.result is None]:
            self._fail(job, f"the request ran past its deadline of {job.spec.timeout:g} s and was dropped.",
                       status=504)

    def _select(self, jobs: list[Job]) -> list[Job]:
        """The requests this tick steps (see the class docstring): the clients that have had the least of the model
        lately first — every request of the least-served client, then those of the clients within one batch of it —
        at most ``max_batch`` rows in all; within a client, its longest-waiting requests first."""
        by_client: dict[str, list[Job]] = collections.defaultdict(list)
        for job in jobs:
            if not job.group.done and not job.cancelled.is_set():
                by_client[job.spec.client].append(job)
        order = sorted(by_client, key=lambda c: (self.attained.get(c, 0.0), min(j.last_stepped for j in by_client[c])))
        if not order:
            return []
        least = self.attained.get(order[0], 0.0)
        chosen, rows = [], 0
        for client in order:
            if client != order[0] and self.attained.get(client, 0.0) > least + self.max_batch:
                break  # far ahead of the least-served client: it waits its turn
            for job in sorted(by_client[client], key=lambda j: j.last_stepped):
                if rows + job.rows > self.max_batch:
                    break
                chosen.append(job)
                rows += job.rows
        return chosen

    def _account(self, chosen: list[Job], now: float) -> None:
        """Each client's recent share of the model: rows stepped, decaying with a half-life of FAIR_HALF_LIFE s."""
        decay = 0.5 ** ((now - self._accounted) / FAIR_HALF_LIFE)
        self._accounted = now
        for client in list(self.attained):
            self.attained[client] *= decay
            if self.attained[client] < 1e-3:
                del self.attained[client]
        for job in chosen:
            self.attained[job.spec.client] = self.attained.get(job.spec.client, 0.0) + job.rows

    def _leave(self, job: Job) -> None:
        try:
            self.run.remove(job.group)  # only the engine thread calls this: the run is its own
        except Exception:  # a run broken by a failed tick is replaced by a clean one right after (see _run)
            pass
        with self.lock:
            if job in self.active:
                self.active.remove(job)

    def _fail(self, job: Job, message: str, status: int = 500) -> None:
        self._leave(job)
        job.result = {"error": message, "status": status}
        job.emit({"event": "error", "message": message, "status": status})

    def _tick(self, jobs: list[Job]) -> None:
        for job in jobs:
            if job.cancelled.is_set():
                self._leave(job)  # a client that went away frees its rows (and its cache rows) now
        self._expire(time.perf_counter())
        jobs = [j for j in jobs if j.result is None and not j.cancelled.is_set()]
        self.ticks += 1
        chosen = self._select(jobs)
        self._account(chosen, time.perf_counter())
        for job in chosen:
            job.last_stepped = self.ticks
        stepped = self.run.step(only={job.group.id for job in chosen})  # one model call for the chosen requests
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
