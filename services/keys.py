"""``rlbus keys --out DIR [--clients a,b,...]`` (or ``@ keys.toml``): CurveZMQ keys for the bus (docs/security.md).

Writes the server key pair and one client key pair per name in the layout that
``bus.curve.keys_dir`` reads, then prints which file goes to which host.
Existing keys are never overwritten: a new server key would lock out every host.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from rlbus.config import ConfigError, ConfigModel, load_config
from rlbus.config.help import usage_text
from rlbus.curve import CLIENTS_DIR, SERVER_NAME, create_keys

LAYOUT = """\
wrote {count} key files under {out}:
  {out}/{server}.key                 every host
  {out}/{server}.key_secret          hosts running orchestrator, trainer or monitor (they bind)
  {out}/{clients}/<name>.key         hosts running orchestrator, trainer or monitor (peers they admit)
  {out}/{clients}/<name>.key_secret  only the host that sets bus.curve.client_name = "<name>"
clients: {names}
set bus.curve.keys_dir = "{out}" (and bus.curve.client_name on each host); see docs/security.md
"""


class KeysConfig(ConfigModel):
    """What ``rlbus keys`` writes; from flags or ``@ file.toml``, like every other command."""

    out: Path
    """Folder to write the keys to (created); existing keys there are never overwritten."""
    clients: str = "client"
    """Comma-separated client names, one key pair each (a host presents one as ``bus.curve.client_name``)."""


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    if "-h" in args or "--help" in args:
        sys.stdout.write(keys_usage())
        return 0
    try:
        # env={}: keys are made on purpose; a run's RLBUS_* variables do not describe them.
        config = load_config(KeysConfig, args, env={})
    except ConfigError as exc:
        sys.stderr.write(f"rlbus keys: {exc}\n")
        return 2
    names = [name.strip() for name in config.clients.split(",")]
    try:
        written = create_keys(config.out, names)
    except ValueError as exc:
        sys.stderr.write(f"rlbus keys: {exc}\n")
        return 2
    sys.stdout.write(LAYOUT.format(count=len(written), out=config.out, server=SERVER_NAME, clients=CLIENTS_DIR,
                                   names=", ".join(names)))  # fmt: skip
    return 0


def keys_usage() -> str:
    # The shared help without --dry-run, which keys has no use for.
    text = usage_text("keys", KeysConfig, "Create CurveZMQ server and client keys for the bus (docs/security.md).")
    return "\n".join(line.replace(" [--dry-run]", "") for line in text.splitlines() if "--dry-run " not in line) + "\n"
