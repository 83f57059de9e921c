"""Small networking helpers shared by the stages, examples and tests that start local servers."""

from __future__ import annotations

import socket
import subprocess
import time


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_ready(url: str, process: subprocess.Popen, seconds: float, path: str = "/ready") -> str:
    """Poll `url` + `path` until a started server (`tuneloop serve`: /ready; vLLM, llama-server: /health) answers
    200: "ready", "exited" (the process died) or "timeout"."""
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return "exited"
        try:
            if httpx.get(f"{url}{path}", timeout=1).status_code == 200:
                return "ready"
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    return "timeout"


def closed_before_response(error: BaseException) -> bool:
    """httpx's error for a pooled keep-alive connection the server had closed before answering (llama-server closes
    one after 100 requests or 5 s idle): nothing was processed, so the same request may be sent again."""
    import httpx

    return isinstance(error, httpx.RemoteProtocolError) and "without sending a response" in str(error)
