"""Transport security and auth against real servers: TLS, mutual TLS, the plaintext health port,
bearer tokens (gRPC and HTTP), repository control, and no token in the log.

Certificates are made here with the openssl CLI: a throwaway CA, a server certificate for
127.0.0.1/localhost and a client certificate, valid for a day.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import RunningServer, start_server
from drawing import draw_digit, png_bytes
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._proto.convserve.v1 import vision_pb2, vision_pb2_grpc
from service._proto.inference import grpc_predict_v2_pb2 as pb
from service._proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from service.client import VisionClient
from service.errors import InvalidArgument, status_of
from service.security.auth import AuthError, AuthPolicy, _digest, check_model_name, read_tokens
from service.settings import Settings

USER_TOKEN = "user-" + secrets.token_hex(16)
ADMIN_TOKEN = "admin-" + secrets.token_hex(16)
WRONG_TOKEN = "wrong-" + secrets.token_hex(16)
TIMEOUT = 30  # generous: a loaded machine must never fail these


# Certificates ------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def _issue(folder: Path, name: str, subject: str, extensions: str) -> None:
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=folder,
    )  # fmt: skip
    (folder / f"{name}.ext").write_text(
        extensions + "\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
        "basicConstraints=critical,CA:FALSE\n"
    )
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "1", "-sha256", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=folder,
    )  # fmt: skip


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("certs")
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-sha256", "-subj", "/CN=convserve test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip
    _issue(
        folder,
        "server",
        "/CN=localhost",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
        "keyUsage=critical,digitalSignature",
    )
    _issue(folder, "client", "/CN=convserve test client", "extendedKeyUsage=clientAuth")
    return folder


def _tls_env(certs: Path, mutual: bool) -> dict[str, str]:
    env = {
        "CONVSERVE_TLS_CERT_FILE": str(certs / "server.crt"),
        "CONVSERVE_TLS_KEY_FILE": str(certs / "server.key"),
    }
    if mutual:
        env["CONVSERVE_TLS_CLIENT_CA_FILE"] = str(certs / "ca.crt")
    return env


def _digit() -> bytes:
    return png_bytes(draw_digit("3"))


def _classify_label(client: VisionClient) -> str:
    return client.classify([_digit()], top_k=1, timeout=TIMEOUT).results[0].predictions[0].label


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def _https(url: str, context: ssl.SSLContext) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=TIMEOUT, context=context) as response:
        return response.status, response.read()


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


# TLS ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(trained_lenet: Path, certs: Path, tmp_path_factory) -> Iterator[RunningServer]:
    log = tmp_path_factory.mktemp("tls") / "server.log"
    running = start_server(trained_lenet, log, _tls_env(certs, mutual=False), plaintext_health=True)
    yield running
    running.stop()


def test_tls_refuses_plaintext_and_serves_tls_clients(tls_server: RunningServer, certs: Path) -> None:
    with VisionClient(tls_server.target, timeout=TIMEOUT) as plain:
        assert _code(lambda: plain.classify([_digit()])) is grpc.StatusCode.UNAVAILABLE
    with VisionClient(tls_server.target, timeout=TIMEOUT, tls_ca=certs / "ca.crt") as client:
        assert _classify_label(client) == "3"
        assert client.health("") == "SERVING"
    status, body = _https(
        tls_server.http_url.replace("http://", "https://") + "/v2/health/ready",
        ssl.create_default_context(cafile=str(certs / "ca.crt")),
    )
    assert (status, json.loads(body)) == (200, {"ready": True})
    with pytest.raises(OSError):  # plaintext HTTP to the TLS port gets no HTTP answer
        urllib.request.urlopen(tls_server.http_url + "/v2/health/ready", timeout=TIMEOUT)


def test_plaintext_health_port_serves_health_and_nothing_else(tls_server: RunningServer) -> None:
    assert tls_server.health_target is not None
    with grpc.insecure_channel(tls_server.health_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "liveness", "lenet5"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        vision = vision_pb2_grpc.VisionStub(channel)
        request = vision_pb2.ClassifyRequest(model="lenet5", images=[vision_pb2.Image(encoded=_digit())])
        assert _code(lambda: vision.Classify(request, timeout=TIMEOUT)) is grpc.StatusCode.UNIMPLEMENTED
        kserve = pb_grpc.GRPCInferenceServiceStub(channel)
        assert _code(lambda: kserve.ServerReady(pb.ServerReadyRequest(), timeout=TIMEOUT)) is (
            grpc.StatusCode.UNIMPLEMENTED
        )
    done = _cli("health", "--target", tls_server.health_target, "--timeout", str(TIMEOUT))
    assert (done.returncode, done.stdout.strip()) == (0, "SERVING"), done.stderr


def test_cli_speaks_tls(tls_server: RunningServer, certs: Path, tmp_path: Path) -> None:
    image = tmp_path / "three.png"
    image.write_bytes(_digit())
    target = ["--target", tls_server.target, "--timeout", str(TIMEOUT)]
    done = _cli("classify", str(image), "--json", "--tls-ca", str(certs / "ca.crt"), *target)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["predictions"][0]["label"] == "3"
    assert _cli("models", *target).returncode == 1  # plaintext against TLS


def test_mutual_tls_needs_a_client_certificate(trained_lenet: Path, certs: Path, tmp_path: Path) -> None:
    server = start_server(
        trained_lenet, tmp_path / "server.log", _tls_env(certs, mutual=True), plaintext_health=True
    )
    try:
        ca = certs / "ca.crt"
        with VisionClient(server.target, timeout=TIMEOUT, tls_ca=ca) as anonymous:
            assert _code(lambda: anonymous.classify([_digit()])) is grpc.StatusCode.UNAVAILABLE
        cert, key = certs / "client.crt", certs / "client.key"
        with VisionClient(server.target, timeout=TIMEOUT, tls_ca=ca, tls_cert=cert, tls_key=key) as client:
            assert _classify_label(client) == "3"
        https = server.http_url.replace("http://", "https://") + "/v2/health/live"
        context = ssl.create_default_context(cafile=str(ca))
        with pytest.raises(OSError) as refused:
            _https(https, context)
        assert not isinstance(refused.value, urllib.error.HTTPError)  # refused in the handshake, no HTTP
        context.load_cert_chain(str(cert), str(key))
        assert _https(https, context)[0] == 200
        target = ["--target", server.target, "--tls-ca", str(ca), "--timeout", str(TIMEOUT)]
        assert _cli("health", *target, "--tls-cert", str(cert), "--tls-key", str(key)).returncode == 0
    finally:
        server.stop()


# Tokens ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_server(trained_lenet: Path, tmp_path_factory) -> Iterator[RunningServer]:
    """Tokens on, load/unload for the admin token only (from a file)."""
    folder = tmp_path_factory.mktemp("tokens")
    admin_file = folder / "admin-tokens"
    admin_file.write_text(f"# admins\n{ADMIN_TOKEN}\n\n")
    env = {
        "CONVSERVE_AUTH_TOKENS": f" {USER_TOKEN} ,another-{secrets.token_hex(8)}",
        "CONVSERVE_ADMIN_TOKENS_FILE": str(admin_file),
        "CONVSERVE_REPOSITORY_CONTROL": "admin",
        "CONVSERVE_LOG_LEVEL": "DEBUG",
    }
    running = start_server(trained_lenet, folder / "server.log", env)
    yield running
    running.stop()


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


WRONG = _metadata(WRONG_TOKEN)


def test_vision_calls_need_a_valid_token(token_server: RunningServer) -> None:
    target = token_server.target
    for token, details in ((None, "missing bearer token"), (WRONG_TOKEN, "invalid bearer token")):
        with VisionClient(target, timeout=TIMEOUT, token=token) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.classify([_digit()])
            assert (info.value.code(), info.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, details)
            assert client.health("") == "SERVING"  # health stays open
    for token in (USER_TOKEN, ADMIN_TOKEN):
        with VisionClient(target, timeout=TIMEOUT, token=token) as client:
            assert _classify_label(client) == "3"
            assert [m.name for m in client.list_models().models] == ["lenet5"]
    with grpc.insecure_channel(target) as channel:  # not a Bearer token at all
        vision = vision_pb2_grpc.VisionStub(channel)
        basic = (("authorization", f"Basic {USER_TOKEN}"),)
        assert _code(lambda: vision.ListModels(vision_pb2.ListModelsRequest(), metadata=basic)) is (
            grpc.StatusCode.UNAUTHENTICATED
        )


def test_kserve_calls_need_a_valid_token(token_server: RunningServer) -> None:
    with grpc.insecure_channel(token_server.target) as channel:
        kserve = pb_grpc.GRPCInferenceServiceStub(channel)
        # health-like calls are open
        assert kserve.ServerReady(pb.ServerReadyRequest(), timeout=TIMEOUT).ready
        assert kserve.ModelReady(pb.ModelReadyRequest(name="lenet5"), timeout=TIMEOUT).ready
        protected = [
            lambda m: kserve.ModelMetadata(
                pb.ModelMetadataRequest(name="lenet5"), metadata=m, timeout=TIMEOUT
            ),
            lambda m: kserve.ModelConfig(pb.ModelConfigRequest(name="lenet5"), metadata=m, timeout=TIMEOUT),
            lambda m: kserve.ModelStatistics(pb.ModelStatisticsRequest(), metadata=m, timeout=TIMEOUT),
            lambda m: kserve.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=m, timeout=TIMEOUT),
            lambda m: kserve.ServerMetadata(pb.ServerMetadataRequest(), metadata=m, timeout=TIMEOUT),
        ]
        for call in protected:
            assert _code(lambda call=call: call(_metadata(None))) is grpc.StatusCode.UNAUTHENTICATED
            assert _code(lambda call=call: call(_metadata(WRONG_TOKEN))) is grpc.StatusCode.UNAUTHENTICATED
            call(_metadata(USER_TOKEN))
        infer = pb.ModelInferRequest(model_name="lenet5")
        assert _code(lambda: kserve.ModelInfer(infer, timeout=TIMEOUT)) is grpc.StatusCode.UNAUTHENTICATED
        stream = kserve.ModelStreamInfer(iter([infer]), timeout=TIMEOUT)
        assert _code(lambda: list(stream)) is grpc.StatusCode.UNAUTHENTICATED
        _wait_for_access_line(
            token_server, "/inference.GRPCInferenceService/ModelStreamInfer", "UNAUTHENTICATED"
        )
        # with a token the request gets through to validation (an input-less request is invalid)
        assert _code(lambda: kserve.ModelInfer(infer, metadata=_metadata(USER_TOKEN), timeout=TIMEOUT)) is (
            grpc.StatusCode.INVALID_ARGUMENT
        )


def _wait_for_access_line(server: RunningServer, method: str, code: str) -> None:
    """An access log line of a call to `method` that ended with `code` (lines come in blocks)."""
    deadline = time.monotonic() + 5
    while True:
        lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
        if any(
            e.get("message") == "rpc" and e.get("method") == method and e.get("code") == code for e in lines
        ):
            return
        assert time.monotonic() < deadline, f"no access line for {method} {code}"
        time.sleep(0.05)


def test_repository_control_needs_the_admin_token(token_server: RunningServer) -> None:
    with grpc.insecure_channel(token_server.target) as channel:
        kserve = pb_grpc.GRPCInferenceServiceStub(channel)
        load = pb.RepositoryModelLoadRequest(model_name="lenet5")
        unload = pb.RepositoryModelUnloadRequest(model_name="lenet5")
        for call in (kserve.RepositoryModelLoad, kserve.RepositoryModelUnload):
            request = load if call is kserve.RepositoryModelLoad else unload
            assert _code(lambda c=call, r=request: c(r, timeout=TIMEOUT)) is grpc.StatusCode.UNAUTHENTICATED
            assert _code(lambda c=call, r=request: c(r, metadata=WRONG, timeout=TIMEOUT)) is (
                grpc.StatusCode.UNAUTHENTICATED
            )
            user = _metadata(USER_TOKEN)
            with pytest.raises(grpc.RpcError) as info:
                call(request, metadata=user, timeout=TIMEOUT)
            assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
            assert "admin token" in info.value.details()
        admin = _metadata(ADMIN_TOKEN)
        for name in ("../x", "a/b", "", "..", ".hidden", "x" * 300):
            bad = pb.RepositoryModelLoadRequest(model_name=name)
            assert _code(lambda b=bad: kserve.RepositoryModelLoad(b, metadata=admin, timeout=TIMEOUT)) is (
                grpc.StatusCode.INVALID_ARGUMENT
            ), name
            bad_unload = pb.RepositoryModelUnloadRequest(model_name=name)
            assert _code(
                lambda b=bad_unload: kserve.RepositoryModelUnload(b, metadata=admin, timeout=TIMEOUT)
            ) is (grpc.StatusCode.INVALID_ARGUMENT), name
        override = pb.RepositoryModelLoadRequest(model_name="lenet5")
        override.parameters["file:1/model.onnx"].bytes_param = b"not a model"
        with pytest.raises(grpc.RpcError) as info:
            kserve.RepositoryModelLoad(override, metadata=admin, timeout=TIMEOUT)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "not a model" not in info.value.details()
        other = pb.RepositoryModelLoadRequest(model_name="lenet5", repository_name="elsewhere")
        assert _code(lambda: kserve.RepositoryModelLoad(other, metadata=admin, timeout=TIMEOUT)) is (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        kserve.RepositoryModelUnload(unload, metadata=admin, timeout=TIMEOUT)
        assert not kserve.ModelReady(pb.ModelReadyRequest(name="lenet5"), timeout=TIMEOUT).ready
        kserve.RepositoryModelLoad(load, metadata=admin, timeout=TIMEOUT)
        assert kserve.ModelReady(pb.ModelReadyRequest(name="lenet5"), timeout=TIMEOUT).ready


def _http(
    url: str, token: str | None = None, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict]:
    json_body = {"Content-Type": "application/json"} if body is not None else {}  # as JSON clients send
    all_headers = {**json_body, **(headers or {}), **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(
        url, data=body, headers=all_headers, method="POST" if body is not None else "GET"
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def _post_without_content_type(base: str, path: str) -> int:
    """POST `{}` with no Content-Type and no browser headers, as tritonclient's HTTP client does
    (urllib would add a form Content-Type)."""
    connection = http.client.HTTPConnection(urllib.parse.urlsplit(base).netloc, timeout=TIMEOUT)
    try:
        connection.request("POST", path, body=b"{}", headers={"Content-Length": "2"})
        return connection.getresponse().status
    finally:
        connection.close()


def test_http_applies_the_same_token_rules(token_server: RunningServer) -> None:
    base = token_server.http_url
    assert _http(base + "/v2/health/ready") == (200, {"ready": True})
    assert _http(base + "/v2/health/live") == (200, {"live": True})
    assert _http(base + "/v2/models/lenet5/ready")[0] == 200
    classify = base + "/v1/classify?model=lenet5&top_k=1"
    assert _http(classify, body=_digit()) == (401, {"error": "missing bearer token"})
    assert _http(classify, WRONG_TOKEN, body=_digit()) == (401, {"error": "invalid bearer token"})
    status, answer = _http(classify, USER_TOKEN, body=_digit())
    assert (status, answer["predictions"][0]["label"]) == (200, "3")
    assert _http(base + "/v2/models/lenet5", USER_TOKEN)[0] == 200
    assert _http(base + "/v2/models/lenet5")[0] == 401
    assert _http(base + "/v2/repository/index", body=b"{}")[0] == 401
    assert _http(base + "/v2/repository/index", USER_TOKEN, body=b"{}")[0] == 200
    load = base + "/v2/repository/models/lenet5/load"
    assert _http(load, body=b"{}")[0] == 401
    assert _http(load, USER_TOKEN, body=b"{}") == (403, {"error": "repository control needs an admin token"})
    assert _http(load, ADMIN_TOKEN, body=b"{}") == (200, {})
    assert _http(base + "/v2/repository/models/..x/load", ADMIN_TOKEN, body=b"{}")[0] == 400


def test_cli_sends_the_token(token_server: RunningServer) -> None:
    target = ["--target", token_server.target, "--timeout", str(TIMEOUT)]
    refused = _cli("models", *target)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    assert _cli("models", *target, env={"CONVSERVE_TOKEN": USER_TOKEN}).returncode == 0
    assert _cli("models", *target, "--token", USER_TOKEN).returncode == 0
    assert _cli("health", *target).returncode == 0  # health needs no token


def test_tokens_never_reach_the_log(token_server: RunningServer) -> None:
    """The server logs at DEBUG for this one; accepted and refused calls of every kind."""
    with VisionClient(token_server.target, timeout=TIMEOUT, token=USER_TOKEN) as client:
        client.list_models()
    with grpc.insecure_channel(token_server.target) as channel:
        kserve = pb_grpc.GRPCInferenceServiceStub(channel)
        load = pb.RepositoryModelLoadRequest(model_name="lenet5")
        assert _code(lambda: kserve.RepositoryModelLoad(load, metadata=_metadata(USER_TOKEN))) is (
            grpc.StatusCode.PERMISSION_DENIED
        )
        kserve.RepositoryModelLoad(load, metadata=_metadata(ADMIN_TOKEN), timeout=TIMEOUT)
    assert _http(token_server.http_url + "/v2/models/lenet5", WRONG_TOKEN)[0] == 401
    with VisionClient(token_server.target, timeout=TIMEOUT, token=WRONG_TOKEN) as client:
        assert _code(lambda: client.list_models()) is grpc.StatusCode.UNAUTHENTICATED
    deadline = time.monotonic() + 5  # access lines are written in blocks, within 0.1 s
    while not ("UNAUTHENTICATED" in (log := token_server.log()) and "PERMISSION_DENIED" in log):
        assert time.monotonic() < deadline, "refusals are logged"
        time.sleep(0.05)
    for secret in (USER_TOKEN, ADMIN_TOKEN, WRONG_TOKEN):
        assert secret not in log  # ... without the tokens


def test_repository_control_is_off_by_default(model_repository: Path, tmp_path: Path) -> None:
    """Default settings: PERMISSION_DENIED / 403 naming the flag to change (the RPC exists and the
    index still works; the server's policy forbids the call, which UNIMPLEMENTED would misreport
    as a missing extension)."""
    server = start_server(model_repository, tmp_path / "server.log")
    try:
        with grpc.insecure_channel(server.target) as channel:
            kserve = pb_grpc.GRPCInferenceServiceStub(channel)
            for call in (
                lambda: kserve.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="lenet5")),
                lambda: kserve.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="lenet5")),
            ):
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
                assert "--repository-control enabled" in info.value.details()
            assert len(kserve.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=TIMEOUT).models) == 1
            assert kserve.ModelReady(pb.ModelReadyRequest(name="lenet5"), timeout=TIMEOUT).ready
        for action in ("load", "unload"):
            url = f"{server.http_url}/v2/repository/models/lenet5/{action}"
            status, body = _http(url, body=b"{}")
            assert status == 403 and "CONVSERVE_REPOSITORY_CONTROL=enabled" in body["error"]
        assert _http(server.http_url + "/v2/models/lenet5/ready")[0] == 200
    finally:
        server.stop()


def test_a_page_of_another_site_cannot_unload_a_model(model_repository: Path, tmp_path: Path) -> None:
    """With control on, what a browser sends for a cross-site page is refused; clients are not."""
    server = start_server(
        model_repository, tmp_path / "server.log", {"CONVSERVE_REPOSITORY_CONTROL": "enabled"}
    )
    unload = server.http_url + "/v2/repository/models/lenet5/unload"
    own_origin = server.http_url
    try:
        refused = [
            {"Content-Type": "text/plain", "Origin": "http://evil.example"},  # a plain cross-site post
            {"Content-Type": "application/json", "Origin": "http://evil.example"},
            {"Origin": "null"},  # a sandboxed page, no body type
            {"Sec-Fetch-Site": "cross-site"},
            {"Content-Type": "text/plain"},  # same site, but not JSON
            {"Content-Type": "application/x-www-form-urlencoded", "Origin": own_origin},
        ]
        for headers in refused:
            status, body = _http(unload, body=b"{}", headers=headers)
            assert status == 403, (headers, status, body)
            assert "refused" in body["error"]
        assert _http(server.http_url + "/v2/models/lenet5/ready")[0] == 200, "the model stayed ready"
        json_same_site = {"Content-Type": "application/json; charset=utf-8", "Origin": own_origin}
        assert _http(unload, body=b"{}", headers=json_same_site)[0] == 200
        assert _http(server.http_url + "/v2/models/lenet5/ready")[0] != 200
        assert _post_without_content_type(server.http_url, "/v2/repository/models/lenet5/load") == 200
        assert _http(server.http_url + "/v2/models/lenet5/ready")[0] == 200
    finally:
        server.stop()


# The policy itself (no server) -------------------------------------------------------------------


def _policy(**kwargs) -> AuthPolicy:
    return AuthPolicy(tokens=(_digest("u1"), _digest("u2")), admin_tokens=(_digest("a1"),), **kwargs)


def _denied(policy: AuthPolicy, method: str, authorization: str | None, health: bool = False) -> str:
    with pytest.raises(AuthError) as info:
        policy.check(method, authorization, health=health)
    return f"{status_of(info.value).code.name}: {info.value}"


def test_policy_rules() -> None:
    policy = _policy()
    for token in ("u1", "u2", "a1"):
        policy.check("Classify", f"Bearer {token}")
        policy.check("Classify", f"bearer   {token} ")
    assert _denied(policy, "Classify", None) == "UNAUTHENTICATED: missing bearer token"
    assert _denied(policy, "Classify", "Bearer ") == "UNAUTHENTICATED: missing bearer token"
    assert _denied(policy, "Classify", "Basic u1") == "UNAUTHENTICATED: missing bearer token"
    assert _denied(policy, "Classify", "Bearer u3") == "UNAUTHENTICATED: invalid bearer token"
    assert _denied(policy, "Classify", "Bearer u1x") == "UNAUTHENTICATED: invalid bearer token"
    policy.check("Check", None, health=True)
    assert _denied(_policy(protect_health=True), "Check", None, health=True).startswith("UNAUTHENTICATED")
    assert _denied(policy, "RepositoryModelLoad", "Bearer a1").startswith("PERMISSION_DENIED")  # default
    _policy(repository_control="enabled").check("RepositoryModelLoad", "Bearer u1")  # any valid token
    admin = _policy(repository_control="admin")
    assert _denied(admin, "RepositoryModelLoad", "Bearer u1").startswith("PERMISSION_DENIED")
    admin.check("RepositoryModelUnload", "Bearer a1")
    disabled = _policy(repository_control="disabled")
    assert _denied(disabled, "RepositoryModelLoad", "Bearer a1").startswith("PERMISSION_DENIED")
    assert _denied(disabled, "RepositoryModelLoad", None).startswith("UNAUTHENTICATED")
    assert _denied(AuthPolicy(), "RepositoryModelLoad", None).startswith("PERMISSION_DENIED")  # default
    open_policy = AuthPolicy(repository_control="enabled")  # no tokens: open, as the setting says
    open_policy.check("Classify", None)
    open_policy.check("RepositoryModelLoad", None)
    assert _denied(AuthPolicy(repository_control="admin"), "RepositoryModelLoad", "Bearer a1").startswith(
        "UNAUTHENTICATED"
    )  # admin mode without admin tokens: nobody


def test_settings_and_token_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# comment\n t1 \n\nt2\n")
    assert read_tokens(" a, ,b ", tokens) == ["a", "b", "t1", "t2"]
    monkeypatch.setenv("CONVSERVE_AUTH_TOKENS", "secret-one,secret-two")
    settings = Settings()
    assert "secret-one" not in repr(settings) and "secret-one" not in str(settings.model_dump())
    assert AuthPolicy.from_settings(settings).enabled
    assert not AuthPolicy.from_settings(Settings(auth_tokens="")).enabled
    for name in ("lenet5", "scenes-resnet", "a.b_c-1"):
        check_model_name(name)
    for name in ("", "../x", "a/b", "..", "a..b", ".x", "-x", "a\\b", "x" * 256):
        with pytest.raises(InvalidArgument):
            check_model_name(name)
    with pytest.raises(ValueError):
        VisionClient("127.0.0.1:1", tls_cert=tmp_path / "c.crt")
