"""What a source may cost and reach, and how a source is refused.

SourceLimits bounds a download (size, deadline, the hosts a redirect may lead to, private
addresses) and an archive (member count, unpacked size, compression ratio, one file's size);
params `ingest.*` set them (`limits_from`). A source that cannot be used raises SourceError,
whose message names it and says what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MB = 1024 * 1024
CHUNK = 1 << 20  # what one read of a download or an archive member takes at the most


class SourceError(ValueError):
    """A source that cannot be used; the message names it and says what to do."""


@dataclass(frozen=True)
class SourceLimits:
    """What a source may cost and reach (params ingest.timeout_s, deadline_s, max_download_mb,
    redirect_hosts, allow_private_hosts, max_members, max_unpacked_mb, max_ratio,
    max_file_mb)."""

    timeout_s: float = 60.0  # a download's wait for each answer
    deadline_s: float = 3600.0  # the whole transfer, headers included
    max_download_bytes: int = 10 * 1024 * MB
    redirect_hosts: tuple[str, ...] = ()  # `host` (any port) or `host:port`
    allow_private_hosts: bool = False  # loopback, private, link-local addresses
    max_members: int = 100_000
    max_unpacked_bytes: int = 20 * 1024 * MB
    max_ratio: float = 100.0
    max_file_bytes: int = 512 * MB  # one file of a folder source


def limits_from(ingest: Any) -> SourceLimits:
    """SourceLimits from the ingest params (settings.IngestParams)."""
    return SourceLimits(
        timeout_s=float(ingest.timeout_s),
        deadline_s=float(ingest.deadline_s),
        max_download_bytes=int(ingest.max_download_mb * MB),
        redirect_hosts=tuple(ingest.redirect_hosts),
        allow_private_hosts=bool(ingest.allow_private_hosts),
        max_members=int(ingest.max_members),
        max_unpacked_bytes=int(ingest.max_unpacked_mb * MB),
        max_ratio=float(ingest.max_ratio),
        max_file_bytes=int(ingest.max_file_mb * MB),
    )
