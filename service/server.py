"""Builds and runs the gRPC server: servicers, health, reflection, metrics port, graceful stop.

Health entries (grpc.health.v1):
- "" (readiness): SERVING once every model present at start is loaded or marked failed, and while at
  least CONVSERVE_MIN_MODELS models have a ready version (and, with require_gpu, every one runs on CUDA);
- "<model>": SERVING while at least one version of that model is ready;
- "liveness": SERVING while the process answers at all.

With TLS (CONVSERVE_TLS_CERT_FILE/KEY_FILE, optionally CLIENT_CA_FILE for mutual TLS) the gRPC and HTTP
ports speak TLS only, and a plaintext port (CONVSERVE_HEALTH_PORT, 8003 by default then) serves the
Health service and nothing else, for kubelet's gRPC probes, which cannot speak TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import ssl

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from service._proto.convserve.v1 import vision_pb2, vision_pb2_grpc
from service._proto.inference import grpc_predict_v2_pb2 as kserve_pb2
from service._proto.inference import grpc_predict_v2_pb2_grpc as kserve_grpc
from service.dataplane import DataPlane
from service.engine.batching import BatchingOptions
from service.engine.sessions import REQUIRE_GPU_FAILURE, SessionOptions
from service.errors import Unauthenticated, status_of
from service.observability import metrics
from service.observability.logs import ACCESS_LOG
from service.repository import ModelRepository, ModelVersion, VersionState
from service.security.auth import AuthPolicy
from service.security.tls import grpc_server_credentials, http_ssl_context, tls_enabled
from service.settings import Settings, grpc_threads_low, runs_inline, usable_cpus
from service.transports.grpc.kserve import KServeServicer
from service.transports.grpc.registration import register
from service.transports.grpc.threads import threads_started_at_low_priority
from service.transports.grpc.vision import VisionServicer
from service.transports.http.routes import build_app
from service.transports.http.site import name_the_server, start_site

log = logging.getLogger(__name__)

LIVENESS = "liveness"
OVERALL = ""
#: The plaintext health port when TLS is on and CONVSERVE_HEALTH_PORT is unset.
DEFAULT_TLS_HEALTH_PORT = 8003


def health_port(settings: Settings) -> int:
    """The plaintext health-only port: -1 when off."""
    if settings.health_port is not None:
        return settings.health_port
    return DEFAULT_TLS_HEALTH_PORT if tls_enabled(settings) else -1


def new_grpc_server(settings: Settings) -> grpc.aio.Server:
    """A grpc.aio server with our channel arguments; on one core (or when asked), the threads grpc
    starts for it run below the event loop (`service.transports.grpc.threads`)."""
    with threads_started_at_low_priority(grpc_threads_low(settings.grpc_threads_priority)):
        return grpc.aio.server(options=grpc_server_options(settings))


def grpc_server_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel arguments of the gRPC server: message sizes, keepalive and the maximum connection age.

    Keepalive pings find dead clients; the maximum connection age sends every connection a GOAWAY
    after a while, so clients reconnect and re-resolve, and replicas added later get their share.
    """

    def ms(seconds: float) -> int:
        return max(1, round(seconds * 1000))

    options = [
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        ("grpc.keepalive_time_ms", ms(settings.keepalive_time_seconds)),
        ("grpc.keepalive_timeout_ms", ms(settings.keepalive_timeout_seconds)),
        # Our own pings also on idle connections; clients may ping idle connections too, this often:
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", ms(settings.keepalive_min_ping_interval_seconds)),
    ]
    if settings.max_connection_age_seconds > 0:
        options += [
            ("grpc.max_connection_age_ms", ms(settings.max_connection_age_seconds)),
            ("grpc.max_connection_age_grace_ms", round(settings.max_connection_age_grace_seconds * 1000)),
        ]
    return options


#: Open connections the metrics port takes (scrapers are few).
METRICS_MAX_CONNECTIONS = 64


def metrics_app(policy: AuthPolicy | None) -> web.Application:
    """GET /metrics (and /): the Prometheus text format; with `policy`, only for a bearer token."""

    async def scrape(request: web.Request) -> web.Response:
        if policy is not None:
            try:
                policy.check_token(request.headers.get("Authorization"))
            except Unauthenticated as exc:
                return web.Response(
                    status=status_of(exc).http, text=str(exc), headers={"WWW-Authenticate": "Bearer"}
                )
        body = await asyncio.to_thread(generate_latest, REGISTRY)  # milliseconds with many series
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.on_response_prepare.append(name_the_server)  # not aiohttp's, naming its and Python's version
    app.router.add_get("/metrics", scrape)
    app.router.add_get("/", scrape)
    return app


def raise_open_files_limit() -> None:
    """The soft limit of open files up to the hard one: the HTTP, metrics and gRPC ports share it,
    and the HTTP ports' connection limits are meant to be reached long before it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def session_options(settings: Settings) -> SessionOptions:
    """How every onnxruntime session is made; intra-op threads default to the CPUs the process may use."""
    return SessionOptions(
        providers=tuple(settings.providers),
        require_gpu=settings.require_gpu,
        explicit_providers="providers" in settings.model_fields_set,
        intra_op_threads=settings.intra_op_threads or usable_cpus(),
        spinning=settings.ort_spinning,
    )


class ConvserveServer:
    """The whole server; `await start()`, then `await wait_for_termination()` or `await stop()`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.repository = ModelRepository(
            settings.model_repository,
            session_options(settings),
            BatchingOptions(
                max_batch_size=settings.max_batch_size,
                max_queue_delay=settings.max_queue_delay,
                max_queue_size=settings.max_queue_size,
                instances=settings.instances,
                inline=runs_inline(settings.execution),
            ),
            warmup=settings.warmup,
            settings=settings,
        )
        self.health = health.aio.HealthServicer()
        self.grpc_port = 0
        self.http_port = 0
        self.metrics_port = 0
        self._http: web.AppRunner | None = None
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self.health_port = 0
        self._metrics: web.AppRunner | None = None
        self._plane: DataPlane | None = None
        self._poller: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._ready_series: dict[tuple[str, str], str] = {}
        self._ready = False  # KServe ServerReady, in step with the overall health entry
        self._started = False  # the models present at start are loaded (or failed)
        self._stopping = False
        self._not_ready_because = "starting"

    async def start(self) -> None:
        """Bind the ports, answer liveness at once, load the models, then report ready."""
        settings = self.settings
        tls = tls_enabled(settings)
        policy = AuthPolicy.from_settings(settings)
        raise_open_files_limit()
        log.info(
            "onnxruntime: %d intra-op thread(s) per session, %s",
            self.repository.options.intra_op_threads,
            "run on the event loop" if runs_inline(settings.execution) else "run in a thread per instance",
        )
        await self._start_metrics(policy)
        server = new_grpc_server(settings)
        plane = self._plane = DataPlane(self.repository, settings, lambda: self._ready)
        vision, kserve = VisionServicer(plane), KServeServicer(plane)
        # each method wrapped once: access control, request id, errors, access log, metrics
        register(server, vision_pb2_grpc.add_VisionServicer_to_server, vision, policy)
        register(server, kserve_grpc.add_GRPCInferenceServiceServicer_to_server, kserve, policy)
        register(server, health_pb2_grpc.add_HealthServicer_to_server, self.health, policy)
        services = [
            vision_pb2.DESCRIPTOR.services_by_name["Vision"].full_name,
            kserve_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ]
        register(
            server,
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server,
            reflection.aio.ReflectionServicer(services),
            policy,
        )
        address = f"{settings.host}:{settings.grpc_port}"
        try:
            if tls:
                self.grpc_port = server.add_secure_port(address, grpc_server_credentials(settings))
            else:
                self.grpc_port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {address} (is another server using the port?)") from exc
        ssl_context = http_ssl_context(settings) if tls else None
        self.repository.add_listener(self._on_version_change)
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(OVERALL, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._server = server
        log.info(
            "gRPC listening on %s:%d (%s; auth %s, repository control %s)",
            settings.host,
            self.grpc_port,
            ("mutual TLS" if settings.tls_client_ca_file else "TLS") if tls else "plaintext",
            "on" if policy.enabled else "off",
            settings.repository_control,
        )
        await self._start_health_port()
        app = build_app(
            plane,
            settings.max_message_bytes,
            policy,
            settings.max_json_bytes,
            console=settings.console,
            body_timeout=settings.http_body_timeout_seconds,
        )
        await self._start_http(app, ssl_context)
        await self.repository.refresh()
        self._started = True
        await self._update_readiness()
        if settings.repository_poll_seconds > 0:
            self._poller = asyncio.create_task(self._poll(settings.repository_poll_seconds))

    def _readiness_problem(self) -> str:
        """Why the server must not take traffic now; empty when it may."""
        without_gpu = self._versions_without_gpu()
        if without_gpu:  # a GPU deployment on a node without working CUDA must not take traffic
            return f"require_gpu: CUDA is not active for {', '.join(without_gpu)}"
        ready = [e.name for e in self.repository.entries() if self.repository.has_ready_version(e.name)]
        if len(ready) < self.settings.min_models:
            return (
                f"min_models: {len(ready)} model(s) ready ({', '.join(ready) or 'none'}) of at least "
                f"{self.settings.min_models} expected in {self.settings.model_repository}"
            )
        return ""

    async def _update_readiness(self) -> None:
        """Set the overall health entry and ServerReady from the models' states; log each change."""
        if not self._started or self._stopping:
            return
        problem = self._readiness_problem()
        if problem == self._not_ready_because:
            return
        self._not_ready_because = problem
        self._ready = not problem
        if problem:
            await self.health.set(OVERALL, health_pb2.HealthCheckResponse.NOT_SERVING)
            log.error("not ready: %s", problem)
        else:
            await self.health.set(OVERALL, health_pb2.HealthCheckResponse.SERVING)
            log.info(
                "ready: %d model(s) in %s", len(self.repository.entries()), self.settings.model_repository
            )

    def _versions_without_gpu(self) -> list[str]:
        """`model/version` of every version that failed to load because require_gpu found no CUDA."""
        return [
            f"{version.model}/{version.version}"
            for entry in self.repository.entries()
            for version in entry.versions.values()
            if version.state is VersionState.FAILED and version.reason.startswith(REQUIRE_GPU_FAILURE)
        ]

    async def wait_for_termination(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop gracefully."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("signal received: draining for up to %.1f s", self.settings.shutdown_grace_seconds)
        await self.stop()

    async def stop(self) -> None:
        """NOT_SERVING first (so load balancers stop sending), then finish in-flight work, then close."""
        self._stopping = True
        self._ready = False
        await self.health.enter_graceful_shutdown()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        grace = self.settings.shutdown_grace_seconds
        stopping = [self._server.stop(grace)] if self._server is not None else []
        if self._health_server is not None:
            stopping.append(self._health_server.stop(grace))
        if self._http is not None:
            stopping.append(self._http.cleanup())
        await asyncio.gather(*stopping)
        await self.repository.close()
        if self._plane is not None:
            self._plane.close()
        if self._metrics is not None:
            await self._metrics.cleanup()
        ACCESS_LOG.flush()  # the drained calls' lines, before the last line
        log.info("stopped")

    async def _start_health_port(self) -> None:
        """The plaintext port with the Health service only (same entries), for kubelet's gRPC probes."""
        port = health_port(self.settings)
        if port < 0:
            return
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        address = f"{self.settings.host}:{port}"
        try:
            self.health_port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on health port {address}: {exc}") from exc
        await server.start()
        self._health_server = server
        log.info("plaintext health (grpc.health.v1 only) on %s:%d", self.settings.host, self.health_port)

    async def _start_http(self, app: web.Application, ssl_context: ssl.SSLContext | None = None) -> None:
        """KServe v2 over HTTP/REST on the same event loop, batchers and metrics as gRPC."""
        if self.settings.http_port < 0:
            return
        settings = self.settings
        try:
            self._http, self.http_port = await start_site(
                app,
                settings.host,
                settings.http_port,
                idle_timeout=settings.http_idle_timeout_seconds,
                max_connections=settings.http_max_connections,
                shutdown_timeout=settings.shutdown_grace_seconds,
                ssl_context=ssl_context,
            )
        except OSError as exc:
            raise OSError(f"cannot listen on HTTP port {settings.http_port}: {exc}") from exc
        log.info("HTTP listening on %s:%d", settings.host, self.http_port)

    async def _start_metrics(self, policy: AuthPolicy) -> None:
        """/metrics from the event loop (no thread per connection), with the HTTP port's bounds."""
        settings = self.settings
        if settings.metrics_port < 0:
            return
        if settings.metrics_auth and not (policy.tokens or policy.admin_tokens):
            raise ValueError("metrics_auth needs tokens to check: set auth_tokens or admin_tokens")
        host = settings.metrics_host or settings.host
        try:
            self._metrics, self.metrics_port = await start_site(
                metrics_app(policy if settings.metrics_auth else None),
                host,
                settings.metrics_port,
                idle_timeout=settings.http_idle_timeout_seconds,
                max_connections=METRICS_MAX_CONNECTIONS,
                shutdown_timeout=1.0,
            )
        except OSError as exc:
            raise OSError(f"cannot listen on metrics port {settings.metrics_port}: {exc}") from exc
        log.info(
            "metrics on http://%s:%d/metrics%s",
            host,
            self.metrics_port,
            " (token)" if settings.metrics_auth else "",
        )

    async def _poll(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await self.repository.refresh()
            except Exception:
                log.exception("repository refresh failed; will retry")

    def _on_version_change(self, version: ModelVersion) -> None:
        """Keep the readiness gauge and the model's health entry in step with its versions."""
        key = (version.model, version.version)
        previous = self._ready_series.get(key)
        if previous is not None and previous != version.provider:
            metrics.MODEL_READY.remove(version.model, version.version, previous)
        self._ready_series[key] = version.provider
        ready = version.state is VersionState.READY
        metrics.MODEL_READY.labels(version.model, version.version, version.provider).set(1 if ready else 0)
        serving = self.repository.has_ready_version(version.model)
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        loop = asyncio.get_running_loop()
        for task in (
            loop.create_task(self.health.set(version.model, status)),
            loop.create_task(self._update_readiness()),
        ):
            self._background.add(task)
            task.add_done_callback(self._background.discard)
