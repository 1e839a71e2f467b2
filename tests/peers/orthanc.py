"""A real Orthanc (Debian's `orthanc` package): the legacy PACS of the migration and
forwarding tests, and the archive pacsgrid is benchmarked against.

Each instance gets its own JSON config, storage folder and free ports; HTTP is for localhost
only (RemoteAccessAllowed false, no authentication). As a legacy PACS (`legacy=True`) DICOM peers
are checked by AE title and host (DicomCheckModalityHost); a benchmark keeps Orthanc's defaults
(`legacy=False`). Orthanc 1.10 has no option to bind its DICOM port to one address; on this
machine nothing but loopback reaches it (bench.run adds a private network namespace). It runs
with TCP_NODELAY=1 (its DICOM layer is DCMTK), is loaded through its REST API
(POST /instances) and stopped by its PID.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.peers.program import DCMTK_ENV, PeerError, Program, free_port

# A legacy PACS as the tests meet one: peers checked by host, unknown SOP classes kept, studies
# stable after 2 s, no jobs kept across restarts, files stored as received.
LEGACY: dict[str, Any] = {
    "DicomCheckCalledAet": False,
    "DicomCheckModalityHost": True,
    "DicomAlwaysAllowEcho": True,
    "DicomAlwaysAllowStore": False,
    "UnknownSopClassAccepted": True,
    "DicomScuTimeout": 30,
    "StableAge": 2,
    "SaveJobs": False,
    "ConcurrentJobs": 2,
    "StorageCompression": False,
    "DeidentifyLogs": False,
}


def orthanc_binary() -> str:
    path = shutil.which("Orthanc") or (
        "/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None
    )
    if path is None:
        raise PeerError(
            "Orthanc not found: install Debian's orthanc (scripts/test and scripts/bench do)"
        )
    return path


class Orthanc(Program):
    """Orthanc with its folder `workdir`; `modalities` are its DICOM peers (AE title ->
    host, port), `lua` a script it runs, `extra` more configuration (plugins, say)."""

    def __init__(
        self,
        workdir: Path,
        *,
        aet: str = "ORTHANC",
        modalities: dict[str, tuple[str, int]] | None = None,
        lua: str = "",
        extra: dict[str, Any] | None = None,
        legacy: bool = True,
        dicom_port: int | None = None,
        log: Path | None = None,
    ) -> None:
        super().__init__("Orthanc", log or workdir / "orthanc.log")
        self.workdir = workdir
        self.aet = aet
        self.dicom_port = dicom_port or free_port()
        self.http_port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "Name": f"legacy-{aet}" if legacy else "bench",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "storage"),
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {
                ae.lower(): {"AET": ae, "Host": host, "Port": port}
                for ae, (host, port) in (modalities or {}).items()
            },
            "Plugins": [],
            **(LEGACY if legacy else {}),
        }
        if lua:
            script = workdir / "script.lua"
            script.write_text(lua)
            config["LuaScripts"] = [str(script)]
        config.update(extra or {})
        self.config = workdir / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=2))

    def config_modality_port(self, ae_title: str) -> int:
        """The port this Orthanc sends to for a configured modality."""
        modalities = json.loads(self.config.read_text())["DicomModalities"]
        return int(modalities[ae_title.lower()]["Port"])

    def start(self, timeout: float = 60.0) -> Orthanc:
        self.launch([orthanc_binary(), self.config], env=DCMTK_ENV)
        self.wait_listening(self.http_port, timeout)
        self.wait_listening(self.dicom_port, timeout)
        return self

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
