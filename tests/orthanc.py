"""A real Orthanc (Debian's `orthanc` package) as the legacy PACS of the migration tests.

Each instance gets its own JSON config, storage folder and ports picked by the test; HTTP is
for localhost only (RemoteAccessAllowed false, no authentication) and DICOM peers are checked by
AE title and host (DicomCheckModalityHost). Orthanc 1.10 has no option to bind its DICOM port to
one address; on this machine nothing but loopback reaches it. It is loaded through its REST API
(POST /instances) and stopped by its PID.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, wait_port


def orthanc_binary() -> str:
    path = shutil.which("Orthanc") or (
        "/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None
    )
    if path is None:
        pytest.fail("Orthanc not found: install Debian's orthanc (scripts/test does)")
    return path


class Orthanc:
    def __init__(
        self,
        workdir: Path,
        *,
        aet: str = "ORTHANC",
        modalities: dict[str, tuple[str, int]] | None = None,
        lua: str = "",
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.workdir = workdir
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "Name": f"legacy-{aet}",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "storage"),
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "HttpServerEnabled": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": True,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": False,
            "UnknownSopClassAccepted": True,
            "DicomModalities": {
                ae.lower(): {"AET": ae, "Host": host, "Port": port}
                for ae, (host, port) in (modalities or {}).items()
            },
            "DicomScuTimeout": 30,
            "StableAge": 2,
            "Plugins": [],
            "SaveJobs": False,
            "ConcurrentJobs": 2,
            "StorageCompression": False,
            "DeidentifyLogs": False,
        }
        if lua:
            script = workdir / "script.lua"
            script.write_text(lua)
            config["LuaScripts"] = [str(script)]
        config.update(extra or {})
        self.config = workdir / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=2))
        self.log = workdir / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def config_modality_port(self, ae_title: str) -> int:
        """The port this Orthanc sends to for a configured modality."""
        modalities = json.loads(self.config.read_text())["DicomModalities"]
        return int(modalities[ae_title.lower()]["Port"])

    def start(self) -> Orthanc:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [orthanc_binary(), str(self.config)], stdout=log, stderr=subprocess.STDOUT
            )
        wait_port(self.http_port, 60, self.proc, self.log)
        wait_port(self.dicom_port, 60, self.proc, self.log)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    # ------------------------------------------------------------------ REST
    def _request(self, method: str, path: str, body: bytes | None = None) -> Any:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method
        )
        with urllib.request.urlopen(req, timeout=60) as rsp:
            data = rsp.read()
        return json.loads(data) if data else None

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def post(self, path: str, body: bytes | dict[str, Any] | str) -> Any:
        raw = json.dumps(body).encode() if isinstance(body, dict) else body
        return self._request("POST", path, raw if isinstance(raw, bytes) else raw.encode())

    def upload(self, paths: list[Path]) -> list[str]:
        """POST each file; the SOP Instance UIDs Orthanc accepted (in order, no repeats)."""
        uids: list[str] = []
        for path in paths:
            try:
                answer = self.post("/instances", path.read_bytes())
            except urllib.error.HTTPError:
                continue  # Orthanc refuses what it cannot parse: not part of the legacy data
            uid = self.get(f"/instances/{answer['ID']}/simplified-tags").get("SOPInstanceUID")
            if uid and uid not in uids:
                uids.append(uid)
        return uids

    def sop_uids(self) -> set[str]:
        """Every SOP Instance UID stored in this Orthanc."""
        out = set()
        for oid in self.get("/instances"):
            out.add(self.get(f"/instances/{oid}/simplified-tags")["SOPInstanceUID"])
        return out

    def instance_count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])
