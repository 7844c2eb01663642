"""Where the proxy's CPU goes: a py-spy recording summarised as self and inclusive shares.

`record()` samples a running process with py-spy (raw, collapsed stacks, non-blocking,
so the process is not paused); `summarise()` turns the stacks into the functions that
hold the most samples themselves (self) and the parts of the stack that cost the most
in total (inclusive). Samples of an idle event loop are not recorded by py-spy, so the
shares are of busy time. Work done in C between Python callbacks (uvloop's loop and
transports, aiohttp's C HTTP parser) shows up as self time of the outermost Python
frame that runs the loop; httptools' parser, called by the fast lane, as self time of
the lane's frame that feeds it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# "function (path/to/file.py:123)" -> ("function", "path/to/file.py")
_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")
# Each sample goes to the first of these, from the innermost frame outwards, whose file
# it matches; standard-library frames (json, uuid, re, ...) count for their caller.
CATEGORIES = (
    ("request log line (structlog, proxy/logging.py)", ("structlog/", "proxy/logging.py")),
    (
        "request metrics (proxy/metrics.py, prometheus_client)",
        ("proxy/metrics.py", "prometheus_client/"),
    ),
    ("proxy: fast lane (proxy/lane.py; httptools' C parser counts here)", ("proxy/lane.py",)),
    ("proxy: protocol (proxy/server.py)", ("proxy/server.py",)),
    ("proxy: middleware, auth, handler, cache", ("proxy/",)),
    ("aiohttp: response and its headers", ("aiohttp/web_response.py", "aiohttp/http_writer.py")),
    ("aiohttp: request, routing, dispatch", ("aiohttp/", "multidict/", "yarl/")),
    ("event loop and C code (uvloop, HTTP parser, syscalls)", ("asyncio/", "uvloop/")),
)
OTHER = "other"


def py_spy() -> str | None:
    """The py-spy executable: the one beside this Python, or on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def record(executable: str, pid: int, duration_s: int, output: Path) -> subprocess.Popen[bytes]:
    """Start recording `pid` for `duration_s`; wait on the returned process."""
    return subprocess.Popen(
        [
            executable,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(duration_s),
            "--rate",
            "250",
            "--nonblocking",
            "--format",
            "raw",
            "--output",
            str(output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _frame_name(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    if "/proxy/" in path:
        path = "proxy/" + path.rsplit("/proxy/", 1)[1]
    return f"{match['function']} ({path})"


@dataclass
class Profile:
    samples: int
    self_share: list[tuple[str, float]]  # (frame, share of samples), highest first
    parts: list[tuple[str, float]]  # (category, share of samples); the shares sum to 1


def _category(frames: list[str]) -> str:
    for frame in reversed(frames):
        path = frame.rsplit(" (", 1)[-1]
        for category, prefixes in CATEGORIES:
            if path.startswith(prefixes):
                return category
    return CATEGORIES[-1][0] if not frames or frames == [""] else OTHER


def summarise(collapsed: str, top: int = 12) -> Profile:
    total = 0
    own: Counter[str] = Counter()
    parts: Counter[str] = Counter()
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if not f.startswith("process ")]
        total += count
        own[frames[-1] if frames else ""] += count
        parts[_category(frames)] += count
    if total == 0:
        return Profile(0, [], [])
    return Profile(
        total,
        [(frame or "(no Python frame)", n / total) for frame, n in own.most_common(top)],
        [(part, n / total) for part, n in parts.most_common()],
    )
