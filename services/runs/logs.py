"""What ``rlbus logs`` prints: a run's console or one service's log files, once or following them.

A run folder's ``logs/`` holds each service's own log, ``<service>.log``, which every process of
the service appends to (both env-workers of a local run write ``env-worker.log``; each rank of a
distributed trainer also writes ``trainer/rank_<N>.log``), and each process's console, ``<name>.out``
(``env-worker-1.out``, ``inference.out``; with ``--slurm``, ``inference-0.out`` and the like are
the consoles streamed back from the nodes). The run's own console is ``console.out``.

``--service NAME`` (``env_worker`` = ``env-worker``) picks the files named ``NAME`` or
``NAME-<N>`` / ``NAME-rank<N>`` (``NAME/rank_<N>.log``): their ``.log`` files, or their consoles where there is none
(``env-worker-1``; a SLURM run whose nodes keep their service logs). Several files are printed one
after another, each under a ``==> path <==`` header, as ``tail`` does.
"""

from __future__ import annotations

import codecs
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

LOG_SUFFIXES = (".log", ".out")
CONSOLE = "console"
"""The stem of the run's console (``rlbus logs ID`` without ``--service``), not a service."""
NUMBERED = re.compile(r"-(?:rank)?(\d+)$")
"""What sets one process's file apart from its service's: ``env-worker-1``, ``trainer-rank1``."""
RANK_LOG = re.compile(r"rank_(\d+)")
"""A rank's log in its service's folder: ``logs/trainer/rank_1.log`` (rlbus.ranks)."""


def service_name(text: str) -> str:
    return text.replace("_", "-")


def log_files(logs_dir: Path) -> list[Path]:
    """Every service log and process console in ``logs_dir``, and every rank log in its folders, by name."""
    if not logs_dir.is_dir():
        return []
    own = [p for p in logs_dir.iterdir() if p.suffix in LOG_SUFFIXES and p.stem != CONSOLE and p.is_file()]
    return sorted(own + sorted(logs_dir.glob("*/rank_*.log")), key=_stem)


def _stem(path: Path) -> str:
    """A file's name as ``--service`` sees it: ``trainer/rank_1.log`` is ``trainer-rank1``."""
    match = RANK_LOG.fullmatch(path.stem)
    return f"{path.parent.name}-rank{match.group(1)}" if match else path.stem


def service_logs(logs_dir: Path, name: str) -> list[Path]:
    """The files ``--service name`` shows (see the module docstring); empty when there are none."""
    name = service_name(name)
    files = [p for p in log_files(logs_dir) if _stem(p) == name or NUMBERED.sub("", _stem(p)) == name]
    own = [p for p in files if p.suffix == ".log"]
    return sorted(own or files, key=lambda p: (_stem(p) != name, _number(_stem(p))))


def _number(stem: str) -> int:
    """``env-worker-10`` -> 10: numbered files in numeric order, after the service's own."""
    match = NUMBERED.search(stem)
    return int(match.group(1)) if match else -1


def known_services(logs_dir: Path) -> list[str]:
    """Every name ``--service`` finds files of: services and single processes."""
    stems = {_stem(p) for p in log_files(logs_dir)}
    return sorted(stems | {NUMBERED.sub("", stem) for stem in stems})


class Printer:
    """Prints files to ``out`` and then what is appended to them, each under a header once several
    files are being printed and the output moves from one to another (as ``tail -f`` does)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.offsets: dict[Path, int] = {}
        self.decoders: dict[Path, codecs.IncrementalDecoder] = {}
        self.last: Path | None = None

    def print_start(self, paths: Sequence[Path], num_lines: int | None) -> None:
        """Each file as it is now (its last ``num_lines`` lines)."""
        for path in paths:
            data = self._read_new(path)
            text = self._decode(path, data)
            if num_lines is not None:
                text = "".join(text.splitlines(keepends=True)[-num_lines:]) if num_lines > 0 else ""
            self._write(path, text, len(paths) > 1)

    def print_new(self, paths: Sequence[Path]) -> None:
        """What was appended to each file since it was last read (a new file: all of it)."""
        for path in paths:
            text = self._decode(path, self._read_new(path))
            self._write(path, text, len(paths) > 1)

    def _read_new(self, path: Path) -> bytes:
        try:
            with path.open("rb") as handle:
                handle.seek(self.offsets.get(path, 0))
                data = handle.read()
        except FileNotFoundError:
            return b""
        self.offsets[path] = self.offsets.get(path, 0) + len(data)
        return data

    def _decode(self, path: Path, data: bytes) -> str:
        decoder = self.decoders.setdefault(path, codecs.getincrementaldecoder("utf-8")(errors="replace"))
        return decoder.decode(data)

    def _write(self, path: Path, text: str, several: bool) -> None:
        if not text:
            return
        if several and path != self.last:
            gap = "" if self.last is None else "\n"
            self.out.write(f"{gap}==> {path} <==\n")
        self.last = path
        self.out.write(text)
        self.out.flush()


def follow(printer: Printer, paths_of: Callable[[], list[Path]], alive: Callable[[], bool], poll_s: float) -> None:
    """Print what is appended to the files ``paths_of()`` names (new ones too) until ``alive()`` is False."""
    while True:
        still_alive = alive()  # asked before reading, so the last lines are read after the end
        printer.print_new(paths_of())
        if not still_alive:
            return
        time.sleep(poll_s)
