"""``rlbus models``: the models a run can use now, and those ``rlbus model`` can make.

Usable now: Hugging Face folders (they hold ``config.json``) under ``./models`` and
``$RLBUS_HOME/models`` (where ``rlbus model --out`` may write), and the models in the local
Hugging Face cache. Each is shown with its architecture (from ``config.json``) and its size on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from rlbus.services.models.cli import COMMANDS as BUILDABLE
from rlbus.services.runs.registry import rlbus_home


def model_folders(environ: Mapping[str, str] = os.environ) -> list[dict[str, Any]]:
    """Every usable model: ``{"model", "path", "source", "architecture", "size_bytes"}``."""
    found = []
    for source, base in (("./models", Path("models")), ("$RLBUS_HOME/models", rlbus_home(environ) / "models")):
        for folder in sorted(base.glob("*/")) if base.is_dir() else []:
            if (folder / "config.json").is_file():
                found.append(_entry(str(folder), folder, folder, source))
    for repo in sorted(hf_cache(environ).glob("models--*")):
        snapshot = next(iter(sorted(repo.glob("snapshots/*/config.json"))), None)
        if snapshot is not None:
            name = repo.name.removeprefix("models--").replace("--", "/")
            found.append(_entry(name, snapshot.parent, repo, "huggingface cache"))
    return found


def hf_cache(environ: Mapping[str, str]) -> Path:
    """The hub cache folder, as ``huggingface_hub`` finds it."""
    if environ.get("HF_HUB_CACHE"):
        return Path(environ["HF_HUB_CACHE"]).expanduser()
    home = Path(environ.get("HF_HOME") or Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface")
    return home.expanduser() / "hub"


def architecture(config_json: Path) -> str:
    try:
        config = json.loads(config_json.read_text())
    except (OSError, ValueError):
        return "?"
    names = config.get("architectures") or [config.get("model_type") or "?"]
    return ",".join(map(str, names))


def disk_size(folder: Path) -> int:
    """Bytes of the files under ``folder``; links are not followed (the hub cache links its blobs)."""
    return sum(entry.stat(follow_symlinks=False).st_size for entry in _files(folder))


def format_size(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def models_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlbus models", description=__doc__.splitlines()[0].strip("`: "))
    parser.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    args = parser.parse_args(list(argv))
    found = model_folders()
    buildable = {name: summary for name, (_, _, summary) in BUILDABLE.items()}
    if args.json:
        sys.stdout.write(json.dumps({"models": found, "buildable": buildable}, indent=1) + "\n")
        return 0
    if found:
        table = [("MODEL", "ARCHITECTURE", "SIZE", "WHERE")]
        table += [(m["model"], m["architecture"], format_size(m["size_bytes"]), m["source"]) for m in found]
        widths = [max(len(line[i]) for line in table) for i in range(3)]
        sys.stdout.writelines(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d}\n" for a, b, c, d in table)
    else:
        sys.stdout.write("no local models yet\n")
    sys.stdout.write("\n'rlbus model NAME --out DIR' makes:\n")
    sys.stdout.writelines(f"  {name:<8} {summary}\n" for name, summary in buildable.items())
    return 0


def _entry(model: str, folder: Path, measured: Path, source: str) -> dict[str, Any]:
    return {"model": model, "path": str(folder.resolve()), "source": source,
            "architecture": architecture(folder / "config.json"), "size_bytes": disk_size(measured)}  # fmt: skip


def _files(folder: Path) -> Iterator[os.DirEntry]:
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                yield from _files(Path(entry.path))
            else:
                yield entry
