"""Memory that forked processes share: a memfd mapping made before the fork."""

from __future__ import annotations

import mmap
import os
import tempfile


class SharedMemory:
    """`size` zeroed bytes (`mem`) in a memfd (`fd`, for fcntl locks), MAP_SHARED, so a
    process forked after it sees and makes the same changes."""

    def __init__(self, name: str, size: int) -> None:
        if hasattr(os, "memfd_create"):
            self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        else:  # pragma: no cover - not Linux
            self._file = tempfile.TemporaryFile()  # noqa: SIM115 - open as long as the table
            self.fd = self._file.fileno()
        os.ftruncate(self.fd, size)
        self.mem = mmap.mmap(self.fd, size)
