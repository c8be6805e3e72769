"""A private Docker engine for tests: Debian's dockerd started by hand, all state in one temp folder.

No systemd here, no registry: dockerd runs as root with the vfs storage driver and no iptables
rules (compose networks still work: containers reach each other by service name over the
bridge; only NAT to the outside is missing, so image builds use the host's network). The base
image is made locally from ``debootstrap`` of Debian bookworm (python3 3.11) and
``docker import``; its root filesystem tarball is cached between runs on one machine.
See ../shared/notes/deployment.md for what was tried.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from loguru import logger

ROOT = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = ROOT / "scripts" / "ci" / "install_docker.sh"
DOCKER_CLI = "/usr/bin/docker"
"""Debian's CLI, the engine's own version (another ``docker`` on PATH may be a newer CLI only)."""
BASE_PACKAGES = ("python3", "python3-venv")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# Files the base image never needs: apt's downloads and lists, documentation, translations.
TRIMMED = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
           "usr/share/locale", "usr/share/info")  # fmt: skip


def ensure_installed() -> None:
    """Install docker.io and debootstrap (scripts/ci/install_docker.sh) unless both are there."""
    if all(shutil.which(tool) for tool in ("dockerd", "debootstrap")) and Path(DOCKER_CLI).exists():
        return
    subprocess.run(["bash", str(INSTALL_SCRIPT)], check=True, timeout=900)


def run(
    argv: Sequence[str],
    timeout_s: float,
    env: dict[str, str] | None = None,
    check: bool = True,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """Run a command, output captured; on failure the error names the command and its output's end."""
    result = subprocess.run(list(argv), check=False, capture_output=True, text=True, timeout=timeout_s, env=env,
                            cwd=cwd)  # fmt: skip
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}:\n{(result.stdout + result.stderr)[-6000:]}")
    return result


class DockerEngine:
    """One dockerd with its data, exec root and socket under ``folder``; stopped by its pid."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.socket = folder / "docker.sock"
        self.pidfile = folder / "dockerd.pid"
        self.log_path = folder / "dockerd.log"
        self.process: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """The environment for clients of this engine (docker CLI, compose)."""
        return {**os.environ, "DOCKER_HOST": f"unix://{self.socket}"}

    def start(self, timeout_s: float = 120.0) -> None:
        argv = [
            "dockerd", "--data-root", str(self.folder / "data"), "--exec-root", str(self.folder / "exec"),
            "--pidfile", str(self.pidfile), "--host", f"unix://{self.socket}",
            "--storage-driver", "vfs", "--iptables=false", "--ip-masq=false", "--bridge=none",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while run([DOCKER_CLI, "version"], 30, self.env, check=False).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not come up; its log ends:\n{self.log_tail()}")
            time.sleep(0.5)  # polling the daemon's socket until it answers

    def docker(self, *args: str, timeout_s: float = 300.0, check: bool = True) -> subprocess.CompletedProcess:
        return run([DOCKER_CLI, *args], timeout_s, self.env, check=check)

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM dockerd (it stops its containers and containerd), SIGKILL after ``timeout_s``."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("dockerd ignored SIGTERM for {}s: killing its process group", timeout_s)
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
        self._kill_leftovers()
        self._unmount_leftovers()

    def log_tail(self, num_chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:] if self.log_path.exists() else ""

    def _kill_leftovers(self) -> None:
        """Container shims started for this engine outlive a killed dockerd: they name our folder."""
        marker = str(self.folder).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if marker in cmdline:
                logger.warning("killing leftover pid {}: {}", entry.name, cmdline.replace(b"\0", b" ")[:200])
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _unmount_leftovers(self) -> None:
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        for point in sorted((m for m in mounts if m.startswith(str(self.folder))), reverse=True):
            subprocess.run(["umount", "-l", point], check=False)


@contextmanager
def docker_engine(prefix: str = "rlbus-docker-") -> Iterator[DockerEngine]:
    """A started engine; stopped and its folder deleted afterwards, also when the body fails.

    The folder is short and under /tmp: containerd's unix sockets live in it (108-byte limit).
    """
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    engine = DockerEngine(folder)
    try:
        engine.start()
        yield engine
    finally:
        engine.stop()
        shutil.rmtree(folder, ignore_errors=True)


def base_rootfs_tarball(cache_dir: Path, timeout_s: float = 900.0) -> Path:
    """A tarball of Debian bookworm (minbase + python3, venv), from ``cache_dir`` or debootstrap."""
    key = hashlib.sha256(f"bookworm {DEBIAN_MIRROR} {BASE_PACKAGES} {TRIMMED}".encode()).hexdigest()[:12]
    tarball = cache_dir / f"bookworm-python3-{key}.tar"
    if tarball.exists():
        return tarball
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rlbus-rootfs-", dir="/tmp") as scratch:
        rootfs = Path(scratch) / "rootfs"
        run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", "bookworm", str(rootfs),
             DEBIAN_MIRROR], timeout_s)  # fmt: skip
        for trimmed in TRIMMED:
            for child in (rootfs / trimmed).glob("*"):
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        partial = tarball.with_suffix(f".{os.getpid()}.partial")
        run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], timeout_s)
        partial.replace(tarball)  # atomic: a concurrent run never reads half a file
    return tarball


def import_base_image(engine: DockerEngine, tarball: Path, tag: str) -> None:
    engine.docker("import", "--change", 'CMD ["/bin/bash"]', str(tarball), tag, timeout_s=600)
