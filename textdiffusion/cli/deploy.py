"""`textdiffusion deploy`: put training on a remote (GPU) machine over SSH, with the plain ssh and rsync.

    textdiffusion deploy gpu-box --torch-index https://download.pytorch.org/whl/cu128   # copy + venv + install
    textdiffusion deploy run gpu-box -- --config recipes/wiki-small.yaml               # train in the background
    textdiffusion deploy status gpu-box          # runs, alive or finished, last log line
    textdiffusion deploy logs gpu-box --follow   # the newest run's log (until it ends)
    textdiffusion deploy fetch gpu-box RUN       # bring runs/RUN back, log included
    textdiffusion deploy stop gpu-box [RUN]      # stop one run, or every run still going

Why no Ansible/Fabric: ssh and rsync are on every such machine, and every step here is one of their
commands, so a user can replay any of them by hand. The remote layout, under ``--remote-dir``
(default ``~/textdiffusion``): the project's files as git sees them (tracked, or new and not ignored), ``.venv/``, ``runs/NAME/`` (the
training's ``--output-dir``) and ``logs/NAME.{log,pid,cmd}``. Deploying again updates the files and
reinstalls only when pyproject.toml or the torch you name changed.
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from textdiffusion.errors import UsageError, one_line_parser

VERBS = ("push", "run", "status", "logs", "fetch", "stop")
PROJECT = Path(__file__).resolve().parents[2]
STAMP = ".venv/.textdiffusion-deployed"  # what the venv was last installed from (pyproject + torch choice)
UNREACHABLE = 255  # ssh's own exit status when it could not connect or authenticate
# Is a pid alive? kill -0 alone says yes to a zombie, which an init that does not reap leaves behind.
ALIVE = """alive() { kill -0 "$1" 2>/dev/null || return 1; [ -r /proc/$1/stat ] || return 0; ! grep -q '^[0-9]* (.*) Z' /proc/$1/stat; }
"""


@dataclass
class Remote:
    """One SSH host and the folder the project lives in there; builds the ssh/rsync command lines."""

    host: str
    port: int | None = None
    identity: str | None = None
    options: list[str] = field(default_factory=list)
    remote_dir: str = "~/textdiffusion"

    def ssh_argv(self) -> list[str]:
        argv = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=15"]
        if self.port:
            argv += ["-p", str(self.port)]
        if self.identity:
            argv += ["-i", self.identity]
        for opt in self.options:
            argv += ["-o", opt]
        return argv

    @property
    def shell_dir(self) -> str:
        """The remote folder as a shell word: ``~/x`` becomes ``"$HOME"/x`` so the tilde still expands."""
        d = self.remote_dir
        if d.startswith("/"):
            return shlex.quote(d)
        return '"$HOME"/' + shlex.quote(d[2:] if d.startswith("~/") else d)

    @property
    def rsync_dir(self) -> str:
        """The remote folder for rsync: relative paths are relative to the login's home there."""
        d = self.remote_dir
        return d if d.startswith("/") else (d[2:] if d.startswith("~/") else d)

    def sh(self, script: str, *, check: bool = True, capture: bool = True, what: str = "") -> subprocess.CompletedProcess:
        """Run a POSIX-shell script on the host (whatever its login shell); failures become one-line errors."""
        argv = [*self.ssh_argv(), self.host, "sh -c " + shlex.quote(script)]
        try:
            r = subprocess.run(argv, capture_output=capture, text=True, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise UsageError("`ssh` is not installed on this machine (Debian: apt-get install openssh-client).") from None
        if r.returncode == UNREACHABLE:
            raise UsageError(f"HOST {self.host!r}: cannot connect over ssh ({_last_line(r.stderr) or 'exit 255'}).")
        if check and r.returncode:
            detail = _last_line((r.stderr or "") + "\n" + (r.stdout or "")) if capture else f"exit {r.returncode}"
            raise UsageError(f"HOST {self.host!r}: {what or 'remote command'} failed: {detail}")
        return r

    def rsync(self, *args: str, what: str, stdin: str | None = None) -> None:
        ssh = shlex.join(self.ssh_argv())
        argv = ["rsync", "-a", "-e", ssh, *args]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, input=stdin)
        except FileNotFoundError:
            raise UsageError("`rsync` is not installed on this machine (Debian: apt-get install rsync).") from None
        if r.returncode:
            raise UsageError(f"HOST {self.host!r}: rsync ({what}) failed: {_last_line(r.stderr) or f'exit {r.returncode}'}")


def _last_line(text: str | None) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def project_files(root: Path = PROJECT, include: list[str] = ()) -> list[str]:
    """The files a deploy copies: git's view of the checkout — tracked files and new files that are not
    ignored (so .venv, runs and caches stay home) — plus any --include (e.g. ignored data)."""
    if not (root / ".git").exists():
        raise UsageError(f"deploy copies a git checkout of the project, and {root} is not one; run it from your clone.")
    git = ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    out = subprocess.run(git, capture_output=True, text=True, check=True).stdout
    files = [f for f in out.split("\0") if f and (root / f).is_file()]
    for extra in include:
        path = (root / extra).resolve()
        if not path.exists() or root not in (path, *path.parents):
            raise UsageError(f"--include {extra!r}: not a file or folder inside the project ({root}).")
        found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        files += [str(p.relative_to(root)) for p in found]
    return sorted(set(files))


def _stamp(torch_spec: str, torch_index: str | None, system_site: bool) -> str:
    """What the remote venv was installed from: changes when pyproject.toml or the torch choice does."""
    h = hashlib.sha256((PROJECT / "pyproject.toml").read_bytes())
    h.update(f"\n{torch_spec}\n{torch_index}\n{system_site}".encode())
    return h.hexdigest()


# -- the verbs ---------------------------------------------------------------------------------------
def push(remote: Remote, a: argparse.Namespace) -> None:
    """Copy the project, create the venv with the named torch, install the project (again only if needed)."""
    py = shlex.quote(a.python)
    probe = remote.sh(f"command -v {py} >/dev/null 2>&1 || exit 3; {py} -c 'import sys; print(sys.version_info >= (3, 10))'",
                      check=False, what="probe")
    if probe.returncode == 3:
        raise UsageError(f"HOST {remote.host!r} has no {a.python!r} on its PATH (install Python >= 3.10 there, or name it with --python).")
    if probe.returncode or probe.stdout.strip() != "True":
        raise UsageError(f"HOST {remote.host!r}: {a.python!r} is not a working Python >= 3.10 "
                         f"({_last_line(probe.stderr) or probe.stdout.strip()}).")

    files = project_files(include=a.include)
    remote.sh(f"mkdir -p {remote.shell_dir}", what="mkdir")
    remote.rsync("--from0", "--files-from=-", "--checksum", f"{PROJECT}/", f"{remote.host}:{remote.rsync_dir}/",
                 what="copy the project", stdin="\0".join(files))
    print(f"copied {len(files)} files to {remote.host}:{remote.remote_dir}", flush=True)

    stamp = _stamp(a.torch_spec, a.torch_index, a.system_site_packages)
    index = f" --index-url {shlex.quote(a.torch_index)}" if a.torch_index else ""
    venv_flags = " --system-site-packages" if a.system_site_packages else ""
    # --no-compile: no byte-compiling of every module of torch and transformers at install (half the install time);
    # the first run compiles only what it imports
    pip = ".venv/bin/python -m pip install --quiet --disable-pip-version-check --no-compile"
    script = f"""set -e
cd {remote.shell_dir}
if [ -f {STAMP} ] && [ "$(cat {STAMP})" = {stamp} ]; then echo "venv: up to date"; exit 0; fi
[ -x .venv/bin/python ] || {py} -m venv{venv_flags} .venv
{pip} {shlex.quote(a.torch_spec)}{index}
{pip} -e .
echo {stamp} > {STAMP}
echo "venv: installed"
"""
    print(f"installing on {remote.host}: {a.torch_spec}{' from ' + a.torch_index if a.torch_index else ''}, then the project ...", flush=True)
    r = remote.sh(script, what="creating the venv")
    print(r.stdout.strip())
    info = remote.sh(f"cd {remote.shell_dir} && .venv/bin/python -c "
                     + shlex.quote("import torch; print(f'torch {torch.__version__}, {torch.cuda.device_count()} CUDA device(s)')"),
                     what="checking torch")
    print(f"{remote.host}: {info.stdout.strip()}; start training with: textdiffusion deploy run {remote.host} -- --preset tiny ...")


def _run_name(a: argparse.Namespace) -> str:
    name = a.name or time.strftime("run-%Y%m%d-%H%M%S")
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum() or name.startswith("."):
        raise UsageError(f"--name {name!r}: use letters, digits, '-', '_' and '.' only.")
    return name


def run(remote: Remote, a: argparse.Namespace) -> None:
    """Start `textdiffusion train` in the background (nohup, its own session) with its log in logs/NAME.log."""
    train = a.train_args
    if not train:
        raise UsageError("run: give the training flags after `--`, e.g. `deploy run HOST -- --config recipes/wiki-small.yaml`.")
    if any(t == "--output-dir" or t.startswith("--output-dir=") or t == "--output_dir" for t in train):
        raise UsageError("run: --output-dir is chosen by deploy (runs/NAME on the host); name the run with --name instead.")
    name = _run_name(a)
    torchrun = ["torch.distributed.run", f"--nproc_per_node={a.nproc}", "-m"] if a.nproc > 1 else []
    cmd = [".venv/bin/python", "-m", *torchrun, "textdiffusion", "train", *train, "--output-dir", f"runs/{name}"]
    env = " ".join(shlex.quote(e) for e in a.env)
    for e in a.env:
        if "=" not in e or not e.split("=", 1)[0].isidentifier():
            raise UsageError(f"--env {e!r}: expected NAME=VALUE.")
    script = f"""cd {remote.shell_dir} || exit 4
[ -x .venv/bin/python ] || exit 5
[ -e logs/{name}.pid ] && exit 6
mkdir -p logs runs
echo {shlex.quote(shlex.join(cmd))} > logs/{name}.cmd
{('env ' + env + ' ') if env else ''}nohup setsid {shlex.join(cmd)} > logs/{name}.log 2>&1 < /dev/null &
echo $! > logs/{name}.pid
echo $!
"""
    r = remote.sh(script, check=False, what="starting the run")
    if r.returncode in (4, 5):
        raise UsageError(f"HOST {remote.host!r} has no deployed project in {remote.remote_dir}; run `textdiffusion deploy {remote.host}` first.")
    if r.returncode == 6:
        raise UsageError(f"--name {name!r}: a run of that name was already started on {remote.host}; pick another name.")
    if r.returncode:
        raise UsageError(f"HOST {remote.host!r}: starting the run failed: {_last_line(r.stderr)}")
    print(f"started {name} on {remote.host} (pid {r.stdout.strip()}): {shlex.join(cmd)}")
    print(f"follow it: textdiffusion deploy logs {remote.host} {name} --follow; bring it back: textdiffusion deploy fetch {remote.host} {name}")


# One line per run: NAME, running|finished, last non-empty line of its log (progress bars use \r, so take the last piece).
_STATUS = ALIVE + r"""cd @DIR@ 2>/dev/null || exit 4
for pid_file in $(ls -t logs/*.pid 2>/dev/null); do
  name=$(basename "$pid_file" .pid); pid=$(cat "$pid_file")
  if alive "$pid"; then state=running; else state=finished; fi
  last=$(tail -c 2000 "logs/$name.log" 2>/dev/null | tr '\r' '\n' | grep -v '^[[:space:]]*$' | tail -n 1 | cut -c1-150)
  printf '%s\t%s\t%s\n' "$name" "$state" "$last"
done
"""


def _runs(remote: Remote) -> list[tuple[str, str, str]]:
    r = remote.sh(_STATUS.replace("@DIR@", remote.shell_dir), check=False, what="status")
    if r.returncode == 4:
        raise UsageError(f"HOST {remote.host!r} has no deployed project in {remote.remote_dir}; run `textdiffusion deploy {remote.host}` first.")
    return [tuple((line.split("\t") + ["", ""])[:3]) for line in r.stdout.splitlines() if line.strip()]


def _pick(remote: Remote, run_name: str | None) -> str:
    runs = _runs(remote)
    if run_name:
        if run_name not in {r[0] for r in runs}:
            raise UsageError(f"RUN {run_name!r}: no such run on {remote.host} (runs: {', '.join(r[0] for r in runs) or 'none'}).")
        return run_name
    if not runs:
        raise UsageError(f"HOST {remote.host!r}: no runs yet; start one with `textdiffusion deploy run {remote.host} -- ...`.")
    return runs[0][0]  # the newest


def status(remote: Remote, a: argparse.Namespace) -> None:
    runs = _runs(remote)
    if not runs:
        print(f"{remote.host}: no runs in {remote.remote_dir}")
    for name, state, last in runs:
        print(f"{name:<24} {state:<9} {last}")


def logs(remote: Remote, a: argparse.Namespace) -> None:
    name = _pick(remote, a.run)
    q = shlex.quote(name)
    if a.follow:  # tail ends by itself when the run's process does
        script = f"cd {remote.shell_dir} && exec tail -n {a.lines} --pid=$(cat logs/{q}.pid) -f logs/{q}.log"
        remote.sh(script, capture=False, what="logs")
    else:
        print(remote.sh(f"cd {remote.shell_dir} && tail -n {a.lines} logs/{q}.log", what="logs").stdout, end="")


def fetch(remote: Remote, a: argparse.Namespace) -> None:
    """rsync runs/RUN back into --dest/RUN, with its log and launch command beside the checkpoints."""
    name = _pick(remote, a.run)
    dest = Path(a.dest) / name
    dest.mkdir(parents=True, exist_ok=True)
    src = f"{remote.host}:{remote.rsync_dir}/"
    remote.rsync(f"{src}runs/{name}/", f"{dest}/", what="fetch the run")
    remote.rsync(f"{src}logs/{name}.log", f"{dest}/train.log", what="fetch the log")
    remote.rsync(f"{src}logs/{name}.cmd", f"{dest}/train.cmd", what="fetch the command")
    state = dict((r[0], r[1]) for r in _runs(remote))[name]
    print(f"fetched {name} ({state}) into {dest}/" + ("  (still running: fetch again later for the final model)" if state == "running" else ""))


def stop(remote: Remote, a: argparse.Namespace) -> None:
    """SIGTERM the run's process group (its own session, so torchrun's workers too), SIGKILL after 30 s."""
    runs = _runs(remote)
    names = [a.run] if a.run else [n for n, state, _ in runs if state == "running"]
    if a.run and a.run not in {r[0] for r in runs}:
        raise UsageError(f"RUN {a.run!r}: no such run on {remote.host}.")
    if not names:
        print(f"{remote.host}: nothing running")
        return
    for name in names:
        q = shlex.quote(name)
        script = ALIVE + f"""cd {remote.shell_dir} || exit 4
pid=$(cat logs/{q}.pid)
alive "$pid" || {{ echo "not running"; exit 0; }}
kill -TERM -- -"$pid" 2>/dev/null || kill -TERM "$pid"
for i in $(seq 60); do alive "$pid" || {{ echo stopped; exit 0; }}; sleep 0.5; done
kill -KILL -- -"$pid" 2>/dev/null || kill -KILL "$pid"; echo killed
"""
        print(f"{name}: {remote.sh(script, what='stop').stdout.strip()}")


# -- the command line --------------------------------------------------------------------------------
HELP = {
    "push": "copy the project to HOST and install it in a venv (the default: `deploy HOST`)",
    "run": "start training on HOST in the background: run HOST [flags] -- TRAIN FLAGS",
    "status": "list the runs on HOST, running or finished, with their last log line",
    "logs": "print a run's log (the newest run by default)",
    "fetch": "rsync runs/RUN from HOST into --dest/RUN",
    "stop": "stop RUN, or every run still going on HOST",
}


def _parser(verb: str) -> argparse.ArgumentParser:
    """One parser per verb, parsed intermixed, so `fetch HOST --dest d RUN` and `fetch HOST RUN --dest d` agree."""
    p = one_line_parser(prog=f"textdiffusion deploy {verb}", description=HELP[verb])
    p.add_argument("host", metavar="HOST", help="[user@]host, or an alias from ~/.ssh/config.")
    p.add_argument("-p", "--port", type=int, default=None, help="SSH port.")
    p.add_argument("-i", "--identity", default=None, help="SSH private key file.")
    p.add_argument("-o", "--ssh-option", dest="ssh_options", action="append", default=[],
                   help="Extra `ssh -o` option, e.g. -o UserKnownHostsFile=... (repeatable).")
    p.add_argument("--remote-dir", default="~/textdiffusion", help="Where the project lives on HOST.")
    if verb == "push":
        p.add_argument("--torch-spec", default="torch==2.13.0", help="The torch requirement to install on HOST.")
        p.add_argument("--torch-index", default=None,
                       help="Package index for torch, e.g. https://download.pytorch.org/whl/cu128 for CUDA 12.8 wheels.")
        p.add_argument("--python", default="python3", help="Python (>= 3.10) on HOST that creates the venv.")
        p.add_argument("--system-site-packages", action="store_true",
                       help="Let the venv see HOST's system packages (a preinstalled torch).")
        p.add_argument("--include", action="append", default=[],
                       help="Also copy this ignored file or folder of the project (your data; repeatable).")
    elif verb == "run":
        p.usage = "textdiffusion deploy run HOST [flags] -- TRAIN FLAGS"
        p.add_argument("--name", default=None, help="Run name: runs/NAME and logs/NAME.log on HOST (default run-DATE-TIME).")
        p.add_argument("--nproc", type=int, default=1, help="Processes (GPUs) per node; > 1 launches through torchrun.")
        p.add_argument("--env", action="append", default=[], help="NAME=VALUE for the training's environment (repeatable).")
    elif verb in ("logs", "fetch", "stop"):
        p.add_argument("run", nargs="?", metavar="RUN", help="default: " + ("every running run" if verb == "stop" else "the newest run"))
    if verb == "logs":
        p.add_argument("-f", "--follow", action="store_true", help="Keep printing until the run ends.")
        p.add_argument("-n", "--lines", type=int, default=40, help="How many lines from the end.")
    if verb == "fetch":
        p.add_argument("--dest", default="runs", help="Local folder the run folder is copied into.")
    return p


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: textdiffusion deploy [VERB] HOST [flags]   (textdiffusion deploy VERB --help)\n")
        for verb, what in HELP.items():
            print(f"  {verb:<7} {what}")
        return 0 if argv else 2
    verb, rest = (argv[0], argv[1:]) if argv[0] in VERBS else ("push", argv)  # `deploy HOST` is the push
    train_args = rest[rest.index("--") + 1:] if "--" in rest else []  # run: everything after `--` is train's
    a = _parser(verb).parse_intermixed_args(rest[:rest.index("--")] if "--" in rest else rest)
    a.verb, a.train_args = verb, train_args
    if a.port is not None and not 0 < a.port < 65536:
        raise UsageError(f"--port {a.port}: not a TCP port.")
    if a.identity and not Path(a.identity).is_file():
        raise UsageError(f"--identity {a.identity!r}: no such file.")
    if getattr(a, "nproc", 1) < 1:
        raise UsageError(f"--nproc {a.nproc}: must be >= 1.")
    if getattr(a, "lines", 1) < 1:
        raise UsageError(f"--lines {a.lines}: must be >= 1.")
    remote = Remote(a.host, a.port, a.identity, a.ssh_options, a.remote_dir)
    {"push": push, "run": run, "status": status, "logs": logs, "fetch": fetch, "stop": stop}[a.verb](remote, a)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
