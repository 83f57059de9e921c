"""The model registry, on MLflow's model registry (same store as tracking; any MLflow URI for teams).

A version points at a training run's logged artifacts (the adapter or full model folder). tuneloop adds lineage
tags, a lineage file (`artifacts.Lineage`) and a model card per version, and aliases (`champion`, `challenger`,
`previous`, any name). `registry.refs` turns any reference (`NAME@alias`, `NAME/3`, a run id, a folder) into files.
"""

from __future__ import annotations

import fcntl
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tuneloop.artifacts.lineage import Lineage
from tuneloop.config import LoopConfig
from tuneloop.errors import TuneloopError
from tuneloop.tracking import Tracker
from tuneloop.workspace import VersionPaths, Workspace

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
ALIAS_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
REFERENCE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*)(?:@(?P<alias>[a-z][a-z0-9_-]*)|/(?P<version>\d+))?$")


@dataclass
class VersionInfo:
    name: str
    version: int
    aliases: list[str]
    run_id: str | None
    artifact_path: str
    base_model: str | None
    data_fingerprint: str | None
    lineage: Lineage | None = None
    model_card: str | None = None
    eval_passed: bool | None = None
    created_at: str | None = None

    @property
    def metrics(self) -> dict[str, float]:
        return self.lineage.metrics if self.lineage else {}

    @property
    def config(self) -> dict[str, Any]:
        return self.lineage.config if self.lineage else {}

    def summary(self) -> dict[str, Any]:
        """JSON-able, for `--json` output (the lineage as its own dict)."""
        fields = {key: value for key, value in self.__dict__.items() if key != "lineage"}
        return {
            **fields,
            "metrics": self.metrics,
            "config": self.config,
            "lineage": self.lineage.model_dump(mode="json") if self.lineage else {},
        }


def validate_name(name: str) -> str:
    if not NAME_PATTERN.match(name) or ".." in name:
        raise TuneloopError(
            f"invalid model name {name!r}",
            hint="use letters, digits, '.', '_' and '-' (no '/', no '..', at most 100 characters)",
        )
    return name


def validate_alias(alias: str) -> str:
    if not ALIAS_PATTERN.match(alias) or (alias.startswith("v") and alias[1:].isdigit()):
        raise TuneloopError(
            f"invalid alias {alias!r}",
            hint="lower-case letters, digits, '_' and '-', starting with a letter (and not like 'v3')",
        )
    return alias


class Registry:
    def __init__(self, config: LoopConfig, workspace: Workspace) -> None:
        self.config = config
        self.workspace = workspace
        self.tracker = Tracker.open(workspace, config.registry.tracking_uri, config.project.name)
        self.client = self.tracker.client

    # -- writing ----------------------------------------------------------------------------------------------------
    @contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise registrations from concurrent processes (SQLite allows one writer at a time)."""
        self.workspace.ensure(self.workspace.root)
        with self.workspace.registry_lock.open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def register(self, name: str, source: str, run_id: str | None, tags: dict[str, str], description: str) -> int:
        validate_name(name)
        with self._lock():
            from mlflow.exceptions import MlflowException

            try:
                self.client.create_registered_model(name)
            except MlflowException as exc:
                if "already exists" not in str(exc).lower() and "RESOURCE_ALREADY_EXISTS" not in str(exc):
                    raise
            version = self.client.create_model_version(
                name, source=source, run_id=run_id, tags=tags, description=description
            )
            return int(version.version)

    def set_alias(self, name: str, version: int, alias: str) -> None:
        validate_alias(alias)
        self._version(name, version)
        with self._lock():
            self.client.set_registered_model_alias(name, alias, str(version))

    def delete(self, name: str, version: int | None) -> None:
        with self._lock():
            if version is None:
                self.client.delete_registered_model(name)
            else:
                self._version(name, version)
                self.client.delete_model_version(name, str(version))

    def set_tag(self, name: str, version: int, key: str, value: str) -> None:
        self.client.set_model_version_tag(name, str(version), key, value)

    # -- reading ----------------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(model.name for model in self.client.search_registered_models())

    def versions(self, name: str) -> list[VersionInfo]:
        found = self.client.search_model_versions(f"name='{validate_name(name)}'")
        infos = sorted((self._info(version) for version in found), key=lambda info: info.version)
        # Search results carry no aliases (MLflow fills them on get_model_version only): take them from the model.
        aliases: dict[int, list[str]] = {}
        for alias, version in (self.client.get_registered_model(name).aliases or {}).items():
            aliases.setdefault(int(version), []).append(alias)
        for info in infos:
            info.aliases = sorted(aliases.get(info.version, []))
        return infos

    def get(self, reference: str) -> VersionInfo:
        """`NAME@alias`, `NAME/3`, or `NAME` (its champion, else its newest version)."""
        match = REFERENCE.match(reference)
        if not match:
            raise TuneloopError(f"not a registry reference: {reference!r}", hint="write NAME@alias or NAME/VERSION")
        name = validate_name(match["name"])
        if match["alias"]:
            from mlflow.exceptions import MlflowException

            try:
                return self._info(self.client.get_model_version_by_alias(name, match["alias"]))
            except MlflowException as exc:
                raise TuneloopError(
                    f"{name} has no alias {match['alias']!r}", hint=f"see `tuneloop registry show {name}`"
                ) from exc
        if match["version"]:
            return self._info(self._version(name, int(match["version"])))
        versions = self.versions(name)
        if not versions:
            raise TuneloopError(f"no registered model named {name!r}", hint="see `tuneloop registry list`")
        champions = [info for info in versions if "champion" in info.aliases]
        return champions[0] if champions else versions[-1]

    def _version(self, name: str, version: int) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version(validate_name(name), str(version))
        except MlflowException as exc:
            raise TuneloopError(
                f"{name} has no version {version}", hint=f"see `tuneloop registry show {name}`"
            ) from exc

    def _info(self, version: Any) -> VersionInfo:
        tags = dict(version.tags or {})
        files = self.version_dir(version.name, int(version.version))
        lineage = Lineage.load(files.lineage) if files.lineage.exists() else None
        eval_passed = tags.get("tuneloop.eval_passed")
        return VersionInfo(
            name=version.name,
            version=int(version.version),
            aliases=sorted(getattr(version, "aliases", []) or []),
            run_id=tags.get("tuneloop.run_id"),
            artifact_path=self.local_path(version.source),
            base_model=tags.get("tuneloop.base_model"),
            data_fingerprint=tags.get("tuneloop.data_fingerprint"),
            lineage=lineage,
            model_card=str(files.card) if files.card.exists() else None,
            eval_passed=None if eval_passed is None else eval_passed == "true",
            created_at=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(version.creation_timestamp / 1000)),
        )

    def local_path(self, source: str) -> str:
        """The version's files on this machine (downloaded into the workspace cache for remote stores)."""
        if source.startswith("file://"):
            return source[len("file://") :]
        if source.startswith("/"):
            return source
        from mlflow.artifacts import download_artifacts

        target = self.workspace.registry_download(source)
        if not target.exists():
            download_artifacts(artifact_uri=source, dst_path=str(target), tracking_uri=self.client.tracking_uri)
        return str(target)

    def version_dir(self, name: str, version: int) -> VersionPaths:
        try:
            return self.workspace.version(validate_name(name), version)
        except ValueError:
            raise TuneloopError(f"invalid model name {name!r}") from None
