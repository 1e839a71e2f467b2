"""The web face: DICOMweb (STOW-RS, QIDO-RS, WADO-RS, WADO-URI), the dashboard, the OHIF viewer,
/metrics and /health, on aiohttp.

Everything goes through `Archive`, exactly as the DICOM server does: access control, audit,
durability and metrics apply the same way whichever front end a request came in by.
"""

from pacsgrid.web.app import make_app
from pacsgrid.web.component import WebComponent

__all__ = ["WebComponent", "make_app"]
