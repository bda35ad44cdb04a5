"""What `simimg serve` is started with: torch- and FastAPI-free, so `simimg --help` reads its defaults from here
and the server's stack loads only when a server starts."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from simimg import DEFAULT_MAX_MB, MAX_UPLOAD_PIXELS
from simimg.errors import SimimgError

TOKEN_ENV = "SIMIMG_API_TOKEN"


def is_loopback(host: str) -> bool:
    """localhost or a loopback address (127.0.0.0/8, ::1): reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Limits:
    max_files: int
    max_mb: float
    max_pixels: int

    @property
    def body_bytes(self) -> int:
        """The largest request body worth reading: every file at its cap, plus room for the multipart framing."""
        return int(self.max_files * self.max_mb * 2**20) + 2**20


@dataclass(frozen=True)
class ServeConfig:
    """Everything `simimg serve` is started with (the token excepted: it stays in the environment)."""

    home: str
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    device: str = "auto"
    precision: str = "auto"  # as `simimg query --precision`: int8 only where the index's int8 gate passed
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 64
    timeout_s: float = 30.0
    max_mb: float = DEFAULT_MAX_MB
    max_pixels: int = MAX_UPLOAD_PIXELS
    max_files: int = 16
    threads: int | None = None
    access_log: bool = False

    def __post_init__(self) -> None:
        if min(self.workers, self.max_batch, self.max_queue, self.max_files, self.threads or 1) < 1:
            raise SimimgError("--workers, --max-batch, --max-queue, --max-files and --threads must be at least 1")
        if self.max_files > self.max_queue:
            raise SimimgError(
                f"--max-files {self.max_files} is more than --max-queue {self.max_queue}: such a "
                "request could never be queued"
            )
        if self.max_wait_ms < 0 or self.timeout_s <= 0 or self.max_mb <= 0:
            raise SimimgError("--max-wait-ms must be >= 0, --timeout and --max-mb above 0")

    @property
    def limits(self) -> Limits:
        return Limits(self.max_files, self.max_mb, self.max_pixels)
