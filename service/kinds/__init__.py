"""Model kinds as plugins: each module loads its kind, checks and answers its tasks; the registry
names them, and the names of their tasks' requests (`TASK_NAMES`) for the data plane's errors.

Adding a kind: one module with a `ModelKind`, one line in `KINDS`, and its name (and manifest
section) in the manifest schema, service/contract/manifest.py, which is a closed list shared with
the trainer. A kind with a task RPC also needs a domain request type, its proto messages and the
transports' translator lines. docs/architecture.md, "Adding a model kind", has the steps.
"""

from __future__ import annotations

from service.kinds.base import LoadContext, LoadedModel, ModelKind, TaskName
from service.kinds.captioner.kind import CaptionerKind
from service.kinds.classifier import ClassifierKind
from service.kinds.generator import GeneratorKind
from service.kinds.tensor import TensorKind

#: Every kind the server serves, by the manifest's `kind`.
KINDS: dict[str, ModelKind] = {
    kind.name: kind for kind in (ClassifierKind(), GeneratorKind(), CaptionerKind(), TensorKind())
}
#: Each task's request type -> how errors name it, as the kinds that answer it declare.
TASK_NAMES: dict[type, TaskName] = {
    request: named for kind in KINDS.values() for request, named in kind.answers.items()
}

__all__ = ["KINDS", "TASK_NAMES", "LoadContext", "LoadedModel", "ModelKind", "TaskName"]
