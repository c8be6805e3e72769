"""Key sets and a refusal log for the CurveZMQ tests (unit, integration and multi-host)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

from loguru import logger

from rlbus.config.base import BusConfig, CurveConfig
from rlbus.curve import create_keys


def make_key_sets(root: Path) -> dict[str, Path]:
    """``good``: the run's keys (clients ``client``, ``trainer``, ``tail``); ``intruder``: the run's
    server.key but a client key nobody admitted; ``impostor``: a whole other key set (another server)."""
    create_keys(root / "good", ["client", "trainer", "tail"])
    create_keys(root / "impostor", ["client"])
    intruder = root / "intruder"
    create_keys(intruder / "scratch", ["client"])
    (intruder / "clients").mkdir()
    shutil.copy(intruder / "scratch" / "clients" / "client.key_secret", intruder / "clients")
    shutil.copy(root / "good" / "server.key", intruder)
    return {"good": root / "good", "intruder": intruder, "impostor": root / "impostor"}


def with_keys(config: BusConfig, keys_dir: Path | None, client: str = "client") -> BusConfig:
    """``config`` presenting client ``client`` of ``keys_dir`` (None: plain TCP)."""
    return config.model_copy(update={"curve": CurveConfig(keys_dir=keys_dir, client_name=client)})


class Refusals:
    """Collects the bus's "refused a peer" log lines; :meth:`wait` blocks until enough arrived."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.sink_id = logger.add(self._sink, level="WARNING", filter=lambda r: "refused a peer" in r["message"])

    def _sink(self, message: object) -> None:
        with self.changed:
            self.lines.append(str(message))
            self.changed.notify_all()

    def wait(self, count: int = 1, timeout_s: float = 60.0, on: str = "") -> list[str]:
        """Block until ``count`` refusals (logged for socket role ``on``, if given) were logged."""

        def matching() -> list[str]:
            return [line for line in self.lines if f"on {on})" in line or not on]

        with self.changed:
            if not self.changed.wait_for(lambda: len(matching()) >= count, timeout_s):
                raise AssertionError(
                    f"{len(matching())} of {count} refusals on {on!r} within {timeout_s}s: {self.lines}"
                )
            return matching()

    def close(self) -> None:
        logger.remove(self.sink_id)
