"""``rlbus keys --out DIR [--clients a,b,...]``: CurveZMQ keys for the bus (docs/security.md).

Writes the server key pair and one client key pair per name in the layout that
``bus.curve.keys_dir`` reads, then prints which file goes to which host.
Existing keys are never overwritten: a new server key would lock out every host.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

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


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rlbus keys", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the keys to (created)")
    parser.add_argument("--clients", default="client",
                        help="comma-separated client names, one key pair each (default: client)")  # fmt: skip
    return parser.parse_args(list(argv))


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    names = [name.strip() for name in args.clients.split(",")]
    try:
        written = create_keys(args.out, names)
    except ValueError as exc:
        sys.stderr.write(f"rlbus keys: {exc}\n")
        return 2
    sys.stdout.write(LAYOUT.format(count=len(written), out=args.out, server=SERVER_NAME, clients=CLIENTS_DIR,
                                   names=", ".join(names)))  # fmt: skip
    return 0
