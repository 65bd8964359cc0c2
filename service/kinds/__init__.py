"""Model kinds as plugins: each module loads its kind and answers its tasks; the registry names them.

Adding a kind = one module with a `ModelKind` + one line in `KINDS` (+ its proto messages and a
domain request type if it has a task RPC). Nothing outside this package names a kind.
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
