"""A stand-in for a service in launcher tests: reports ready, then does what the test says.

``python -m tests.unit.launcher.fake_service <control endpoint> <name>`` spawns a
grandchild (like vLLM's engine or torchrun's ranks) in its process group, tells
the test's ROUTER ``ready <pid> <grandchild pid>`` and obeys commands:
``exit <code>`` (after printing two lines), ``ignore-sigterm`` (answers ``ok``).
SIGTERM keeps its default action: the process dies at once.
"""

import os
import signal
import subprocess
import sys

import zmq


def main(control: str, name: str) -> int:
    grandchild = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
    sock = zmq.Context().socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, name.encode())
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(control)
    sock.send_string(f"ready {os.getpid()} {grandchild.pid}")
    while True:
        command = sock.recv_string()
        if command.startswith("exit"):
            sys.stdout.write(f"{name}: loading weights\n{name}: boom, exiting as told\n")
            return int(command.split()[1])
        if command == "ignore-sigterm":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            sock.send_string("ok")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
