"""Sentry error reporting, opt-in (`serve.sentry_dsn`, `train.sentry_dsn`, or $SENTRY_DSN), for the gateway and
`tuneloop train`: events carry the exception, the component (`gateway` | `train`), tuneloop's release and the
request's or run's context (tags), and never API keys, cookies, prompts or local variables unless content was asked
for (`serve.sentry_send_content`).

Sentry's client is process-wide: `init_error_reporting` starts it once, `close_error_reporting` flushes and stops it
(gateway stop, end of a training run), so nothing is left active for whatever runs next in the process. While
nothing is configured, `report_exception` returns at once without importing the SDK.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any, Literal

from tuneloop import __version__
from tuneloop.errors import TuneloopError

log = logging.getLogger("tuneloop.errors")

Component = Literal["gateway", "train"]
DSN_FIELDS: dict[str, str] = {"gateway": "serve.sentry_dsn", "train": "train.sentry_dsn"}
# Header names that carry credentials: dropped from events whole, not masked.
SECRET_HEADER_PARTS = ("authorization", "api-key", "api_key", "apikey", "cookie", "token", "secret")

_active: Component | None = None  # the component this process reports as, while a client started here is active
_global_tags: set[str] = set()  # tags put on the global scope, removed by close_error_reporting
# Marks an exception sent by report_exception (with its tags): the framework's own capture of the same exception,
# when it propagates on, is dropped. (Sentry's dedupe remembers one exception per context; engines run in other tasks.)
_REPORTED = "_tuneloop_reported"


def init_error_reporting(dsn: str | None, component: Component, send_content: bool = False) -> bool:
    """Start Sentry for `component` with `dsn` (else $SENTRY_DSN); False when neither is set or reporting is already
    on in this process. Request bodies (prompts) and local variables are sent only with `send_content`."""
    global _active
    from_config = bool(dsn)
    dsn = dsn or os.environ.get("SENTRY_DSN") or None
    if dsn is None or _active is not None:
        return False
    try:
        import sentry_sdk
    except ImportError:
        field = DSN_FIELDS[component]
        if not from_config:  # $SENTRY_DSN may be meant for other programs: say so and carry on
            log.warning("$SENTRY_DSN is set but sentry-sdk is not installed: errors are not reported")
            return False
        raise TuneloopError(
            f"{field} is set but sentry-sdk is not installed",
            hint=f"pip install sentry-sdk (or 'tuneloop[serve]'), or remove {field}",
        ) from None

    def scrub(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any] | None:
        exc_info = hint.get("exc_info")
        if exc_info and getattr(exc_info[1], _REPORTED, False):
            return None
        request = event.get("request")
        if isinstance(request, dict):
            headers = request.get("headers")
            if isinstance(headers, dict):
                request["headers"] = {
                    name: value
                    for name, value in headers.items()
                    if not any(part in name.lower() for part in SECRET_HEADER_PARTS)
                }
            request.pop("cookies", None)
            if not send_content:
                request.pop("data", None)
        return event

    sentry_sdk.init(
        dsn=dsn,
        release=f"tuneloop@{__version__}",
        send_default_pii=False,
        # The bodies are the prompts; local variables in stack frames hold them too.
        max_request_body_size="always" if send_content else "never",
        include_local_variables=send_content,
        before_send=scrub,
    )
    # The global scope: every event of the process has it, whichever thread or request raises.
    _active = component
    set_error_context(component=component)
    return True


def set_error_context(**tags: str | int | None) -> None:
    """Tags for every later event of this process (a training run's id, model, method); no-op while inactive."""
    if _active is None:
        return
    import sentry_sdk

    scope = sentry_sdk.get_global_scope()
    for name, value in tags.items():
        if value is not None:
            scope.set_tag(name, str(value))  # Sentry tags are strings
            _global_tags.add(name)


def report_exception(error: BaseException, **tags: str | int | None) -> None:
    """Send `error` with `tags` (e.g. model, variant, status); no-op while inactive."""
    if _active is None:
        return
    import sentry_sdk

    with sentry_sdk.new_scope() as scope:
        for name, value in tags.items():
            if value is not None:
                scope.set_tag(name, str(value))  # Sentry tags are strings
        sentry_sdk.capture_exception(error)
    with suppress(AttributeError):  # an exception class with __slots__ may be sent twice
        setattr(error, _REPORTED, True)


def close_error_reporting(timeout: float = 5.0) -> None:
    """Send what is queued (up to `timeout` seconds), then stop the client started by `init_error_reporting`."""
    global _active
    if _active is None:
        return
    import sentry_sdk

    sentry_sdk.get_client().close(timeout=timeout)
    scope = sentry_sdk.get_global_scope()
    scope.set_client(None)
    for name in _global_tags:
        scope.remove_tag(name)
    _global_tags.clear()
    _active = None


@contextmanager
def reported_failures(dsn: str | None, component: Component) -> Iterator[None]:
    """Within the block, an exception (not Ctrl-C) is sent to Sentry, then re-raised; reporting started here is
    stopped at the end."""
    started = init_error_reporting(dsn, component)
    try:
        yield
    except Exception as error:
        report_exception(error)
        raise
    finally:
        if started:
            close_error_reporting()
