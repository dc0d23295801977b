"""Seed import path of the process-group data plane: ``NCCLTransport``."""

from tandem.speculative.remote.transport import NCCLTransport

__all__ = ["NCCLTransport"]
