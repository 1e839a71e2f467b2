"""The DICOM JSON model (PS3.18 F.2) for query results and metadata.

Query results come from the index as text by keyword; `attributes_json` types them by VR (PN as
{"Alphabetic": ...}, IS/US as numbers, multi-valued CS/UI as lists). Metadata of a stored object
is pydicom's own `to_json_dict`, with large binary values replaced by BulkDataURIs.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

from pacsgrid.model import BY_KEYWORD, COMPUTED

EXTRA_VR = {
    "TransferSyntaxUID": (0x00083002, "UI"),  # as AvailableTransferSyntaxUID
    "RetrieveURL": (0x00081190, "UR"),
    "InstanceAvailability": (0x00080056, "CS"),
}
MULTI = ("ModalitiesInStudy", "SOPClassesInStudy")


def tag_vr(keyword: str) -> tuple[int, str] | None:
    if keyword in BY_KEYWORD:
        a = BY_KEYWORD[keyword]
        return a.tag, a.vr
    if keyword in COMPUTED:
        tag, vr, _ = COMPUTED[keyword]
        return tag, vr
    return EXTRA_VR.get(keyword)


def typed(vr: str, keyword: str, text: str) -> list[Any]:
    if text == "":
        return []
    if keyword in MULTI:
        return [v for v in text.split("\\") if v]
    if vr == "PN":
        return [{"Alphabetic": text}]
    if vr in ("IS", "US", "UL", "SS", "SL"):
        try:
            return [int(text.strip())]
        except ValueError:
            return []
    if vr == "DS":
        try:
            return [float(text)]
        except ValueError:
            return []
    return [text]


def attributes_json(values: dict[str, str]) -> dict[str, Any]:
    """{"0020000D": {"vr": "UI", "Value": [...]}, ...} for the given keyword -> text values."""
    out: dict[str, Any] = {}
    for keyword, text in values.items():
        tv = tag_vr(keyword)
        if tv is None:
            continue
        tag, vr = tv
        value = typed(vr, keyword, text)
        out[f"{tag:08X}"] = {"vr": vr, "Value": value} if value else {"vr": vr}
    return dict(sorted(out.items()))


def metadata_json(part10: bytes, base_url: str, transfer_syntax: str) -> dict[str, Any]:
    """The full header of a stored object in DICOM JSON; binary values over 1 KB (pixel data
    included) become BulkDataURIs under `base_url` (the instance's WADO-RS URL)."""
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(part10), force=True)

        def bulk(elem: Any) -> str:
            return f"{base_url}/bulkdata/{int(elem.tag):08X}"

        out: dict[str, Any] = ds.to_json_dict(
            bulk_data_threshold=1024, bulk_data_element_handler=bulk
        )
    pixels = out.get("7FE00010")
    if isinstance(pixels, dict) and "BulkDataURI" not in pixels:  # always by reference
        out["7FE00010"] = {
            "vr": pixels.get("vr", "OB"),
            "BulkDataURI": f"{base_url}/bulkdata/7FE00010",
        }
    out["00083002"] = {"vr": "UI", "Value": [transfer_syntax]}
    return out
