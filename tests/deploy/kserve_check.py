"""Strictly deserialise KServe resources with KServe's own Python models (run with the KServe SDK's interpreter,
.venv-kserve/bin/python): `python kserve_check.py FILE.yaml...`.

KServe's generated models (and the Kubernetes client's they reference) accept unknown keys silently, so each
document is walked against the model classes' `openapi_types` / `attribute_map`: an unknown key, a value of the
wrong type or a class the SDK does not define fails the check; then every object is built bottom-up from its
class, whose setters enforce required fields and enums (client-side validation).

LLMInferenceService: the 0.21 SDK defines V1alpha2LLMInferenceService but not its spec's classes, so its spec is
checked against the CRD's schema by the test, and here only `spec.template` (a Kubernetes PodSpec, walked like the
rest) and the envelope (apiVersion, kind, metadata).

Prints a JSON list with, for each document, its kind, its name and its class; exits 1 listing every problem.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import kserve.models as kserve_models
import kubernetes.client.models as kubernetes_models
import yaml

# Classes the SDK's types name under a different (or no) generated class.
ALIASES = {
    "K8sIoApiAppsV1DeploymentStrategy": "V1DeploymentStrategy",
    "K8sIoApiAutoscalingV2HorizontalPodAutoscalerBehavior": "V2HorizontalPodAutoscalerBehavior",
}
PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "object": (object,),  # IntOrString and free-form values
    "ResourceQuantity": (str, int, float),  # "16Gi", 4, 0.5
}
ROOTS = {
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
    ("serving.kserve.io/v1alpha2", "LLMInferenceService"): "V1alpha2LLMInferenceService",
}
LIST = re.compile(r"^[Ll]ist\[(.+)\]$")
DICT = re.compile(r"^(?:dict\(str, (.+)\)|Dict\[str, (.+)\])$")


def model_class(name: str) -> type | None:
    name = ALIASES.get(name, name)
    return getattr(kserve_models, name, None) or getattr(kubernetes_models, name, None)


class Walker:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def build(self, value: Any, type_name: str, path: str) -> Any:
        """The value as an instance of `type_name`, recording every mismatch under its path."""
        if value is None:
            return None
        if type_name in PRIMITIVES:
            # bool is an int in Python: an int field given true/false is still wrong.
            wrong_bool = isinstance(value, bool) and type_name not in ("bool", "object")
            if not isinstance(value, PRIMITIVES[type_name]) or wrong_bool:
                self.problems.append(f"{path}: expected {type_name}, got {type(value).__name__} {value!r}")
            return value
        if match := LIST.match(type_name):
            if not isinstance(value, list):
                self.problems.append(f"{path}: expected a list of {match[1]}, got {type(value).__name__}")
                return None
            return [self.build(item, match[1], f"{path}[{index}]") for index, item in enumerate(value)]
        if match := DICT.match(type_name):
            if not isinstance(value, dict):
                self.problems.append(f"{path}: expected a map, got {type(value).__name__}")
                return None
            inner = match[1] or match[2]
            return {key: self.build(item, inner, f"{path}.{key}") for key, item in value.items()}
        klass = model_class(type_name)
        if klass is None:
            self.problems.append(f"{path}: the SDK defines no class {type_name}; cannot check it")
            return None
        if not isinstance(value, dict):
            self.problems.append(f"{path}: expected an object ({type_name}), got {type(value).__name__}")
            return None
        return self.build_object(value, klass, path)

    def build_object(self, value: dict[str, Any], klass: type, path: str, skip: tuple[str, ...] = ()) -> Any:
        by_json = {json_name: attribute for attribute, json_name in klass.attribute_map.items()}
        arguments: dict[str, Any] = {}
        for key, item in value.items():
            if key in skip:
                continue
            if key not in by_json:
                self.problems.append(f"{path}.{key}: unknown field of {klass.__name__}")
                continue
            attribute = by_json[key]
            arguments[attribute] = self.build(item, klass.openapi_types[attribute], f"{path}.{key}")
        try:
            return klass(**arguments)
        except (ValueError, TypeError) as error:
            self.problems.append(f"{path}: {klass.__name__}: {error}")
            return None


def check(document: dict[str, Any], walker: Walker) -> dict[str, Any]:
    key = (document.get("apiVersion"), document.get("kind"))
    root = ROOTS.get(key)
    if root is None:
        walker.problems.append(f"{key}: not a KServe resource this check knows")
        return {}
    name = document.get("metadata", {}).get("name")
    klass = getattr(kserve_models, root)
    if root == "V1alpha2LLMInferenceService":
        spec = document.get("spec", {})
        walker.build(spec.get("template"), "V1PodSpec", f"{name}.spec.template")
        built = walker.build_object(document, klass, name, skip=("spec",))
        if built is not None:
            built.spec = spec  # the SDK has no class for it: the CRD schema checks it
    else:
        built = walker.build_object(document, klass, name)
    return {"kind": document["kind"], "name": name, "class": type(built).__name__ if built is not None else None}


def main(paths: list[str]) -> int:
    walker = Walker()
    checked = []
    for path in paths:
        with open(path, encoding="utf-8") as stream:
            checked += [check(document, walker) for document in yaml.safe_load_all(stream) if document]
    if walker.problems:
        print("\n".join(walker.problems), file=sys.stderr)
        return 1
    print(json.dumps(checked))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
