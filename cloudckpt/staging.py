"""Staging: copy a state dict into CPU buffers that are allocated once and reused.

Training blocks only for this copy; the upload then reads the staged buffers
while training goes on. The buffers are cached per source storage, so the
second and later saves of the same model allocate nothing and run at memcpy
speed.

* With CUDA, buffers are pinned and copies are non-blocking on a side stream
  (then synchronised before the upload starts).
* For the process executor, buffers live in shared memory so the child process
  maps them instead of receiving a copy.
* On CPU-only hosts no accelerator feature is requested, so nothing warns or fails.

Because buffers are reused, a new stage() must not start while a previous
upload still reads them: :func:`cloudckpt.async_save` waits for the
executor's previous upload before staging.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import torch

__all__ = ["Stager"]


class Stager:
    """Reusable state-dict stager (pinned / shared CPU buffers, cached across saves)."""

    def __init__(
        self,
        *,
        pin_memory: bool | None = None,
        shared_memory: bool = False,
        non_blocking: bool | None = None,
        async_staging: bool = False,
    ) -> None:
        cuda = torch.cuda.is_available()
        self.pin_memory = cuda if pin_memory is None else (pin_memory and cuda)
        self.non_blocking = cuda if non_blocking is None else (non_blocking and cuda)
        self.shared_memory = shared_memory
        self.async_staging = async_staging
        self._impl: Any = None
        self._closed = False

    def _stager(self) -> Any:
        if self._impl is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            self._impl = DefaultStager(StagingOptions(
                use_pinned_memory=self.pin_memory,
                use_shared_memory=self.shared_memory,
                use_async_staging=self.async_staging,
                use_non_blocking_copy=self.non_blocking,
            ))
        return self._impl

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any] | Future[dict[str, Any]]:
        """Copy ``state_dict`` into the staging buffers.

        Returns the staged dict, or a Future of it with ``async_staging=True``
        (then the caller must not modify the source tensors until it resolves).
        """
        if self._closed:
            raise RuntimeError("this Stager was closed; create a new one")
        return self._stager().stage(state_dict)

    def close(self) -> None:
        """Release the cached buffers (idempotent)."""
        if not self._closed and self._impl is not None:
            self._impl.close()
        self._impl = None
        self._closed = True

    def __enter__(self) -> Stager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
