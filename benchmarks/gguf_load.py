"""How long a named scorer's GGUF file takes to load: the first load (converted into an empty cache) and the next
(read from the converted copy), each in a fresh process, on one thread. The numbers docs/install.md quotes.

    OMP_NUM_THREADS=1 python benchmarks/gguf_load.py                     # smollm2 and gemma3 (if its wheels are in)
    python benchmarks/gguf_load.py --scorers smollm2 --out /tmp/gguf_load
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOAD = ("import time; t = time.perf_counter(); from textdiffusion.models.quality import Scorer; "
        "Scorer.load({name!r}); print(time.perf_counter() - t)")


def timed_load(name: str, cache: Path) -> float:
    """Seconds to import the scorer code and load ``name``, in a fresh process using ``cache``."""
    env = {**os.environ, "TEXTDIFFUSION_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", LOAD.format(name=name)], env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"gguf_load.py: loading {name!r} failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scorers", nargs="+", default=["smollm2", "gemma3"])
    ap.add_argument("--out", default="benchmarks/results/gguf_load")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.scorers:
            cache = Path(tmp) / name
            first = timed_load(name, cache)
            again = timed_load(name, cache)
            rows.append({"scorer": name, "first_load_s": round(first, 1), "cached_load_s": round(again, 1)})
            print(f"{name}: first load {first:.1f} s, from the converted copy {again:.1f} s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python benchmarks/gguf_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, one thread", "date": time.strftime("%Y-%m-%d")}
    (out / "results.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    md = ["# GGUF scorer loads", "", f"Command: `{meta['command'].strip()}`  ", f"Machine: {meta['machine']}; {meta['date']}", "",
          "Each load is a fresh process (imports included) with one thread; the first converts into an empty cache.", "",
          "| scorer | first load (s) | from the converted copy (s) |", "| --- | --- | --- |"]
    md += [f"| {r['scorer']} | {r['first_load_s']} | {r['cached_load_s']} |" for r in rows]
    (out / "README.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
