"""`textdiffusion deploy` end to end against a real OpenSSH server on 127.0.0.1.

The test starts its own sshd (Debian's openssh-server) on a free loopback port with a host key and a
client key it generates in a tmp folder, so the machine's own sshd and keys are never touched. The
remote project folder is a tmp folder too. Remote processes are children of that sshd, which is a child
of this test, so they inherit its CPU pinning (run the tests under `taskset -c 1`).
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from textdiffusion.cli.deploy import PROJECT, Remote, project_files
from textdiffusion.cli.main import main

SSHD = "/usr/sbin/sshd"
MICRO = ["--preset", "micro", "--max-length", "64", "--batch-size", "8",
         "--eval-blocks", "8", "--logging-steps", "2"]
ENV = ["--env", "OMP_NUM_THREADS=1", "--env", "HF_HUB_OFFLINE=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _missing_tools() -> str | None:
    missing = [t for t in (SSHD, "ssh", "ssh-keygen", "rsync") if not shutil.which(t)]
    if missing:
        why = f"needs {', '.join(missing)} (apt-get install -y openssh-server rsync; .ci/run installs them)"
        if os.environ.get("CI"):
            pytest.fail(why)  # CI installs them: a missing tool there is a broken CI, not a skip
        return why
    return None


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A throwaway sshd on 127.0.0.1 that accepts one key generated here; yields the ssh flags for it."""
    if why := _missing_tools():
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("sshd")
    tmp.chmod(0o700)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "host_key")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "client_key")], check=True)
    (tmp / "authorized_keys").write_text((tmp / "client_key.pub").read_text())
    (tmp / "authorized_keys").chmod(0o600)
    port = _free_port()
    (tmp / "sshd_config").write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {tmp}/host_key
PidFile {tmp}/sshd.pid
AuthorizedKeysFile {tmp}/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
""")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder (normally made by its service)
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(tmp / "sshd_config")], stderr=open(tmp / "sshd.log", "w"))
    flags = ["-p", str(port), "-i", str(tmp / "client_key"), "-o", f"UserKnownHostsFile={tmp}/known_hosts",
             "-o", "StrictHostKeyChecking=accept-new"]
    host = f"{getpass.getuser()}@127.0.0.1"
    for _ in range(100):  # until it accepts a login
        if subprocess.run(["ssh", "-o", "BatchMode=yes", *flags, host, "true"], capture_output=True).returncode == 0:
            break
        assert proc.poll() is None, (tmp / "sshd.log").read_text()
        time.sleep(0.1)
    else:
        pytest.fail("sshd did not accept the test key: " + (tmp / "sshd.log").read_text()[-2000:])
    yield host, flags, tmp
    proc.terminate()
    proc.wait(timeout=10)


def deploy(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main(["deploy", *argv])
    out = capsys.readouterr()
    return status, out.out, out.err


# -- without a server ---------------------------------------------------------------------------------
def test_project_files_are_the_tracked_files_without_venv_or_runs():
    files = project_files()
    assert "pyproject.toml" in files and "textdiffusion/cli/deploy.py" in files
    assert not [f for f in files if f.startswith((".venv/", "runs/", ".git/")) or "__pycache__" in f]


def test_remote_dir_keeps_the_tilde_expandable_and_quotes_the_rest():
    assert Remote("h", remote_dir="~/my dir").shell_dir == "\"$HOME\"/'my dir'"
    assert Remote("h", remote_dir="~/td").rsync_dir == "td"
    assert Remote("h", remote_dir="/srv/td").shell_dir == "/srv/td"


def test_unreachable_host_is_one_line_and_exit_2(capsys):
    status, _, err = deploy(capsys, "127.0.0.1", "-p", str(_free_port()), "-o", "StrictHostKeyChecking=no")
    assert status == 2
    assert err.count("\n") == 1 and "cannot connect over ssh" in err and "127.0.0.1" in err


@pytest.mark.parametrize("argv, needle", [
    (["run", "h", "--", "--preset", "micro", "--output-dir", "x"], "--output-dir is chosen by deploy"),
    (["run", "h"], "give the training flags after `--`"),
    (["run", "h", "--name", "a/b", "--", "--preset", "micro"], "--name 'a/b'"),
    (["h", "-p", "70000"], "--port 70000"),
    (["status", "h", "-i", "/nonexistent/key"], "--identity '/nonexistent/key'"),
])
def test_bad_flags_name_the_argument(capsys, argv, needle):
    status, _, err = deploy(capsys, *argv)
    assert status == 2 and needle in err


# -- against the local sshd ---------------------------------------------------------------------------
def test_host_without_that_python_is_one_line_and_exit_2(sshd, capsys, tmp_path):
    host, flags, _ = sshd
    status, _, err = deploy(capsys, host, *flags, "--remote-dir", str(tmp_path / "td"), "--python", "python3-missing-here")
    assert status == 2 and err.count("\n") == 1 and "no 'python3-missing-here' on its PATH" in err
    assert not (tmp_path / "td").exists()  # refused before anything was copied


@pytest.mark.slow
def test_deploy_run_fetch_generate_end_to_end(sshd, capfd, tmp_path, small_jsonl):
    """deploy twice (the second only updates), train a micro model remotely, fetch it, generate locally.

    The data is a 300-document file from conftest; the loopback host sees the same filesystem, so its
    absolute path works there (on a real host: `--include` it, or a bundled corpus / hub dataset)."""
    host, flags, _ = sshd
    remote_dir = tmp_path / "remote" / "textdiffusion"
    where = [*flags, "--remote-dir", str(remote_dir)]

    status, out, err = deploy(capfd, host, *where)
    assert status == 0, err
    assert "venv: installed" in out and "torch 2." in out
    copied = sorted(str(p.relative_to(remote_dir)) for p in remote_dir.rglob("*")
                    if p.is_file() and not str(p.relative_to(remote_dir)).startswith((".venv", "textdiffusion.egg-info"))
                    and "__pycache__" not in p.parts)
    assert copied == project_files()  # exactly the tracked files: no .venv, runs or caches of this checkout
    (remote_dir / "README.md").write_text("stale")  # a second deploy repairs a changed file ...
    status, out, err = deploy(capfd, host, *where)
    assert status == 0, err
    assert "venv: up to date" in out  # ... and does not reinstall
    assert (remote_dir / "README.md").read_bytes() == (PROJECT / "README.md").read_bytes()
    assert not (remote_dir / "textdiffusion" / "textdiffusion").exists() and not (remote_dir / ".venv" / ".venv").exists()

    status, out, err = deploy(capfd, "run", host, *where, "--name", "micro", *ENV, "--", *MICRO, "--dataset", str(small_jsonl),
                              "--max-steps", "6", "--eval-steps", "3")
    assert status == 0, err
    assert "started micro" in out
    status, _, err = deploy(capfd, "run", host, *where, "--name", "micro", "--", *MICRO)
    assert status == 2 and "--name 'micro'" in err  # a second run of the same name is refused

    status, out, _ = deploy(capfd, "logs", host, *where, "micro", "--follow", "-n", "400")  # returns when it ends
    assert status == 0 and "done: model" in out
    status, out, err = deploy(capfd, "status", host, *where)
    assert status == 0 and "micro" in out and "finished" in out, err
    status, out, _ = deploy(capfd, "logs", host, *where, "--follow", "-n", "5")  # the newest run; it has ended,
    assert status == 0 and "done: model" in out  # so --follow prints its tail and returns

    local = tmp_path / "fetched"
    status, out, err = deploy(capfd, "fetch", host, *where, "--dest", str(local), "micro")
    assert status == 0, err
    run = local / "micro"
    assert (run / "model.safetensors").exists() and (run / "diffusion_config.json").exists()
    assert (run / "checkpoint-6").is_dir() and "done: model" in (run / "train.log").read_text()

    capfd.readouterr()
    assert main(["generate", "--checkpoint", str(run), "--prefix", "It was", "--max-length", "24", "--steps", "4",
                 "--hide-steps", "--seed", "0"]) == 0
    text = capfd.readouterr().out
    assert "It was" in text


@pytest.mark.slow
def test_stop_ends_a_running_training(sshd, capsys, tmp_path):
    """Process handling only: the remote .venv/bin/python here is a script that prints and sleeps."""
    host, flags, _ = sshd
    where = [*flags, "--remote-dir", str(tmp_path / "td")]
    (tmp_path / "td" / ".venv" / "bin").mkdir(parents=True)
    fake = tmp_path / "td" / ".venv" / "bin" / "python"
    fake.write_text('#!/bin/sh\necho "training with $* (SEED_HINT=$SEED_HINT)"; exec sleep 600\n')
    fake.chmod(0o755)
    status, out, err = deploy(capsys, "run", host, *where, "--name", "long", "--nproc", "2", "--env", "SEED_HINT=7",
                              "--", "--preset", "micro")
    assert status == 0, err
    launched = (tmp_path / "td" / "logs" / "long.cmd").read_text()
    assert "-m torch.distributed.run --nproc_per_node=2 -m textdiffusion train --preset micro --output-dir runs/long" in launched
    pid = int(out.split("(pid ")[1].split(")")[0])
    status, out, _ = deploy(capsys, "status", host, *where)
    assert "long" in out and "running" in out
    follow = subprocess.Popen([sys.executable, "-m", "textdiffusion", "deploy", "logs", host, *where, "long", "--follow"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=PROJECT)
    time.sleep(3)
    assert follow.poll() is None  # still following a running run
    status, out, err = deploy(capsys, "stop", host, *where)
    assert status == 0 and "long: stopped" in out, err
    followed, _ = follow.communicate(timeout=30)  # ... and returns by itself once the run has ended
    assert follow.returncode == 0 and "training with -m torch.distributed.run" in followed and "SEED_HINT=7" in followed
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or ") Z" in stat.read_text()  # gone, or a zombie nobody reaped: not running
    status, out, _ = deploy(capsys, "status", host, *where)
    assert "finished" in out
    status, out, _ = deploy(capsys, "stop", host, *where)
    assert "nothing running" in out


def test_include_adds_ignored_data_and_nothing_outside_the_project(tmp_path):
    """The file list is git's view (tracked + new, not ignored), plus --include; never a path outside."""
    repo = tmp_path / "clone"
    (repo / "runs").mkdir(parents=True)
    (repo / ".venv").mkdir()
    (repo / "data").mkdir()
    (repo / ".gitignore").write_text(".venv/\n/runs/\n/data/\n")
    (repo / "tracked.py").write_text("x = 1\n")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", ".gitignore", "tracked.py"], check=True)
    (repo / "new.txt").write_text("not yet added\n")
    (repo / "runs" / "model.bin").write_text("big")
    (repo / ".venv" / "python").write_text("")
    (repo / "data" / "mine.txt").write_text("my corpus\n")
    assert project_files(repo) == [".gitignore", "new.txt", "tracked.py"]
    assert project_files(repo, ["data"]) == [".gitignore", "data/mine.txt", "new.txt", "tracked.py"]
    from textdiffusion.errors import UsageError

    (tmp_path / "outside.txt").write_text("exists, but not in the project\n")
    with pytest.raises(UsageError, match="--include '../outside.txt'"):
        project_files(repo, ["../outside.txt"])
