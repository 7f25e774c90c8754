#!/usr/bin/env python3
"""A network PDU for the emulated board, and its client: power reached over the network, as a lab
box in a container reaches a real PDU (the board's own power switch, ``board.py DIR on``, starts
QEMU on the host, where the board lives).

    pdu.py serve PORT BOARD_DIR      listen on 127.0.0.1:PORT; each connection sends one line,
                                     on|off|reset, and reads "ok" or "error: ..." back
    pdu.py HOST:PORT on|off|reset    the client (the device dictionary's power commands): exit
                                     status 0 when the PDU said ok

Only the standard library: the client runs under the agent image's python3.
"""

from __future__ import annotations

import socket
import socketserver
import subprocess
import sys
from pathlib import Path

BOARD_PY = Path(__file__).resolve().parent / "board.py"
COMMANDS = ("on", "off", "reset")


class PduServer(socketserver.ThreadingTCPServer):
    """Serves one board's outlet on 127.0.0.1 (port 0: any free port, see ``server_address``)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, board_dir: Path) -> None:
        self.board_dir = board_dir
        super().__init__(("127.0.0.1", port), PduHandler)


class PduHandler(socketserver.StreamRequestHandler):
    timeout = 10

    def handle(self) -> None:
        command = self.rfile.readline(64).decode(errors="replace").strip()
        if command not in COMMANDS:
            self.wfile.write(f"error: unknown command {command!r}; known: {', '.join(COMMANDS)}\n".encode())
            return
        done = subprocess.run([sys.executable, str(BOARD_PY), str(self.server.board_dir), command],
                              capture_output=True, text=True, timeout=60)
        reply = "ok" if done.returncode == 0 else f"error: {(done.stderr or done.stdout).strip()[-200:]}"
        self.wfile.write((reply + "\n").encode())


def client(where: str, command: str) -> int:
    host, _, port = where.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(command.encode() + b"\n")
        reply = sock.makefile().readline().strip()
    print(f"PDU {where}: {command}: {reply}")
    return 0 if reply == "ok" else 1


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "serve":
        with PduServer(int(argv[1]), Path(argv[2])) as server:
            server.serve_forever()
        return 0
    if len(argv) == 2 and argv[1] in COMMANDS:
        return client(argv[0], argv[1])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
