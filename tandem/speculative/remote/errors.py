"""The error a request to a target server ends in, importable without torch (the command line catches it)."""

from __future__ import annotations

from typing import Optional


class RemoteTargetError(RuntimeError):
    """A request to a target server failed; names the server, the endpoint and (if any) the HTTP status."""

    def __init__(self, url: str, endpoint: str, message: str, status: Optional[int] = None):
        where = f"target server {url} /{endpoint}"
        super().__init__(f"{where}: HTTP {status}: {message}" if status else f"{where}: {message}")
        self.url = url
        self.endpoint = endpoint
        self.status = status
        self.message = message
