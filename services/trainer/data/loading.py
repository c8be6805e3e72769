"""Read SFT examples from local files: JSONL, Parquet, or a ``datasets.save_to_disk`` folder.

Parquet and saved datasets are read with pyarrow alone (a saved dataset is a
folder of Arrow IPC stream files listed in ``state.json``), so the heavy
``datasets`` package is not needed. Every row comes back as a plain dict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlbus.errors import UserError
from rlbus.jsonl import read_json_objects

Row = dict[str, Any]


def read_rows(path: str | Path, split: str = "train") -> list[Row]:
    """All rows of the file or folder at ``path``; a :class:`UserError` naming what is wrong."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"SFT data {path} does not exist: fix data.path (or data.val_path)")
    try:
        return _read_any(path, split)
    except UserError:
        raise
    except (ValueError, OSError) as exc:  # a malformed file: JSON, Parquet or Arrow errors are ValueErrors
        raise UserError(f"SFT data {path} cannot be read: {exc}") from exc


def _read_any(path: Path, split: str) -> list[Row]:
    if path.is_dir():
        return _read_saved_dataset(path, split)
    if path.suffix in (".jsonl", ".json"):
        return read_json_objects(path)
    if path.suffix == ".parquet":
        return _arrow().parquet.read_table(path).to_pylist()
    raise UserError(f"SFT data {path}: expected a .jsonl, .json or .parquet file or a saved dataset folder")


def _read_saved_dataset(folder: Path, split: str) -> list[Row]:
    if (folder / "dataset_dict.json").exists():
        splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        if split not in splits:
            raise UserError(f"saved dataset {folder} has splits {splits}, not {split!r} (see data.split)")
        folder = folder / split
    state_file = folder / "state.json"
    if not state_file.exists():
        raise UserError(f"{folder} is not a saved dataset folder (no state.json or dataset_dict.json)")
    pa = _arrow()
    rows: list[Row] = []
    for entry in json.loads(state_file.read_text())["_data_files"]:
        with pa.memory_map(str(folder / entry["filename"])) as source:
            rows.extend(pa.ipc.open_stream(source).read_all().to_pylist())
    return rows


def _arrow():
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise ValueError(
            "reading Parquet files or saved datasets needs pyarrow: pip install 'rlbus[trainer]'"
        ) from None
    return pyarrow
