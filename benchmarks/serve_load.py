"""Load on `textdiffusion serve`: N concurrent clients on loopback, step-level batching vs --max-batch 1.

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/serve_load.py            # 32 clients, 128 requests each run
    python benchmarks/serve_load.py --clients 8 --requests 32 --max-batch 32 1

For each --max-batch value it starts the real server (`python -m textdiffusion serve`, a subprocess on a
free loopback port, same CPU affinity as this script), sends a warm-up request, then `--requests`
OpenAI-style completions from `--clients` concurrent clients (each request its own prompt and seed), and
reports throughput, p50/p99 latency, errors, and the average number of requests per model call, read
from the server's own /metrics (> 1 is the batching at work). Bounded: a run stops sending after
`--timeout` seconds. The same seed must give the same text whatever the batch: the texts of the runs
are compared request by request. Results: results.json and README.md in --output.

The fairness run (``--fairness``, on by default): a server with two API keys; client A floods ``--flood``
concurrent requests while client B sends one, and B's latency is compared with the same request alone on the same
server by a third client (so that B arrives with no recent use of the model; the engine's fair sharing,
serving/engine.py, serves the least-served client first).

The library side (``--library``, on by default): the same requests — prompt, seed, ``max_tokens``, the
checkpoint's defaults — through ``DiffusionGenerator.generate`` in this process, ``--max-batch``'s largest
value at a time (request i is row i - first of its batch, so its seed is i as in the server), in the same
run and on the same cores. The server's tokens/s over the library's is how much the HTTP layer, the queue
and the step-level batching cost; the texts must be the same request by request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROMPTS = ["The river", "In 1905 the", "The city of", "Music is", "The first", "During the war", "Water is",
           "The king", "A new", "The history of", "Paris is", "The museum"]


def metric(text: str, name: str) -> float:
    """Sum of the samples of one metric family in Prometheus text (labels included)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


async def run_load(url: str, clients: int, requests: int, max_tokens: int, timeout: float) -> dict:
    """Send `requests` completions from `clients` concurrent clients; what the server did, from /metrics."""
    async with httpx.AsyncClient(base_url=url, timeout=max(60.0, timeout),
                                 limits=httpx.Limits(max_connections=clients)) as c:
        before = (await c.get("/metrics")).text
        queue = iter(range(requests))
        latencies, errors, texts = [], [], {}
        deadline = time.perf_counter() + timeout

        async def client() -> None:
            for i in queue:  # the clients share one iterator: each request is sent once
                if time.perf_counter() > deadline:
                    return
                body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "seed": i}
                t0 = time.perf_counter()
                try:
                    r = await c.post("/v1/completions", json=body)
                except httpx.HTTPError as e:
                    errors.append(repr(e))
                    continue
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                latencies.append(time.perf_counter() - t0)
                texts[i] = r.json()["choices"][0]["text"]

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - t0
        after = (await c.get("/metrics")).text
    calls = metric(after, "textdiffusion_model_calls_total") - metric(before, "textdiffusion_model_calls_total")
    request_steps = (metric(after, "textdiffusion_request_steps_total")
                     - metric(before, "textdiffusion_request_steps_total"))
    rows = metric(after, "textdiffusion_batch_rows_sum") - metric(before, "textdiffusion_batch_rows_sum")
    done = len(latencies)
    return {"clients": clients, "requests": requests, "completed": done, "errors": len(errors),
            "error_samples": errors[:3], "wall_s": round(wall, 3), "requests_per_s": round(done / wall, 3),
            "tokens_per_s": round(done * max_tokens / wall, 1),
            "latency_p50_s": round(percentile(latencies, 50), 3), "latency_p99_s": round(percentile(latencies, 99), 3),
            "model_calls": int(calls), "requests_per_model_call": round(request_steps / calls, 2) if calls else 0.0,
            "rows_per_model_call": round(rows / calls, 2) if calls else 0.0, "texts": texts}


def library_run(checkpoint: str, requests: int, max_tokens: int, batch: int) -> dict:
    """The same requests through ``generate`` in batches of ``batch``: tokens/s and the continuations' texts."""
    from textdiffusion.pipelines.generation import DiffusionGenerator
    from textdiffusion.serving.app import _continuation

    gen = DiffusionGenerator.from_pretrained(checkpoint)
    gen.generate(templates=[f"Warm up<mask:{max_tokens}>"])
    texts = {}
    t0 = time.perf_counter()
    for first in range(0, requests, batch):
        ids = range(first, min(first + batch, requests))
        templates = [f"{PROMPTS[i % len(PROMPTS)]}<mask:{max_tokens}>" for i in ids]
        out = gen.generate(templates=templates, seed=first)  # row j is seeded first + j = its request's seed
        _, editable, _ = gen.build_batch(templates)
        for i, row, ed in zip(ids, out.token_ids, editable):
            texts[i] = _continuation(gen, row, ed)[0]
    wall = time.perf_counter() - t0
    alone = {}  # the server's promise: a request's text is the one `generate` gives it alone
    for i in range(min(8, requests)):
        template = f"{PROMPTS[i % len(PROMPTS)]}<mask:{max_tokens}>"
        out = gen.generate(templates=[template], seed=i)
        alone[i] = _continuation(gen, out.token_ids[0], gen.build_batch([template])[1][0])[0]
    return {"batch": batch, "requests": requests, "wall_s": round(wall, 3),
            "tokens_per_s": round(requests * max_tokens / wall, 1), "texts": texts, "alone": alone}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: str, max_batch: int, max_queue: int, log: Path, extra: tuple = (),
                 env: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "textdiffusion", "serve", "--checkpoint", checkpoint, "--host", "127.0.0.1",
           "--port", str(port), "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--log-level", "warning",
           *extra]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the server did not start within 180 s")


def markdown(results: list[dict], args, machine: str, library: dict | None = None) -> str:
    lines = [
        "# `textdiffusion serve` under load",
        "",
        f"`{' '.join(['python', 'benchmarks/serve_load.py'] + sys.argv[1:])}` — {args.clients} concurrent clients on "
        f"loopback, {args.requests} completions per run ({args.max_tokens} tokens, the checkpoint's saved generation settings, checkpoint "
        f"`{args.checkpoint}`), on {machine}.",
        "",
        "| --max-batch | completed | errors | requests/s | tokens/s | p50 latency (s) | p99 latency (s) "
        "| model calls | requests per model call | rows per model call |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['max_batch']} | {r['completed']}/{r['requests']} | {r['errors']} | {r['requests_per_s']:.2f} "
                     f"| {r['tokens_per_s']:.0f} | {r['latency_p50_s']:.2f} | {r['latency_p99_s']:.2f} | {r['model_calls']} "
                     f"| {r['requests_per_model_call']:.2f} | {r['rows_per_model_call']:.2f} |")
    if len(results) > 1:
        base = results[-1]
        lines += ["", f"Throughput ratio (--max-batch {results[0]['max_batch']} vs {base['max_batch']}): "
                      f"**{results[0]['requests_per_s'] / base['requests_per_s']:.2f}x**."]
        same = results[0]["identical_texts"]
        lines += [f"Same seed, same text across the runs: {same[0]}/{same[1]} requests."]
    if library is not None:
        same, alone = library["same_texts_as_server"], library["server_same_as_alone"]
        lines += ["", f"The library on the same requests (`generate`, {library['batch']} rows a call, same cores): "
                      f"{library['tokens_per_s']:.0f} tokens/s. **The server (--max-batch {results[0]['max_batch']}) at "
                      f"{results[0]['tokens_per_s'] / library['tokens_per_s']:.2f}x the library's tokens/s.** "
                      f"The server's text equals `generate` of that request alone for {alone[0]}/{alone[1]} requests "
                      f"checked, and the library's batched text for {same[0]}/{same[1]} (a row right-padded into a "
                      "batch of other lengths can round differently and, sampled, diverge — in the library as well)."]
    return "\n".join(lines) + "\n"


def fairness_run(checkpoint: str, max_batch: int, flood: int, max_tokens: int, log: Path) -> dict:
    """B's single request alone, then while A floods ``flood`` concurrent requests: latencies and their ratio."""
    keys = {"A": "client-a-0123456789abcdef", "B": "client-b-0123456789abcdef", "C": "client-c-0123456789abcdef"}
    key_file = log.with_name("keys.txt")
    key_file.write_text("".join(f"{name}:{key}\n" for name, key in keys.items()))
    proc, url = start_server(checkpoint, max_batch, max_queue=flood + 8, log=log,
                             extra=("--api-key-file", str(key_file), "--max-queue-per-client", str(flood)))
    body = {"prompt": "The history of the river", "max_tokens": max_tokens, "seed": 1}
    auth = {name: {"authorization": f"Bearer {key}"} for name, key in keys.items()}
    try:
        with httpx.Client(base_url=url, timeout=300) as c:
            def lone() -> float:
                t0 = time.perf_counter()
                c.post("/v1/completions", json=body, headers=auth["C"]).raise_for_status()  # B arrives new
                return time.perf_counter() - t0

            lone()
            alone = sorted(lone() for _ in range(3))[1]

        async def flooded() -> tuple[float, int]:
            async with httpx.AsyncClient(base_url=url, timeout=600) as ac:
                tasks = [asyncio.create_task(ac.post("/v1/completions", json={**body, "seed": i}, headers=auth["A"]))
                         for i in range(flood)]
                await asyncio.sleep(1.0)
                t0 = time.perf_counter()
                (await ac.post("/v1/completions", json=body, headers=auth["B"])).raise_for_status()
                latency = time.perf_counter() - t0
                errors = sum(r.status_code != 200 for r in await asyncio.gather(*tasks))
                return latency, errors

        during, errors = asyncio.run(flooded())
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        key_file.unlink(missing_ok=True)
    return {"max_batch": max_batch, "flood": flood, "alone_s": round(alone, 4), "during_flood_s": round(during, 4),
            "ratio": round(during / alone, 2), "flood_errors": errors}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="wiki-small")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, nargs="+", default=[32, 1])
    p.add_argument("--timeout", type=float, default=240, help="Seconds per run after which no request is sent.")
    p.add_argument("--output", default="benchmarks/results/serve_load")
    p.add_argument("--fairness", action=argparse.BooleanOptionalAction, default=True,
                   help="Also the two-client run: one client floods --flood requests, the other sends one.")
    p.add_argument("--flood", type=int, default=48)
    p.add_argument("--library", action=argparse.BooleanOptionalAction, default=True,
                   help="Also run the same requests through DiffusionGenerator.generate (the server/library ratio).")
    args = p.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, {cores} available to the run "
               f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), no GPU; "
               f"load average {load:.1f} when it started (other work shares the machine)")
    results = []
    for max_batch in args.max_batch:
        proc, url = start_server(args.checkpoint, max_batch, max_queue=max(64, args.clients), log=out / "server.log")
        try:
            httpx.post(url + "/v1/completions", json={"prompt": "Warm up", "max_tokens": args.max_tokens}, timeout=120)
            r = asyncio.run(run_load(url, args.clients, args.requests, args.max_tokens, args.timeout))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        r["max_batch"] = max_batch
        print(json.dumps({k: v for k, v in r.items() if k != "texts"}), flush=True)
        results.append(r)
    common = set.intersection(*(set(r["texts"]) for r in results))
    same = sum(len({r["texts"][i] for r in results}) == 1 for i in common)
    for r in results:
        r["identical_texts"] = [same, len(common)]
    library = None
    if args.library:
        library = library_run(args.checkpoint, args.requests, args.max_tokens, max(args.max_batch))
        served = results[0]["texts"]
        library["same_texts_as_server"] = [sum(served.get(i) == text for i, text in library["texts"].items()),
                                           len(library["texts"])]
        library["server_same_as_alone"] = [sum(served.get(i) == text for i, text in library["alone"].items()),
                                           len(library["alone"])]
        print(json.dumps({k: v for k, v in library.items() if k not in ("texts", "alone")}), flush=True)
    fairness = None
    if args.fairness:
        fairness = fairness_run(args.checkpoint, max(args.max_batch), args.flood, args.max_tokens, out / "server.log")
        print(json.dumps(fairness), flush=True)
    (out / "results.json").write_text(json.dumps({"machine": machine, "args": vars(args), "runs": results,
                                                  "library": library, "fairness": fairness}, indent=2) + "\n")
    report = markdown(results, args, machine, library)
    if fairness:
        report += (f"\n## Two clients\n\nClient A floods {fairness['flood']} concurrent requests (--max-batch "
                   f"{fairness['max_batch']}); client B's single request ({args.max_tokens} tokens) takes "
                   f"{fairness['during_flood_s']:.2f} s against {fairness['alone_s']:.2f} s alone: "
                   f"**{fairness['ratio']:.2f}x** ({fairness['flood_errors']} errors in the flood).\n")
    (out / "README.md").write_text(report)
    (out / "server.log").unlink(missing_ok=True)
    print(markdown(results, args, machine))


if __name__ == "__main__":
    main()
