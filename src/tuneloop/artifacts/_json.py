"""The one way artifacts are read and written: pydantic models as JSON files, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from typing_extensions import Self

from tuneloop.errors import TuneloopError


class ArtifactPart(BaseModel):
    """A nested part of an artifact: unknown keys are ignored, like the artifact's own."""

    model_config = ConfigDict(extra="ignore")


class JsonArtifact(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @classmethod
    def load(cls, path: Path) -> Self:
        try:
            return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise TuneloopError(f"{path} does not exist", hint=f"a {cls.__name__} is written there") from None
        except (ValueError, ValidationError) as error:
            raise TuneloopError(
                f"{path} is not a valid {cls.__name__}: {str(error)[:400]}",
                hint="it was damaged or written by an incompatible tuneloop; rerun the step that writes it",
            ) from None

    def save(self, path: Path) -> Path:
        """Write to a temporary sibling, then rename: a reader never sees half a file."""
        write_json(path, self.model_dump(mode="json"))
        return path


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    temporary.replace(path)
