"""The model repository: what is on disk, which versions are served, and their state.

Layout: `<root>/<model>/config.yaml` and `<root>/<model>/<version>/model.onnx`, versions being
positive integers. Folders starting with "." are work in progress (the trainer publishes a
version by renaming a hidden folder) and are ignored. Models and versions that appear later
are picked up by `refresh()`, which the server calls periodically.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import ValidationError

from service.errors import ModelNotFound, ModelNotReady
from service.manifest import CONFIG_FILE, Manifest, load_manifest
from service.pipelines import Pipeline, build_pipeline
from service.runtime import ModelLoadError, ModelSession, SessionOptions

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"


class VersionState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADED = "unloaded"


@dataclass
class ModelVersion:
    """One version of a model and what the server knows about it."""

    model: str
    version: str
    path: Path
    state: VersionState = VersionState.LOADING
    reason: str = ""
    provider: str = ""
    pipeline: Pipeline | None = None


@dataclass
class ModelEntry:
    name: str
    manifest: Manifest | None
    error: str = ""
    versions: dict[str, ModelVersion] = field(default_factory=dict)

    def newest_first(self) -> list[ModelVersion]:
        return sorted(self.versions.values(), key=lambda v: int(v.version), reverse=True)


StateListener = Callable[[ModelVersion], None]


class ModelRepository:
    """Scans the repository folder and loads the versions each model's policy asks for."""

    def __init__(self, root: Path, options: SessionOptions, warmup: bool = True) -> None:
        self.root = root
        self.options = options
        self.warmup = warmup
        self._entries: dict[str, ModelEntry] = {}
        self._listeners: list[StateListener] = []
        self._refresh_lock = asyncio.Lock()

    def add_listener(self, listener: StateListener) -> None:
        """Called with a version each time its state changes (health, metrics)."""
        self._listeners.append(listener)

    def entries(self) -> list[ModelEntry]:
        return [self._entries[name] for name in sorted(self._entries)]

    def has_ready_version(self, name: str) -> bool:
        entry = self._entries.get(name)
        return entry is not None and any(v.state is VersionState.READY for v in entry.versions.values())

    def get(self, name: str, version: str = "") -> ModelVersion:
        """The version that should answer: the given one, or the newest ready one."""
        entry = self._entries.get(name)
        if entry is None:
            known = ", ".join(sorted(self._entries)) or "none"
            raise ModelNotFound(f"model {name!r} not found (models: {known})")
        if entry.manifest is None:
            raise ModelNotReady(f"model {name!r} cannot be served: {entry.error}")
        if version:
            found = entry.versions.get(version)
            if found is None:
                served = ", ".join(v.version for v in entry.newest_first()) or "none"
                raise ModelNotFound(f"model {name!r} has no version {version!r} (served: {served})")
            if found.state is not VersionState.READY:
                raise ModelNotReady(_not_ready_message(found))
            return found
        for candidate in entry.newest_first():
            if candidate.state is VersionState.READY:
                return candidate
        newest = entry.newest_first()
        if newest:
            raise ModelNotReady(_not_ready_message(newest[0]))
        raise ModelNotReady(f"model {name!r} has no version yet")

    async def refresh(self) -> None:
        """Bring the served set in line with the disk: load new versions, unload superseded ones."""
        async with self._refresh_lock:
            for name in _model_names(self.root):
                await self._refresh_model(name)

    async def _refresh_model(self, name: str) -> None:
        model_dir = self.root / name
        entry = self._entries.setdefault(name, ModelEntry(name=name, manifest=None))
        on_disk = _version_names(model_dir)
        newest_is_new = bool(on_disk) and on_disk[0] not in entry.versions
        if entry.manifest is None or newest_is_new:
            # config.yaml describes the newest version: read it again whenever one arrives.
            manifest, error = self._read_manifest(name, model_dir)
            if manifest is None:
                if entry.error != error:
                    log.error("model %s: %s", name, error)
                entry.error = error
                if entry.manifest is not None:  # keep serving what is loaded; the new version fails
                    self._fail_new_versions(entry, on_disk, error)
                return
            entry.manifest, entry.error = manifest, ""
        wanted = on_disk[: entry.manifest.version_policy.latest]
        for version in wanted:
            if version not in entry.versions:
                await self._load(entry, version)
        ready = [v for v in entry.newest_first() if v.state is VersionState.READY]
        for old in ready:
            if old.version not in wanted and any(int(v.version) > int(old.version) for v in ready):
                self._set_state(old, VersionState.UNLOADED, "superseded by a newer version")
                old.pipeline = None

    @staticmethod
    def _read_manifest(name: str, model_dir: Path) -> tuple[Manifest | None, str]:
        """The model's manifest, or None and why it cannot be used."""
        try:
            manifest = load_manifest(model_dir)
        except (OSError, ValidationError, ValueError, yaml.YAMLError) as exc:
            return None, f"invalid {CONFIG_FILE}: {_one_line(exc)}"
        if manifest.name != name:
            return None, f"{CONFIG_FILE} names the model {manifest.name!r} but its folder is {name!r}"
        return manifest, ""

    def _fail_new_versions(self, entry: ModelEntry, on_disk: list[str], error: str) -> None:
        for version in on_disk:
            if version in entry.versions:
                break
            failed = ModelVersion(model=entry.name, version=version, path=self.root / entry.name / version)
            entry.versions[version] = failed
            self._set_state(failed, VersionState.FAILED, error)

    async def _load(self, entry: ModelEntry, version: str) -> None:
        assert entry.manifest is not None
        loading = ModelVersion(model=entry.name, version=version, path=self.root / entry.name / version)
        entry.versions[version] = loading
        self._notify(loading)
        try:
            pipeline = await asyncio.to_thread(self._build, entry.manifest, loading.path)
        except ModelLoadError as exc:
            log.error("model %s version %s failed to load: %s", entry.name, version, exc)
            self._set_state(loading, VersionState.FAILED, str(exc))
            return
        loading.pipeline = pipeline
        loading.provider = pipeline.session.provider
        log.info("model %s version %s ready on %s", entry.name, version, loading.provider)
        self._set_state(loading, VersionState.READY, "")

    def _build(self, manifest: Manifest, version_dir: Path) -> Pipeline:
        model_file = version_dir / MODEL_FILE
        if not model_file.is_file():
            raise ModelLoadError(f"{model_file.name} is missing in version folder {version_dir.name}")
        pipeline = build_pipeline(manifest, ModelSession(model_file, self.options))
        if self.warmup:
            pipeline.warmup()
        return pipeline

    def _set_state(self, version: ModelVersion, state: VersionState, reason: str) -> None:
        version.state = state
        version.reason = reason
        self._notify(version)

    def _notify(self, version: ModelVersion) -> None:
        for listener in self._listeners:
            listener(version)


def _model_names(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / CONFIG_FILE).exists()
    )


def _version_names(model_dir: Path) -> list[str]:
    """Published versions, newest first."""
    versions = [p.name for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0]
    return sorted(versions, key=int, reverse=True)


def _not_ready_message(version: ModelVersion) -> str:
    text = f"model {version.model!r} version {version.version} is {version.state.value}"
    return f"{text}: {version.reason}" if version.reason else text


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
