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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml
from pydantic import ValidationError

from service.contract.manifest import CONFIG_FILE, Manifest, load_manifest
from service.engine.batching import BatchingOptions, CheckFunction, DynamicBatcher
from service.engine.sessions import ModelLoadError, ModelSession, SessionOptions, one_line_reason
from service.errors import ModelNotFound, ModelNotReady
from service.kinds import CaptionerPipeline, Pipeline, build_pipeline
from service.kinds.captioner.beam_search import DecodeLoop, DecodingOptions
from service.observability import metrics
from service.observability.statistics import VersionStatistics

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
#: Kinds the server serves: a single model.onnx, or (captioner) an encoder and a decoder graph.
SERVABLE_KINDS = ("classifier", "generator", "captioner", "tensor")
#: A captioner's graphs are also KServe v2 tensor models of their own: `<captioner>.encoder`, ...
CAPTIONER_PARTS = ("encoder", "decoder")
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
    session: ModelSession | None = None
    pipeline: Pipeline | None = None  # None for kind `tensor`
    batcher: DynamicBatcher | None = None
    stats: VersionStatistics | None = None
    active: int = 0  # requests that chose this version and have not answered yet
    #: A captioner's graphs as tensor models of their own ("encoder", "decoder"), named `<model>.<part>`.
    parts: dict[str, ModelVersion] = field(default_factory=dict)
    parent: ModelVersion | None = None  # the captioner version a part belongs to
    model_file: str = MODEL_FILE  # the ONNX file behind `session`, as ModelConfig names it

    @contextmanager
    def in_use(self) -> Iterator[ModelVersion]:
        """Hold the version for one request: retiring waits for it before releasing the session."""
        holder = self.parent or self
        holder.active += 1
        try:
            yield self
        finally:
            holder.active -= 1


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
        decoding: DecodingOptions | None = None,
    ) -> None:
        self.root = root
        self.options = options
        self.batching = batching
        self.warmup = warmup
        self.decoding = decoding or DecodingOptions()
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

    def get(self, name: str, version: str = "") -> ModelVersion:
        """The version that should answer: the given one, or the newest ready one.

        `<captioner>.encoder` and `<captioner>.decoder` name a captioner version's graphs.
        """
        entry = self._entries.get(name)
        base, _, part = name.rpartition(".")
        if entry is None and part in CAPTIONER_PARTS and self._is_captioner(base):
            return self.get(base, version).parts[part]
        if entry is None:
            known = ", ".join(sorted(self._entries)) or "none"
            raise ModelNotFound(f"model {name!r} not found (models: {known})")
        if entry.manifest is None:
            raise ModelNotReady(f"model {name!r} cannot be served: {entry.error}")
        if version:
            found = entry.versions.get(version)
            if found is None:
                served = ", ".join(v.version for v in entry.newest_first()) or "none"
                raise ModelNotFound(f"model {name!r} has no version {version!r} (known: {served})")
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

    def _is_captioner(self, name: str) -> bool:
        entry = self._entries.get(name)
        return entry is not None and entry.manifest is not None and entry.manifest.kind == "captioner"

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
            raise ModelNotFound(f"model {name!r} not found in the repository")
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
            raise ModelNotReady(f"model {name!r} did not load: {entry.error}{serving}")
        if not self.has_ready_version(name):
            raise ModelNotReady(f"model {name!r} did not load: {self._reason(name)}")

    async def unload(self, name: str) -> None:
        """Unload every version of a model by request; polling leaves it unloaded until `load`."""
        async with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise ModelNotFound(f"model {name!r} not found")
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
        try:
            session, pipeline = await asyncio.to_thread(self._build, manifest, loading.path)
        except ModelLoadError as exc:
            log.error("model %s version %s failed to load: %s", entry.name, version, exc)
            metrics.MODEL_LOAD_FAILURES.labels(entry.name).inc()
            self._set_state(loading, VersionState.FAILED, str(exc))
            return
        metrics.MODEL_LOAD_DURATION.labels(entry.name).observe(time.perf_counter() - started)
        loading.session, loading.pipeline = session, pipeline
        loading.stats = VersionStatistics(entry.name, version)
        check = pipeline.feeds_check if pipeline is not None else None
        loading.batcher = self._batcher(manifest, session, loading.stats, check)
        loading.provider = session.provider
        if isinstance(pipeline, CaptionerPipeline):
            self._captioner_parts(loading, manifest, pipeline)
        log.info("model %s version %s ready on %s", entry.name, version, loading.provider)
        self._set_state(loading, VersionState.READY, "")

    def _captioner_parts(
        self, version: ModelVersion, manifest: Manifest, pipeline: CaptionerPipeline
    ) -> None:
        """The decode loop, and the encoder and decoder as tensor models of their own.

        The encoder part shares the version's session, batcher and statistics (Caption requests
        run their images through that batcher); the decoder part has its own batcher for KServe
        calls, and its statistics also count the decode loop's steps.
        """
        assert manifest.captioner is not None and version.stats is not None
        spec = manifest.captioner
        version.model_file = spec.encoder_file
        encoder = ModelVersion(
            model=f"{version.model}.encoder",
            version=version.version,
            path=version.path,
            state=VersionState.READY,
            manifest=manifest,
            session=pipeline.encoder,
            batcher=version.batcher,
            stats=version.stats,
            provider=pipeline.encoder.provider,
            parent=version,
            model_file=spec.encoder_file,
        )
        decoder_stats = VersionStatistics(f"{version.model}.decoder", version.version)
        decoder = ModelVersion(
            model=f"{version.model}.decoder",
            version=version.version,
            path=version.path,
            state=VersionState.READY,
            manifest=manifest,
            session=pipeline.decoder,
            batcher=self._batcher(manifest, pipeline.decoder, decoder_stats, pipeline.check_decoder_feeds),
            stats=decoder_stats,
            provider=pipeline.decoder.provider,
            parent=version,
            model_file=spec.decoder_file,
        )
        version.parts = {"encoder": encoder, "decoder": decoder}
        pipeline.loop = DecodeLoop(
            pipeline.decoder.run,
            pipeline.decoder.output_names,
            self.decoding,
            version.model,
            version.version,
            on_step=decoder_stats.ran,
            by_image=pipeline.by_image,
        )

    def _build(self, manifest: Manifest, version_dir: Path) -> tuple[ModelSession, Pipeline | None]:
        if manifest.kind not in SERVABLE_KINDS:
            served = ", ".join(SERVABLE_KINDS)
            raise ModelLoadError(
                f"this server cannot serve models of kind {manifest.kind!r} (it serves: {served})"
            )
        if manifest.kind == "captioner":
            return self._build_captioner(manifest, version_dir)
        model_file = version_dir / MODEL_FILE
        if not model_file.is_file():
            raise ModelLoadError(f"{model_file.name} is missing in version folder {version_dir.name}")
        session = ModelSession(model_file, self.options)
        pipeline = build_pipeline(manifest, session)
        if self.warmup:
            with _warm_up_failures_fail_the_version():
                session.warmup()
                if pipeline is not None:
                    pipeline.warmup()
        return session, pipeline

    def _build_captioner(self, manifest: Manifest, version_dir: Path) -> tuple[ModelSession, Pipeline]:
        """The encoder session (the version's own, behind its batcher) and the captioner pipeline."""
        assert manifest.captioner is not None
        files = [version_dir / manifest.captioner.encoder_file, version_dir / manifest.captioner.decoder_file]
        for path in files:
            if not path.is_file():
                raise ModelLoadError(f"{path.name} is missing in version folder {version_dir.name}")
        encoder, decoder = (ModelSession(path, self.options) for path in files)
        pipeline = CaptionerPipeline(manifest, encoder, decoder)
        if self.warmup:
            with _warm_up_failures_fail_the_version():
                pipeline.warmup()
        return encoder, pipeline

    def _batcher(
        self,
        manifest: Manifest,
        session: ModelSession,
        stats: VersionStatistics,
        check: CheckFunction | None = None,
    ) -> DynamicBatcher:
        """Server defaults, overridden by the model's config; no batch axis means no merging.

        `check`: the kind's checks of one request's arrays, run before it joins a batch.
        """
        chosen = manifest.batching
        defaults = self.batching
        options = BatchingOptions(
            max_batch_size=defaults.max_batch_size
            if chosen.max_batch_size is None
            else chosen.max_batch_size,
            max_queue_delay=defaults.max_queue_delay
            if chosen.max_queue_delay is None
            else chosen.max_queue_delay,
            max_queue_size=chosen.max_queue_size or defaults.max_queue_size,
            instances=chosen.instances or defaults.instances,
            inline=defaults.inline,
        )
        if not session.batchable:
            options = replace(options, max_batch_size=0, max_queue_delay=0.0)
        return DynamicBatcher(
            session.run,
            options,
            on_run=lambda report: stats.ran(report.rows, report.seconds),
            on_dequeue=lambda report: stats.queued(report.seconds),
            check=check,
            on_isolation=lambda report: stats.isolated(report.retries, report.alone, report.with_batch),
        )

    def _retire(self, version: ModelVersion, reason: str) -> None:
        """Stop new traffic at once; let accepted requests finish; then release the session."""
        self._set_state(version, VersionState.UNLOADED, reason)

        async def drain() -> None:
            deadline = time.monotonic() + DRAIN_SECONDS
            while version.active and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            batcher, pipeline, parts = version.batcher, version.pipeline, version.parts
            version.batcher = version.pipeline = version.session = None
            version.parts = {}
            if isinstance(pipeline, CaptionerPipeline):
                await pipeline.close()
            if batcher is not None:
                await batcher.close()
            for part in parts.values():
                if part.batcher is not None and part.batcher is not batcher:
                    await part.batcher.close()

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


@contextmanager
def _warm_up_failures_fail_the_version() -> Iterator[None]:
    """A graph that cannot run its warm-up input fails its version (FAILED, with the reason), like
    a graph that cannot load; it must not stop the server."""
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as exc:  # onnxruntime's own types, or a domain error from the session
        raise ModelLoadError(f"the warm-up run failed: {one_line_reason(exc)}") from exc


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
