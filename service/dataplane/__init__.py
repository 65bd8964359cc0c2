"""The data plane: the one transport-neutral request path (plane.py), the parameters it honours
(parameters.py) and the call observation every transport goes through (calls.py)."""

from __future__ import annotations

from service.dataplane.plane import EXTENSIONS, SERVER_NAME, DataPlane

__all__ = ["EXTENSIONS", "SERVER_NAME", "DataPlane"]
