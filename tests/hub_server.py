"""A real Hugging Face Hub endpoint on loopback for tests: ``olah`` serving local git repositories.

``olah`` (PyPI) is a Hub mirror. With ``offline = true`` and a ``mirrors-path`` it answers the Hub's HTTP API
(``/api/models/...``, ``/<repo>/resolve/<rev>/<file>``) from plain git repositories laid out as
``<mirrors>/models/<org>/<name>`` and never contacts huggingface.co. It is read-only, so pushing is tested with
:class:`LocalGitHubApi`, an ``HfApi`` stand-in whose ``create_repo`` / ``upload_folder`` make a git repository and a
commit on branch ``main`` in that layout; everything after the upload request (listing, resolving, downloading,
caching, remote code) then goes through huggingface_hub and transformers over real HTTP.

olah lives in its own virtual environment (``.venv-olah`` at the repository root, or ``$PIH2T_OLAH_VENV``) because
its pins clash with the project's. Tests skip when it is absent.

huggingface_hub reads ``HF_ENDPOINT`` at import time, so clients run in subprocesses
(:func:`run_hub_python`) with the environment from :func:`hub_client_env`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
OLAH_VENV = Path(os.environ.get("PIH2T_OLAH_VENV", REPO_ROOT / ".venv-olah"))
OLAH_CLI = OLAH_VENV / "bin" / "olah-cli"
LOOPBACK = "127.0.0.1"

_GIT_ENV = {
    "GIT_AUTHOR_NAME": "pih2t-tests",
    "GIT_AUTHOR_EMAIL": "tests@localhost",
    "GIT_COMMITTER_NAME": "pih2t-tests",
    "GIT_COMMITTER_EMAIL": "tests@localhost",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def olah_unavailable_reason() -> str | None:
    """``None`` when olah and git can be used, else why not (for ``pytest.skip``)."""
    if not OLAH_CLI.is_file():
        return (
            f"olah is not installed at {OLAH_CLI}; create it with "
            f"`python3 -m venv {OLAH_VENV} && {OLAH_VENV}/bin/pip install olah`"
        )
    if shutil.which("git") is None:
        return "git is not on PATH (olah serves git repositories)"
    return None


def free_port() -> int:
    """A TCP port that is free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@dataclass
class OlahServer:
    """A running olah process and where its repositories live."""

    endpoint: str
    port: int
    mirrors: Path
    workdir: Path
    process: subprocess.Popen = field(repr=False)
    log_path: Path = field(repr=False)

    def repo_dir(self, repo_id: str, repo_type: str = "model") -> Path:
        return self.mirrors / f"{repo_type}s" / repo_id

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _write_config(workdir: Path, port: int, mirrors: Path) -> Path:
    cfg = workdir / "olah.toml"
    cfg.write_text(
        "[basic]\n"
        f'host = "{LOOPBACK}"\n'
        f"port = {port}\n"
        f'repos-path = "{workdir / "cache"}"\n'
        f'mirrors-path = ["{mirrors}"]\n'
        # Repos change between requests in the push tests: never reuse resolved branch -> sha answers.
        "metadata-cache-ttl = 0\n"
        "[accessibility]\n"
        "offline = true\n"
    )
    return cfg


def _wait_until_serving(server: OlahServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never route loopback via a proxy
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"olah exited with code {server.process.returncode}:\n{server.log_tail()}")
        try:
            opener.open(f"{server.endpoint}/api/models/pih2t-probe/none/revision/main", timeout=2)
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer (404/401) means the server is up
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise TimeoutError(f"olah did not answer on {server.endpoint} within {timeout:.0f} s:\n{server.log_tail()}")


def start_olah(workdir: str | os.PathLike[str], *, timeout: float = 45.0) -> OlahServer:
    """Start olah on 127.0.0.1 (a free port) serving git repos under ``workdir/mirrors``; wait until it answers."""
    reason = olah_unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    workdir = Path(workdir)
    mirrors = workdir / "mirrors"
    (mirrors / "models").mkdir(parents=True, exist_ok=True)
    (workdir / "cache").mkdir(exist_ok=True)
    last_error: Exception | None = None
    for _ in range(3):  # the port could be taken between free_port() and olah's bind
        port = free_port()
        cfg = _write_config(workdir, port, mirrors)
        log_path = workdir / f"olah-{port}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [str(OLAH_CLI), "--config", str(cfg), "--log-path", str(workdir / "logs")],
                cwd=workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "NO_PROXY": "*", "no_proxy": "*"},
            )
        server = OlahServer(f"http://{LOOPBACK}:{port}", port, mirrors, workdir, proc, log_path)
        try:
            _wait_until_serving(server, timeout)
            return server
        except (RuntimeError, TimeoutError) as err:
            last_error = err
            stop_olah(server)
    raise RuntimeError(f"could not start olah: {last_error}")


def stop_olah(server: OlahServer, timeout: float = 10.0) -> None:
    """Stop the olah process we started (by its pid): SIGTERM, then SIGKILL if it does not exit."""
    proc = server.process
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def _git(repo: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", *args], cwd=repo, env={**os.environ, **_GIT_ENV}, check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


class LocalGitHubApi:
    """The two ``HfApi`` methods :func:`pih2t_hub.hub.push_to_hub` uses, writing into olah's mirror folder.

    ``calls`` records every request, so tests can assert that a refused push sent none.
    """

    def __init__(self, server: OlahServer) -> None:
        self.server = server
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def create_repo(self, repo_id: str, *, token: str | None = None, private: bool | None = None,
                    repo_type: str | None = None, exist_ok: bool = False, **kwargs: Any) -> SimpleNamespace:
        self.calls.append(("create_repo", {"repo_id": repo_id, "exist_ok": exist_ok, "private": private}))
        if (repo_type or "model") != "model":
            raise ValueError(f"LocalGitHubApi serves model repos only, got repo_type={repo_type!r}")
        path = self.server.repo_dir(repo_id)
        if path.exists():
            if not exist_ok:
                raise FileExistsError(f"repository {repo_id} already exists")
        else:
            path.mkdir(parents=True)
            _git(path, "init", "-q", "-b", "main")
        return SimpleNamespace(repo_id=repo_id, url=f"{self.server.endpoint}/{repo_id}")

    def upload_folder(self, *, repo_id: str, folder_path: str | os.PathLike[str], path_in_repo: str | None = None,
                      commit_message: str | None = None, repo_type: str | None = None,
                      revision: str | None = None, token: str | None = None, **kwargs: Any) -> SimpleNamespace:
        self.calls.append(("upload_folder", {"repo_id": repo_id, "folder_path": str(folder_path)}))
        if revision not in (None, "main"):
            raise ValueError(f"LocalGitHubApi commits to main only, got revision={revision!r}")
        repo = self.server.repo_dir(repo_id)
        if not (repo / ".git").is_dir():
            raise FileNotFoundError(f"repository {repo_id} does not exist (call create_repo first)")
        dest = repo / path_in_repo if path_in_repo else repo
        shutil.copytree(folder_path, dest, dirs_exist_ok=True)
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", "--allow-empty", "-m", commit_message or "upload")
        sha = _git(repo, "rev-parse", "HEAD")
        return SimpleNamespace(oid=sha, commit_url=f"{self.server.endpoint}/{repo_id}/commit/{sha}")


#: ``sitecustomize`` of every client process: peft is made unimportable. olah answers a file that a repository lacks
#: with 401, where the Hub answers 404; transformers, when peft is importable, asks every repository for
#: ``adapter_config.json`` and takes that 401 for a missing repository. Clients load without peft, as a user of an
#: exported model may (the saved models need no peft).
_CLIENT_SITE = "import sys\nsys.modules.setdefault('peft', None)\n"


def hub_client_env(server: OlahServer, hf_home: str | os.PathLike[str]) -> dict[str, str]:
    """Environment of a client process that talks to ``server`` as its Hub, with an empty cache (and no peft)."""
    site = Path(hf_home).parent / "_hub_client_site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(_CLIENT_SITE)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH", "")) if p),
        HF_ENDPOINT=server.endpoint,
        HF_HOME=str(hf_home),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_IMPLICIT_TOKEN="1",
        HF_HUB_DISABLE_XET="1",
        HF_DATASETS_OFFLINE="1",
        NO_PROXY="*",
        no_proxy="*",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    return env


#: Prepended to client code that must prove it needs no pih2t_hub: any ``import pih2t_hub`` then fails.
BLOCK_PIH2T = (
    "import sys\n"
    "sys.modules['pih2t_hub'] = None\n"
    "try:\n"
    "    import pih2t_hub\n"
    "except ImportError:\n"
    "    pass\n"
    "else:\n"
    "    raise SystemExit('pih2t_hub is importable but must not be')\n"
)


def run_hub_python(code: str, env: dict[str, str], *, cwd: str | os.PathLike[str], block_pih2t: bool = False,
                   timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with ``env``; raise with its output when it fails."""
    src = (BLOCK_PIH2T if block_pih2t else "") + code
    proc = subprocess.run([sys.executable, "-c", src], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"client process failed (rc={proc.returncode})\n--- stdout ---\n{proc.stdout[-4000:]}"
            f"\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc
