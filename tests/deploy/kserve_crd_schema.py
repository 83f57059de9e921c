"""The LLMInferenceService CRD's schema (serving.kserve.io/v1alpha2, KServe's storage version), vendored in
kserve_llminferenceservice_v1alpha2.schema.json because the KServe 0.21 SDK has no classes for its spec.

Vendored from kserve/kserve's config/crd/full/llmisvc/serving.kserve.io_llminferenceservices.yaml (commit in the
file's $comment) with descriptions and `status` dropped and repeated subtrees (the many PodSpecs) moved to $defs
once; regenerate with

    python tests/deploy/kserve_crd_schema.py CRD.yaml COMMIT

`strict_validator()` makes it strict: a Kubernetes API server prunes unknown fields of a structural schema
silently, which would hide a misspelt field, so every object schema with `properties` (and no
x-kubernetes-preserve-unknown-fields) gets `additionalProperties: false`.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

SCHEMA_FILE = Path(__file__).with_name("kserve_llminferenceservice_v1alpha2.schema.json")
VERSION = "v1alpha2"
SHARED_MIN_CHARS = 1000  # subtrees smaller than this stay inline
# Where an OpenAPI v3 schema holds sub-schemas.
SCHEMA_MAPS = ("properties", "patternProperties")
SCHEMA_LISTS = ("anyOf", "allOf", "oneOf")
SCHEMA_VALUES = ("items", "additionalProperties", "not")


def _canonical(node: Any) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def _map_subschemas(
    node: dict[str, Any], rewrite: Callable[[dict[str, Any]], dict[str, Any]], maps: tuple[str, ...] = SCHEMA_MAPS
) -> dict[str, Any]:
    """`node` with `rewrite` applied to each of its direct sub-schemas (under `maps`, SCHEMA_LISTS, SCHEMA_VALUES);
    everything else (a `properties` mapping's keys, enums, defaults) is kept as it is."""
    rewritten: dict[str, Any] = {}
    for name, value in node.items():
        if name in maps:
            rewritten[name] = {field: rewrite(schema) for field, schema in value.items()}
        elif name in SCHEMA_LISTS:
            rewritten[name] = [rewrite(schema) for schema in value]
        elif name in SCHEMA_VALUES and isinstance(value, dict):
            rewritten[name] = rewrite(value)
        else:
            rewritten[name] = value
    return rewritten


def _without_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: _without_descriptions(value) for key, value in node.items() if key != "description"}
    if isinstance(node, list):
        return [_without_descriptions(value) for value in node]
    return node


def vendor(crd_path: Path, commit: str) -> dict[str, Any]:
    import yaml

    crd = yaml.safe_load(crd_path.read_text(encoding="utf-8"))
    version = next(item for item in crd["spec"]["versions"] if item["name"] == VERSION)
    schema = _without_descriptions(version["schema"]["openAPIV3Schema"])
    schema["properties"].pop("status", None)
    counts: Counter[str] = Counter()

    def count(node: Any) -> None:
        if isinstance(node, dict):
            counts[_canonical(node)] += 1
            for value in node.values():
                count(value)
        elif isinstance(node, list):
            for value in node:
                count(value)

    count(schema)
    definitions: dict[str, Any] = {}
    names: dict[str, str] = {}

    def share(node: dict[str, Any]) -> dict[str, Any]:
        """`node` (a schema) with its repeated sub-schemas as references; only schemas are replaced, never a
        `properties` mapping, an enum or a default."""
        key = _canonical(node)
        rewritten = _map_subschemas(node, share)
        if counts[key] > 1 and len(key) >= SHARED_MIN_CHARS:
            if key not in names:
                names[key] = f"shared{len(names)}"
                definitions[names[key]] = rewritten
            return {"$ref": f"#/$defs/{names[key]}"}
        return rewritten

    shared = share(schema)
    return {
        "$comment": f"kserve/kserve@{commit} {crd_path.name} {VERSION}: descriptions and status dropped",
        **shared,
        "$defs": definitions,
    }


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    strict = _map_subschemas(schema, _strict, (*SCHEMA_MAPS, "$defs"))
    closed = "properties" in strict and "additionalProperties" not in strict
    if closed and not strict.get("x-kubernetes-preserve-unknown-fields"):
        strict["additionalProperties"] = False
    return strict


def strict_validator() -> Any:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(_strict(json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))))


def model_spec_validator() -> Any:
    """spec.model's schema (LLMModelSpec): the CRD leaves lora.adapters schemaless (the type is recursive), so each
    adapter is checked against it."""
    from jsonschema import Draft202012Validator

    schema = _strict(json.loads(SCHEMA_FILE.read_text(encoding="utf-8")))
    model = dict(schema["properties"]["spec"]["properties"]["model"])
    model["$defs"] = schema["$defs"]
    return Draft202012Validator(model)


if __name__ == "__main__":
    SCHEMA_FILE.write_text(
        json.dumps(vendor(Path(sys.argv[1]), sys.argv[2]), separators=(",", ":")) + "\n", encoding="utf-8"
    )
