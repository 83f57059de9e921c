"""The model registry, on MLflow's model registry (same store as tracking; any MLflow URI for teams).

A version points at a training run's logged artifacts (the adapter or full model folder). tuneloop adds lineage
tags, a lineage file and a model card per version, aliases (`champion`, `challenger`, `previous`, any name), and the
one place that turns a reference (`NAME@alias`, `NAME/3`, `NAME`, a run id, a folder) into files.
"""

from __future__ import annotations

import fcntl
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuneloop.config import LoopConfig
from tuneloop.errors import TuneloopError
from tuneloop.train.tracking import setup_mlflow
from tuneloop.workspace import Workspace

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
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)
    model_card: str | None = None
    eval_passed: bool | None = None
    created_at: str | None = None

    def summary(self) -> dict[str, Any]:
        return asdict(self)


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
        self.client, self.experiment_id = setup_mlflow(workspace, config.registry.tracking_uri, config.project.name)

    # -- writing ----------------------------------------------------------------------------------------------------
    @contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise registrations from concurrent processes (SQLite allows one writer at a time)."""
        lock_path = self.workspace.root / "registry.lock"
        with lock_path.open("w") as handle:
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
        lineage_file = self.version_dir(version.name, int(version.version)) / "lineage.json"
        lineage = json.loads(lineage_file.read_text(encoding="utf-8")) if lineage_file.exists() else {}
        card = self.version_dir(version.name, int(version.version)) / "README.md"
        eval_passed = tags.get("tuneloop.eval_passed")
        return VersionInfo(
            name=version.name,
            version=int(version.version),
            aliases=sorted(getattr(version, "aliases", []) or []),
            run_id=tags.get("tuneloop.run_id"),
            artifact_path=self.local_path(version.source),
            base_model=tags.get("tuneloop.base_model"),
            data_fingerprint=tags.get("tuneloop.data_fingerprint"),
            metrics=lineage.get("metrics", {}),
            config=lineage.get("config", {}),
            lineage=lineage,
            model_card=str(card) if card.exists() else None,
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

        target = self.workspace.cache / "registry-downloads" / re.sub(r"[^A-Za-z0-9]+", "_", source)[-120:]
        if not target.exists():
            download_artifacts(artifact_uri=source, dst_path=str(target), tracking_uri=self.client.tracking_uri)
        return str(target)

    def version_dir(self, name: str, version: int) -> Path:
        path = self.workspace.root / "registry" / validate_name(name) / str(version)
        resolved = path.resolve()
        if not resolved.is_relative_to((self.workspace.root / "registry").resolve()):
            raise TuneloopError(f"invalid model name {name!r}")
        return path
