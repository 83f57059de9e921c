"""Import a generated Modal app module with the real `modal` package (run in .venv-deploy) and print, as JSON, what
Modal itself built from it: the function's resources, volumes, concurrency, web server, autoscaler and secrets,
and the command its web function starts. Every network connection is refused and recorded: importing the module
and building these objects must not contact Modal.

    .venv-deploy/bin/python tests/deploy/modal_check.py DEPLOY_FOLDER/modal_app.py
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import socket
import sys
from pathlib import Path
from typing import Any

from offline import refuse_network

connections = refuse_network("tests/deploy/modal_check.py")


def closure(function: Any) -> dict[str, Any]:
    """The variables a closure captured, by name."""
    cells = function.__closure__ or ()
    return {name: cell.cell_contents for name, cell in zip(function.__code__.co_freevars, cells, strict=True)}


def dockerfile(image: Any) -> list[str]:
    """The Dockerfile lines Modal would send to build `image` (a modal._image._Image), base images first, at the
    newest image builder version (the server picks the workspace's; the lines differ only in Python setup)."""
    from modal._image import LATEST_IMAGE_BUILDER_VERSION

    captured = closure(image._load)
    lines = [line for base in captured["base_images"].values() for line in dockerfile(base)]
    if captured["dockerfile_function"] is not None:
        lines += captured["dockerfile_function"](LATEST_IMAGE_BUILDER_VERSION).commands
    return lines


def main(path: Path) -> dict[str, Any]:
    import modal
    from modal._utils.async_utils import synchronizer
    from modal_proto import api_pb2

    # The guard itself works: a connection is refused and recorded (then forgotten).
    with contextlib.suppress(ConnectionRefusedError):
        socket.create_connection(("api.modal.com", 443))
    assert connections, "the network guard did not record a connection"
    connections.clear()

    spec = importlib.util.spec_from_file_location("generated_modal_app", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    app = synchronizer._translate_in(module.app)  # modal.app._App behind the public handle
    functions = app._local_state.functions  # what `modal deploy` would create, by name
    function = functions["serve"]  # modal._functions._Function
    info = synchronizer._translate_out(function).info()  # modal.types.FunctionInfo, built at decoration time
    webhook = function._webhook_config  # the WebhookConfig proto @modal.web_server made
    # The AutoscalerSettings proto `_Function._from_local` builds for FunctionCreate, captured by its loader.
    autoscaler = closure(function._load)["autoscaler_settings"]
    function_spec = function._spec  # modal._functions._FunctionSpec (what `modal shell` reuses)

    started: list[list[str]] = []

    class RecordingPopen:
        def __init__(self, command: list[str], *args: Any, **kwargs: Any) -> None:
            started.append(list(command))

    module.subprocess.Popen = RecordingPopen
    function._raw_f()  # what the container runs when Modal starts the web server

    def optional(field: str) -> int | None:
        return getattr(autoscaler, field) if autoscaler.HasField(field) else None

    return {
        "modal_version": modal.__version__,
        "app_name": app.name,
        "functions": sorted(functions),
        "web_endpoints": sorted(app._local_state.web_endpoints),
        "gpus": [list(gpu) for gpu in info.gpus],
        "volumes": {
            path: {"name": mount.name, "read_only": mount.read_only, "sub_path": mount.sub_path}
            for path, mount in info.volumes.items()
        },
        "max_inputs": info.concurrency_info.max_inputs if info.concurrency_info else None,
        "web_server": {
            "is_web_server": webhook.type == api_pb2.WEBHOOK_TYPE_WEB_SERVER,
            "port": webhook.web_server_port,
            "startup_timeout": webhook.web_server_startup_timeout,
        },
        "autoscaler": {field: optional(field) for field in ("min_containers", "max_containers", "scaledown_window")},
        "timeout": info.timeout,
        "startup_timeout": info.startup_timeout,
        "secrets": [repr(secret) for secret in function_spec.secrets],
        "image": dockerfile(function_spec.image),
        "started_commands": started,
        "connections": connections,
    }


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
