"""Uploads in progress: chunks written at their offsets into a temp file, checked at commit.

A tenant may send chunks in any order and resend one; commit verifies that every byte
of the declared size arrived and that the sha256 matches, so a truncated or corrupt
upload is caught before anything becomes visible. Temp files live in `uploads/` under
the state directory and are removed on commit, on failure, on timeout and at start.
"""

from __future__ import annotations

import bisect
import hashlib
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from mtcore.errors import Overloaded, TooLarge, UploadCorrupt
from mtcore.protocol import check_model_name, check_sha256, check_size

DISK_SHARE = 0.9  # uploads in progress may reserve this share of the free disk
MAX_RANGES = 4096  # disjoint pieces an upload may have at once (bounds bookkeeping)


@dataclass
class Upload:
    """One upload in progress."""

    handle: str
    tenant: str
    name: str
    size: int  # declared total bytes
    sha256: str  # declared hex digest
    replace: bool  # may overwrite an existing model of that name
    max_batch: int | None  # requested batch cap, None for the default
    path: Path  # temp file the chunks are written into
    file: BinaryIO
    ranges: list[tuple[int, int]] = field(default_factory=list)  # merged [start, end) received
    touched: float = field(default_factory=time.monotonic)  # last activity
    received_bytes: int = 0  # bytes covered by `ranges`

    def received(self) -> int:
        return self.received_bytes

    def add_range(self, start: int, end: int) -> None:
        """Merge [start, end) into the sorted, disjoint ranges: O(log n) to find its place."""
        i = bisect.bisect_left(self.ranges, (start, start))
        if i > 0 and self.ranges[i - 1][1] >= start:  # touches the range before it
            i -= 1
        j = i
        while j < len(self.ranges) and self.ranges[j][0] <= end:
            start, end = min(start, self.ranges[j][0]), max(end, self.ranges[j][1])
            j += 1
        covered = sum(e - s for s, e in self.ranges[i:j])
        self.ranges[i:j] = [(start, end)]
        self.received_bytes += (end - start) - covered


class Uploads:
    """All uploads in progress, by handle."""

    def __init__(self, directory: Path, max_model_bytes: int) -> None:
        self.directory = directory
        self.max_model_bytes = max_model_bytes
        self.active: dict[str, Upload] = {}  # handle -> upload still receiving chunks
        self.held: dict[str, Upload] = {}  # handle -> upload holding disk (incl. committing)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.part"):  # left by a previous broker: never committed
            stale.unlink(missing_ok=True)

    def begin(
        self, tenant: str, name: str, size: int, sha256: str, replace: bool, max_batch: int | None
    ) -> Upload:
        # The frontend's decode checked these already; the store checks its own arguments
        # again (a sha256 becomes a file name), with the same checks and messages.
        check_model_name(name)
        check_size(size)
        if size > self.max_model_bytes:
            raise TooLarge(f"model of {size} bytes exceeds the limit of {self.max_model_bytes}")
        sha256 = check_sha256(sha256)
        # Each tenant's reservations are bounded by its limits (broker/quotas.py); all
        # together, by the disk they must fit on, not by a count one tenant could fill.
        unwritten = sum(u.size - u.received() for u in self.held.values())
        free = shutil.disk_usage(self.directory).free
        if unwritten + size > DISK_SHARE * free:
            raise Overloaded(
                f"uploads in progress will need {unwritten} more bytes of the {free} free on "
                f"disk; {size} more do not fit; retry later"
            )
        handle = secrets.token_hex(12)
        path = self.directory / f"{handle}.part"
        upload = Upload(
            handle, tenant, name, size, sha256, replace, max_batch, path, path.open("wb")
        )
        self.active[handle] = upload
        self.held[handle] = upload
        return upload

    def count(self, tenant: str) -> int:
        """Uploads of `tenant` still receiving chunks."""
        return sum(u.tenant == tenant for u in self.active.values())

    def reserved(self, tenant: str) -> tuple[int, int]:
        """(uploads, declared bytes) `tenant` holds: receiving or being committed."""
        mine = [u.size for u in self.held.values() if u.tenant == tenant]
        return len(mine), sum(mine)

    def get(self, tenant: str, handle: str) -> Upload:
        upload = self.active.get(handle)
        if upload is None or upload.tenant != tenant:
            raise UploadCorrupt(f"unknown upload handle {handle!r:.40} (expired or never begun)")
        upload.touched = time.monotonic()
        return upload

    def write_chunk(self, upload: Upload, offset: int, data: memoryview) -> int:
        end = offset + len(data)
        if offset < 0 or end > upload.size:
            self.discard(upload)
            raise UploadCorrupt(
                f"chunk [{offset}, {end}) lies outside the declared size {upload.size}; "
                "upload discarded"
            )
        upload.file.seek(offset)
        upload.file.write(data)
        upload.add_range(offset, end)
        if len(upload.ranges) > MAX_RANGES:
            self.discard(upload)
            raise UploadCorrupt(
                f"more than {MAX_RANGES} separate pieces received; send chunks in order "
                "(upload discarded)"
            )
        return upload.received()

    def finish(self, upload: Upload) -> Path:
        """Close the temp file and check every byte arrived; the caller owns it afterwards.

        The sha256 is checked by `verify_sha256`, off the broker's loop (it reads the file).
        """
        self.active.pop(upload.handle, None)
        upload.file.close()
        got = upload.received()
        if got != upload.size:
            self.held.pop(upload.handle, None)
            upload.path.unlink(missing_ok=True)
            raise UploadCorrupt(
                f"upload incomplete: {got} of {upload.size} bytes received "
                f"(ranges {upload.ranges[:4]}); upload discarded, start again"
            )
        return upload.path

    def release(self, upload: Upload) -> None:
        """The upload's commit is over (published or failed): its disk no longer counts."""
        self.held.pop(upload.handle, None)

    def discard(self, upload: Upload) -> None:
        self.held.pop(upload.handle, None)
        self.active.pop(upload.handle, None)
        upload.file.close()
        upload.path.unlink(missing_ok=True)

    def expire(self, now: float, timeout: float) -> int:
        stale = [u for u in self.active.values() if now - u.touched > timeout]
        for upload in stale:
            self.discard(upload)
        return len(stale)

    def close(self) -> None:
        for upload in list(self.active.values()):
            self.discard(upload)


def verify_sha256(path: Path, expected: str) -> bytes:
    """The file's bytes, if they hash to `expected`; else remove it and raise."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        path.unlink(missing_ok=True)
        raise UploadCorrupt(
            f"sha256 mismatch: declared {expected}, received bytes hash to {digest}; "
            "upload discarded"
        )
    return data
