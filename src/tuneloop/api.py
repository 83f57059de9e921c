"""tuneloop's Python API: the loop's entry functions in one import, for notebooks and scripts.

Each function is the one its CLI command calls (docs/architecture.md, "The loop"), re-exported here so a notebook
needs no knowledge of the package layout:

    config = validate_config(yaml.safe_load(text))          # or load_config("config.yaml")
    workspace = Workspace.from_env()                        # $TUNELOOP_HOME or ./.tuneloop
    prepared = prepare_dataset(config, workspace)
    result = train_model(config, workspace, prepared=prepared)
    report = run_evaluation(config, workspace, result.run_id, "base", local_engine=local_eval_engine(config, workspace))
    version = register_run(Registry(config, workspace), result.run_id, config.registry.name)
    with serving_in_background(build_gateway(config, workspace, [f"{version.name}/{version.version}"])) as url: ...

The one thing the CLI does that has no entry function is running the gateway without blocking the caller:
`serving_in_background` does that (uvicorn in a thread), which a notebook needs and `tuneloop serve` does not.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tuneloop.config import LoopConfig
from tuneloop.config_file import load_config, validate_config
from tuneloop.data.prepare import prepare_dataset
from tuneloop.errors import TuneloopError
from tuneloop.evaluate.run import run_evaluation
from tuneloop.net import free_port
from tuneloop.registry.store import Registry, VersionInfo
from tuneloop.registry.versions import promote, register_run
from tuneloop.serve.launch import Gateway, build_gateway
from tuneloop.serve.offline import local_eval_engine
from tuneloop.tracking import tracking_uri
from tuneloop.train.recipe import train_model
from tuneloop.workspace import Workspace

__all__ = [
    "Gateway",
    "LoopConfig",
    "Registry",
    "TuneloopError",
    "VersionInfo",
    "Workspace",
    "build_gateway",
    "free_port",
    "load_config",
    "local_eval_engine",
    "prepare_dataset",
    "promote",
    "register_run",
    "run_evaluation",
    "serving_in_background",
    "tracking_uri",
    "train_model",
    "validate_config",
]


@contextmanager
def serving_in_background(gateway: Gateway, ready_seconds: float = 300) -> Iterator[str]:
    """Serve `gateway` from a background thread until the block ends; yields its URL once the engine is loaded.

    uvicorn in a thread installs no signal handlers (only the main thread may), so the caller's process (a notebook
    kernel) keeps its own; on exit the server stops accepting, finishes in-flight requests and stops the engine."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(gateway.app, host=gateway.host, port=gateway.port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name=f"tuneloop-gateway-{gateway.port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + ready_seconds
    # `started` turns true after the lifespan startup, which loads the engine's models
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    if not server.started:
        server.should_exit = True
        thread.join(timeout=30)
        why = "stopped while starting (see the log above)" if not thread.is_alive() else f"not up in {ready_seconds} s"
        raise TuneloopError(
            f"the gateway on {gateway.url} {why}",
            hint="check the port is free and the models load (`tuneloop serve` with the same config shows why)",
        )
    try:
        yield gateway.url
    finally:
        server.should_exit = True
        thread.join(timeout=60)
