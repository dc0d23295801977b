"""Seed import path of the remote target server: ``TargetModelServer``, ``serve``, ``compute_supervision``."""

from tandem.speculative.remote.server import TargetModelServer, _make_request_handler, compute_supervision, serve

__all__ = ["TargetModelServer", "_make_request_handler", "compute_supervision", "serve"]
