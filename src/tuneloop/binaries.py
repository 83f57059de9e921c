"""Finding llama.cpp's programs (llama-server for serving, llama-quantize for k-quant GGUF exports)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# `make llamacpp` builds them here (see the Makefile and docs/serving.md).
BUILT = Path(__file__).resolve().parents[2] / ".llamacpp" / "bin"


def llama_cpp_tool(name: str, env_var: str) -> Path | None:
    """$`env_var` when it names an existing file, else the `make llamacpp` build, else `name` on PATH, else None."""
    configured = os.environ.get(env_var)
    if configured:
        return Path(configured) if Path(configured).exists() else None
    if (BUILT / name).exists():
        return BUILT / name
    found = shutil.which(name)
    return Path(found) if found else None
