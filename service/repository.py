"""The model repository: what is on disk, which versions are served, and their state.

Layout: `<root>/<model>/config.yaml` and `<root>/<model>/<version>/model.onnx`, versions being
positive integers. Folders starting with "." are work in progress (the trainer publishes a
version by renaming a hidden folder) and are ignored. `refresh()` (called periodically by the
server) loads versions that appear and retires superseded ones: a new version loads and warms
up before it takes traffic; the old one then drains its queue and is unloaded. A version that
fails to load is reported and the versions already serving keep serving.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import yaml
from pydantic import ValidationError

from service.contract.manifest import CONFIG_FILE, Manifest, load_manifest
from service.engine.batching import BatchingOptions
from service.engine.sessions import ModelLoadError, SessionOptions
from service.errors import ModelNotFound, ModelNotReady, clip
from service.kinds import KINDS, LoadContext, LoadedModel
from service.observability import metrics
from service.observability.statistics import VersionStatistics
from service.settings import Settings

log = logging.getLogger(__name__)

#: How long a retired version may take to finish the requests it already accepted.
DRAIN_SECONDS = 30.0


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
    manifest: Manifest | None = None
    loaded: LoadedModel | None = None  # what its kind loaded, while it is READY
    stats: VersionStatistics | None = None  # kept after unloading, for the statistics API
    active: int = 0  # requests that chose this version and have not answered yet

    def in_use(self) -> _InUse:
        """Hold the version for one request: retiring waits for it before releasing the sessions."""
        return _InUse(self)


class _InUse:
    """`with version.in_use():` a plain class rather than `@contextmanager`: it runs for every
    request, and a generator-based context manager costs several times more."""

    __slots__ = ("_version",)

    def __init__(self, version: ModelVersion) -> None:
        self._version = version

    def __enter__(self) -> ModelVersion:
        self._version.active += 1
        return self._version

    def __exit__(self, *_: object) -> None:
        self._version.active -= 1


class Served(NamedTuple):
    """What answers a request: a ready version and its model, or one of the model's parts.
    A named tuple: one is made for every request."""

    version: ModelVersion
    model: LoadedModel

    @property
    def name(self) -> str:
        return self.model.name


@dataclass
class ModelEntry:
    name: str
    manifest: Manifest | None
    error: str = ""
    unloaded_by_request: bool = False
    versions: dict[str, ModelVersion] = field(default_factory=dict)

    def newest_first(self) -> list[ModelVersion]:
        return sorted(self.versions.values(), key=lambda v: int(v.version), reverse=True)


StateListener = Callable[[ModelVersion], None]


class ModelRepository:
    """Scans the repository folder and loads the versions each model's policy asks for."""

    def __init__(
        self,
        root: Path,
        options: SessionOptions,
        batching: BatchingOptions,
        warmup: bool = True,
        settings: Settings | None = None,
    ) -> None:
        """`settings`: the request limits a kind checks requests against (images, beams, sizes)."""
        self.root = root
        self.settings = settings or Settings()
        self.options = options
        self.batching = batching
        self.warmup = warmup
        self._entries: dict[str, ModelEntry] = {}
        self._listeners: list[StateListener] = []
        self._lock = asyncio.Lock()
        self._retiring: dict[str, set[asyncio.Task[None]]] = {}  # model -> versions draining

    def add_listener(self, listener: StateListener) -> None:
        """Called with a version each time its state changes (health, metrics)."""
        self._listeners.append(listener)

    def entries(self) -> list[ModelEntry]:
        return [self._entries[name] for name in sorted(self._entries)]

    def has_ready_version(self, name: str) -> bool:
        entry = self._entries.get(name)
        return entry is not None and any(v.state is VersionState.READY for v in entry.versions.values())

    def get(self, name: str, version: str = "") -> Served:
        """What should answer: the given version, or the newest ready one.

        `<model>.<part>` names a part of a model's version (a captioner's `encoder` and `decoder`).
        """
        entry = self._entries.get(name)
        base, _, part = name.rpartition(".")
        if entry is None and base in self._entries:
            served = self.get(base, version)
            found = served.model.parts.get(part)
            if found is not None:
                return Served(served.version, found)
        chosen = self.version(name, version)
        assert chosen.loaded is not None, "a READY version has its model"
        return Served(chosen, chosen.loaded)

    def version(self, name: str, version: str = "") -> ModelVersion:
        """The given version of a model if it is ready, else the newest ready one."""
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFound(f"model {clip(name)} not found")  # the model asked for, not the whole list
        if entry.manifest is None:
            raise ModelNotReady(f"model {clip(name)} cannot be served: {entry.error}")
        if version:
            found = entry.versions.get(version)
            if found is None:
                served = ", ".join(v.version for v in entry.newest_first()) or "none"
                raise ModelNotFound(f"model {clip(name)} has no version {clip(version)} (known: {served})")
            if found.state is not VersionState.READY:
                raise ModelNotReady(_not_ready_message(found))
            return found
        for candidate in entry.newest_first():
            if candidate.state is VersionState.READY:
                return candidate
        newest = entry.newest_first()
        if newest:
            raise ModelNotReady(_not_ready_message(newest[0]))
        raise ModelNotReady(f"model {clip(name)} has no version yet")

    async def refresh(self) -> None:
        """Bring the served set in line with the disk, except models unloaded by request."""
        async with self._lock:
            for name in _model_names(self.root):
                entry = self._entries.get(name)
                if entry is None or not entry.unloaded_by_request:
                    await self._refresh_model(name)

    async def load(self, name: str) -> None:
        """Load (or reload) a model by request: re-read its config, retry failed versions."""
        if not _is_plain_name(name) or not (self.root / name / CONFIG_FILE).is_file():
            raise ModelNotFound(f"model {clip(name)} not found in the repository")
        async with self._lock:
            entry = self._entries.get(name)
            if entry is not None:
                entry.unloaded_by_request = False
                for version in list(entry.versions.values()):
                    if version.state in (VersionState.FAILED, VersionState.UNLOADED):
                        del entry.versions[version.version]
            await self._refresh_model(name, reread=True)
        entry = self._entries[name]
        if entry.error:
            serving = "; the versions already loaded keep serving" if self.has_ready_version(name) else ""
            raise ModelNotReady(f"model {clip(name)} did not load: {entry.error}{serving}")
        if not self.has_ready_version(name):
            raise ModelNotReady(f"model {clip(name)} did not load: {self._reason(name)}")

    async def unload(self, name: str) -> None:
        """Unload every version of a model by request; polling leaves it unloaded until `load`."""
        async with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise ModelNotFound(f"model {clip(name)} not found")
            entry.unloaded_by_request = True
            for version in entry.versions.values():
                if version.state is VersionState.READY:
                    self._retire(version, "unloaded by request")
        await self.wait_retired(name)

    async def wait_retired(self, name: str | None = None) -> None:
        """Wait until retired versions (of one model, or all) have drained and released their sessions."""
        names = [name] if name is not None else list(self._retiring)
        tasks = [task for n in names for task in self._retiring.get(n, ())]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        """Drain and release every version (server shutdown)."""
        async with self._lock:
            for entry in self._entries.values():
                for version in entry.versions.values():
                    if version.state is VersionState.READY:
                        self._retire(version, "server stopping")
        await self.wait_retired()

    async def _refresh_model(self, name: str, reread: bool = False) -> None:
        model_dir = self.root / name
        entry = self._entries.setdefault(name, ModelEntry(name=name, manifest=None))
        on_disk = _version_names(model_dir)
        newest_is_new = bool(on_disk) and on_disk[0] not in entry.versions
        if entry.manifest is None or newest_is_new or reread:
            # config.yaml describes the newest version: read it again whenever one arrives.
            manifest, error = _read_manifest(name, model_dir)
            if manifest is None:
                if entry.error != error:
                    log.error("model %s: %s", name, error)
                entry.error = error
                if entry.manifest is not None:  # keep serving what is loaded; the new version fails
                    self._fail_new_versions(entry, on_disk, error)
                return
            entry.manifest, entry.error = manifest, ""
        wanted = entry.manifest.version_policy.select(on_disk)
        for version in wanted:
            if version not in entry.versions:
                await self._load(entry, entry.manifest, version)
        ready = [v for v in entry.newest_first() if v.state is VersionState.READY]
        for old in ready:
            if old.version not in wanted and any(v.version in wanted for v in ready):
                self._retire(old, "superseded by a newer version")

    def _fail_new_versions(self, entry: ModelEntry, on_disk: list[str], error: str) -> None:
        for version in on_disk:
            if version in entry.versions:
                break
            failed = ModelVersion(model=entry.name, version=version, path=self.root / entry.name / version)
            entry.versions[version] = failed
            metrics.MODEL_LOAD_FAILURES.labels(entry.name).inc()
            self._set_state(failed, VersionState.FAILED, error)

    async def _load(self, entry: ModelEntry, manifest: Manifest, version: str) -> None:
        loading = ModelVersion(
            model=entry.name, version=version, path=self.root / entry.name / version, manifest=manifest
        )
        entry.versions[version] = loading
        self._notify(loading)
        started = time.perf_counter()
        stats = VersionStatistics(entry.name, version)
        context = LoadContext(
            model=entry.name,
            version=version,
            stats=stats,
            sessions=self.options,
            batching=self.batching,
            settings=self.settings,
            warmup=self.warmup,
        )
        try:
            kind = KINDS.get(manifest.kind)
            if kind is None:
                served = ", ".join(KINDS)
                raise ModelLoadError(
                    f"this server cannot serve models of kind {manifest.kind!r} (it serves: {served})"
                )
            loaded = await asyncio.to_thread(kind.load, manifest, loading.path, context)
        except ModelLoadError as exc:
            log.error("model %s version %s failed to load: %s", entry.name, version, exc)
            metrics.MODEL_LOAD_FAILURES.labels(entry.name).inc()
            self._set_state(loading, VersionState.FAILED, str(exc))
            return
        metrics.MODEL_LOAD_DURATION.labels(entry.name).observe(time.perf_counter() - started)
        loading.loaded, loading.stats, loading.provider = loaded, stats, loaded.provider
        log.info("model %s version %s ready on %s", entry.name, version, loading.provider)
        self._set_state(loading, VersionState.READY, "")

    def _retire(self, version: ModelVersion, reason: str) -> None:
        """Stop new traffic at once; let accepted requests finish; then release the session."""
        self._set_state(version, VersionState.UNLOADED, reason)

        async def drain() -> None:
            deadline = time.monotonic() + DRAIN_SECONDS
            while version.active and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            loaded, version.loaded = version.loaded, None
            if loaded is not None:
                await loaded.close()

        task = asyncio.get_running_loop().create_task(drain())
        draining = self._retiring.setdefault(version.model, set())
        draining.add(task)
        task.add_done_callback(draining.discard)

    def _reason(self, name: str) -> str:
        entry = self._entries.get(name)
        if entry is None:
            return "unknown model"
        if entry.error:
            return entry.error
        reasons = [f"version {v.version}: {v.reason}" for v in entry.newest_first() if v.reason]
        return "; ".join(reasons) or "no version on disk"

    def _set_state(self, version: ModelVersion, state: VersionState, reason: str) -> None:
        version.state = state
        version.reason = reason
        self._notify(version)

    def _notify(self, version: ModelVersion) -> None:
        for listener in self._listeners:
            listener(version)


def _read_manifest(name: str, model_dir: Path) -> tuple[Manifest | None, str]:
    """The model's manifest, or None and why it cannot be used."""
    try:
        manifest = load_manifest(model_dir)
    except OSError as exc:  # the message would carry the server's paths
        return None, f"cannot read {CONFIG_FILE}: {exc.strerror or type(exc).__name__}"
    except (ValidationError, ValueError, yaml.YAMLError) as exc:
        return None, f"invalid {CONFIG_FILE}: {_one_line(exc)}"
    if manifest.name != name:
        return None, f"{CONFIG_FILE} names the model {manifest.name!r} but its folder is {name!r}"
    return manifest, ""


def _is_plain_name(name: str) -> bool:
    """A model name is one plain path component: no separators, no dots in front, no tricks."""
    return bool(name) and name == Path(name).name and not name.startswith(".") and "\\" not in name


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
