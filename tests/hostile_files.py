"""Hostile files for tests (issue 15): huge-but-tiny PNGs, snapshots of folders to prove nothing
was changed, and a watchdog that turns a read blocked on a FIFO into a test failure."""

from __future__ import annotations

import errno
import os
import stat
import struct
import threading
import time
import zlib


def png(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG of any size, all white, written without decoding a pixel buffer
    (1-bit rows compress to almost nothing, so a 200-megapixel file is ~50 KB)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\xff" * ((width + 7) // 8)
    z = zlib.compressobj()
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def snapshot(folder) -> dict:
    """Every entry under ``folder``: its type, a link's target, a regular file's bytes."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            full = os.path.join(root, name)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[full] = ("link", os.readlink(full))
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    out[full] = ("file", f.read())
            else:
                out[full] = ("other", stat.S_IFMT(st.st_mode))
    return out


class FifoWatchdog:
    """Unblocks any reader stuck opening one of ``fifos`` after ``seconds`` (by opening the write
    end, which lets the blocked open return), and records that it had to: a hang then fails the
    test instead of freezing it."""

    def __init__(self, fifos, seconds: float = 20.0):
        self.fifos, self.fired = [str(f) for f in fifos], False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(seconds,), daemon=True)

    def _run(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            return
        while not self._stop.is_set():
            for f in self.fifos:
                try:
                    os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO unless a reader waits
                    self.fired = True
                except OSError as e:
                    if e.errno != errno.ENXIO:
                        raise
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)
