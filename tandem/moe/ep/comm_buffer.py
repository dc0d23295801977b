"""`CommBuffer`: what DeepEP's V1 `Buffer` and V2 `ElasticBuffer` share on the portable backend.

Both APIs run on one `torch.distributed` group, keep communication streams and reused scratch between
calls, and follow DeepEP's lifecycle: with `explicitly_destroy=True` the caller must call `destroy()`, and
any later call fails; without it the destructor releases the buffer and `destroy()` is refused.
"""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist

from .stream import CommStreams
from .workspace import Workspace


class CommBuffer:
    """
    The group, streams, scratch and destroy lifecycle of a portable EP buffer (subclassed by each API).

    Attributes:
        group: the communication group.
        explicitly_destroy: whether `destroy()` must be called to release the buffer.
        runtime: DeepEP's C++ runtime; None for the portable backend.
    """

    def __init__(self, group: Optional[dist.ProcessGroup], explicitly_destroy: bool) -> None:
        """
        Arguments:
            group: the communication group; `None` means the default group, which must exist.
            explicitly_destroy: if set, `destroy()` must be called to release resources.
        """
        if group is None:
            if not dist.is_initialized():
                raise ValueError(f"{type(self).__name__} needs a process group: call "
                                 "torch.distributed.init_process_group first")
            group = dist.group.WORLD
        self.group = group
        self.explicitly_destroy = explicitly_destroy
        self.runtime = None
        self._streams = CommStreams()
        self._workspace = Workspace()
        self._destroyed = False

    def destroy(self) -> None:
        """Release the buffer; only allowed (and then required) with `explicitly_destroy=True`."""
        if not self.explicitly_destroy:
            raise RuntimeError(f"destroy() needs {type(self).__name__}(..., explicitly_destroy=True); otherwise "
                               "the destructor releases it")
        self._check_alive()
        self._release()
        self._destroyed = True

    def _release(self) -> None:
        """Drop the streams and scratch; a subclass holding more extends this."""
        self._streams = CommStreams()
        self._workspace.clear()

    def _check_alive(self) -> None:
        # DeepEP's runtime is gone after destroy(); refusing here keeps the portable backend's behaviour the same.
        if self._destroyed:
            raise RuntimeError(f"this {type(self).__name__} was destroyed; create a new one")
