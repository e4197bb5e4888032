"""Real servers for the DICOM tests: an Orthanc started from a temporary configuration, and two
misbehaving TCP peers (one that never answers, one that drops the connection mid-transfer).

Orthanc 1.10 (Debian bookworm) has no option to bind to one address; it is confined instead:
free ports only, ``RemoteAccessAllowed: false`` (HTTP answers localhost only), the called AE
title checked, one known modality (``THREEDINO`` at 127.0.0.1), storage and index in the
temporary folder, no jobs saved, and it is stopped at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from threedino_pipe.dicom.pacs import DicomNode

ORTHANC_AET = "ORTHANC"
CLIENT_AET = "THREEDINO"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc")


@dataclass
class OrthancServer:
    """A running Orthanc: its ports, its folder, and helpers for its REST API."""

    process: subprocess.Popen
    folder: Path
    http_port: int
    dicom_port: int
    move_port: int
    dicomweb: bool

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def node(self) -> DicomNode:
        return DicomNode(ORTHANC_AET, "127.0.0.1", self.dicom_port)

    def rest(self, path: str, method: str = "GET", payload: dict | None = None):
        response = requests.request(method, self.url + path, json=payload, timeout=30)
        response.raise_for_status()
        return response.json() if response.content else None

    def clear(self) -> None:
        """Delete every patient, so each test starts from an empty archive."""
        for patient in self.rest("/patients"):
            self.rest(f"/patients/{patient}", method="DELETE")

    def log_text(self) -> str:
        path = self.folder / "orthanc.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def start_orthanc(folder: Path, *, timeout_s: float = 30.0) -> OrthancServer:
    """Start Orthanc on free localhost ports from a configuration in ``folder``; wait until it answers."""
    binary = orthanc_binary()
    if binary is None:
        raise RuntimeError("Orthanc is not installed (Debian package orthanc)")
    folder.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port, move_port = free_port(), free_port(), free_port()
    dicomweb = DICOMWEB_PLUGIN.exists()
    config = {
        "Name": "threedino-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
        "StorageCompression": False, "HttpServerEnabled": True, "HttpPort": http_port, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "OrthancExplorerEnabled": False, "WebDavEnabled": False,
        "HttpThreadsCount": 4, "DicomServerEnabled": True, "DicomPort": dicom_port, "DicomAet": ORTHANC_AET,
        "DicomCheckCalledAet": True, "DicomThreadsCount": 2, "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": False, "DicomAlwaysAllowGet": False,
        "DicomAlwaysAllowMove": False, "DicomScuTimeout": 10, "DicomScpTimeout": 30,
        "DicomModalities": {"threedino": [CLIENT_AET, "127.0.0.1", move_port]},
        "ConcurrentJobs": 1, "SaveJobs": False, "OverwriteInstances": False, "LuaScripts": [],
        "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb else [],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False},
    }
    config_path = folder / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log = (folder / "orthanc.log").open("w")
    env = dict(os.environ, TCP_NODELAY="1")
    process = subprocess.Popen([binary, str(config_path)], stdout=log, stderr=subprocess.STDOUT, cwd=folder, env=env)
    server = OrthancServer(process, folder, http_port, dicom_port, move_port, dicomweb)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {process.returncode}:\n{server.log_text()[-3000:]}")
        try:
            if requests.get(server.url + "/system", timeout=1).ok:
                with socket.create_connection(("127.0.0.1", dicom_port), timeout=1):
                    return server
        except (requests.exceptions.RequestException, OSError):
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"Orthanc did not answer within {timeout_s} s:\n{server.log_text()[-3000:]}")


class _Listener:
    """A TCP listener on a free 127.0.0.1 port that hands each accepted connection to ``_serve``."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()


class SilentServer(_Listener):
    """Accepts TCP connections and never sends a byte (a node that hangs)."""

    def __init__(self) -> None:
        self.held: list[socket.socket] = []
        super().__init__()

    def _serve(self, conn: socket.socket) -> None:
        self.held.append(conn)

    def close(self) -> None:
        super().close()
        for conn in self.held:
            conn.close()


class DroppingProxy(_Listener):
    """A TCP proxy to ``target_port`` that cuts a connection once the server has sent ``after_bytes``
    bytes towards the client (a connection dropped mid-transfer), ``drops`` times; then everything passes."""

    def __init__(self, target_port: int, *, after_bytes: int, drops: int = 1) -> None:
        self.target_port, self.after_bytes, self.drops = target_port, after_bytes, drops
        self.cut = 0
        super().__init__()

    def _serve(self, client: socket.socket) -> None:
        server = socket.create_connection(("127.0.0.1", self.target_port))
        threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
        threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, may_cut: bool) -> None:
        sent, limit = 0, self.after_bytes
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if may_cut and self.cut < self.drops and sent + len(data) >= limit:
                    sink.sendall(data[: max(0, limit - sent)])
                    self.cut += 1
                    break
                sink.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
