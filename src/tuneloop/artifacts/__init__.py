"""Typed artifacts: what stages hand each other, each with one reader (`load`) and one writer (`save`).

    DatasetManifest / PreparedDataset   data prepare -> train, evaluate, registry lineage
    RunRecord, TrainResult              train -> evaluate, registry, monitor, cost, pipeline
    EvalReport                          evaluate -> registry lineage, pipeline, cost
    Lineage                             registry -> model card, dashboard, promotion
    DeployManifest                      deploy -> the deploy folder's readers (tests, roll-forward)

Where each lives on disk is `tuneloop.workspace`; the stages' entry points take and return these objects and the CLI
prints them. Loading ignores unknown keys, so a workspace written by a newer tuneloop still reads.
"""

from tuneloop.artifacts.dataset import DatasetManifest, PreparedDataset
from tuneloop.artifacts.deployment import DeployManifest
from tuneloop.artifacts.evaluation import EvalReport
from tuneloop.artifacts.lineage import Lineage
from tuneloop.artifacts.training import RankReport, RunRecord, TrainResult

__all__ = [
    "DatasetManifest",
    "DeployManifest",
    "EvalReport",
    "Lineage",
    "PreparedDataset",
    "RankReport",
    "RunRecord",
    "TrainResult",
]
