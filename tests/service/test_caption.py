"""Caption through a real server on a quick-trained captioner: the server's beam search against the
torch reference, iteration-level batching that changes no caption, limits, attention, KServe v2,
HTTP and the command line; and the decode loop's handling of expired and cancelled searches."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import RunningServer, start_server
from PIL import Image

from bench import load as bench
from bench.decoder import DecoderBenchError, DecoderTimer, gains, image_counts
from service._proto.inference import grpc_predict_v2_pb2 as kserve_pb
from service._proto.inference import grpc_predict_v2_pb2_grpc as kserve_grpc
from service.client import AsyncVisionClient, VisionClient
from service.codecs.tensors import decode_output, encode_bytes
from service.errors import DeadlineExceeded, QueueFull
from service.kinds.captioner.beam_search import BeamSearch, DecodeLoop, DecodingOptions, merge
from service.observability import metrics

SCENES = 16


@pytest.fixture(scope="module")
def scenes() -> np.ndarray:
    """Held-out scenes, (N, 3, 64, 64) uint8, as the captioner was trained on."""
    from training.data.scenes import load_scene_split

    return load_scene_split("test", 0, SCENES).images[:SCENES]


@pytest.fixture(scope="module")
def cap_server(trained_captioner: Path, trained_lenet: Path, tmp_path_factory: pytest.TempPathFactory):
    repository = tmp_path_factory.mktemp("capserve") / "models"
    shutil.copytree(trained_captioner / "models", repository)
    shutil.copytree(trained_lenet / "lenet5", repository / "lenet5")
    server = start_server(repository, repository.parent / "server.log")
    yield server
    server.stop()


def _rgb(scene: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(scene.transpose(1, 2, 0))


def _png(scene: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_rgb(scene)).save(buffer, format="PNG")
    return buffer.getvalue()


def _key(response) -> list[list[tuple[tuple[int, ...], float]]]:
    return [[(tuple(c.tokens), c.log_prob) for c in r.captions] for r in response.results]


def _words(keys: list) -> list:
    return [[[tokens for tokens, _ in image] for image in key] for key in keys]


def _scores(key: list) -> list[float]:
    return [score for image in key for _, score in image]


def test_captions_match_the_torch_reference_beam_search(
    cap_server: RunningServer, trained_captioner: Path, scenes: np.ndarray
) -> None:
    import torch

    from training.caption_decoding import beam_search
    from training.export_captioner import load_captioner

    model = load_captioner(torch.load(trained_captioner / "run" / "checkpoint.pt", weights_only=False))
    with VisionClient(cap_server.target) as client:
        for beam in (1, 3, 5):
            response = client.caption([_rgb(s) for s in scenes[:4]], beam_size=beam, count=beam)
            for scene, result in zip(scenes[:4], response.results, strict=True):
                reference = beam_search(model, torch.tensor(scene), beam)
                assert [tuple(c.tokens) for c in result.captions] == [h.tokens for h in reference]
                for caption, hypothesis in zip(result.captions, reference, strict=True):
                    assert caption.log_prob == pytest.approx(hypothesis.log_prob, abs=1e-4)
                    assert caption.mean_log_prob == pytest.approx(
                        caption.log_prob / (len(caption.tokens) + 1)
                    )
                    assert caption.text == " ".join(caption.words)
                assert not result.regions  # a grid model
    assert response.model == "captioner" and response.version == "1"


def test_concurrent_requests_get_exactly_the_captions_they_get_alone(
    cap_server: RunningServer, scenes: np.ndarray
) -> None:
    options = [
        {"beam_size": 1 + i % 4, "max_length": (6, 12, 17)[i % 3], "count": 1 + i % 2 if i % 4 else 1}
        for i in range(len(scenes))
    ]
    with VisionClient(cap_server.target) as client:
        alone = [_key(client.caption([_rgb(s)], **o)) for s, o in zip(scenes, options, strict=True)]

    async def crowd() -> list:
        async with AsyncVisionClient(cap_server.target) as client:
            calls = [
                client.caption([_rgb(s)], **o) for _ in range(2) for s, o in zip(scenes, options, strict=True)
            ]
            return await asyncio.gather(*calls)

    together = [_key(r) for r in asyncio.run(crowd())]
    # the same words, ranked the same; log-probabilities may differ in float32 rounding only, because
    # onnxruntime's matrix products block differently for other batch sizes
    assert _words(together) == _words(alone + alone)
    for batched, single in zip(together, alone + alone, strict=True):
        assert _scores(batched) == pytest.approx(_scores(single), abs=1e-5)
    text = urllib.request.urlopen(cap_server.metrics_url).read().decode()
    batched = [
        line
        for line in text.splitlines()
        if line.startswith('convserve_decode_active_requests_bucket{le="1.0",model="captioner"')
    ]
    count = [line for line in text.splitlines() if line.startswith("convserve_decode_active_requests_count")]
    # some steps advanced more than one request at once: iteration-level batching really happened
    assert float(batched[0].split()[-1]) < float(count[0].split()[-1])


def test_attention_maps_one_per_word_each_summing_to_one(
    cap_server: RunningServer, scenes: np.ndarray
) -> None:
    with VisionClient(cap_server.target) as client:
        response = client.caption([_rgb(scenes[0])], beam_size=3, count=3, attention=True)
        plain = client.caption([_rgb(scenes[0])], beam_size=3, count=3)
    assert _key(response) == _key(plain)
    assert all(not c.attention for c in plain.results[0].captions)
    captions = response.results[0].captions
    # a quick-trained model may rank an empty caption (end at once) among its beams: it has no maps
    assert any(caption.words for caption in captions)
    for caption in captions:
        assert len(caption.attention) == len(caption.words)
        for grid in caption.attention:
            assert (grid.rows, grid.columns) == (8, 8)
            assert len(grid.weights) == 64
            assert sum(grid.weights) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"beam_size": 0}, "beam_size must be 1..10, got 0"),
        ({"beam_size": 11}, "beam_size must be 1..10, got 11"),
        ({"max_length": 0}, "max_length must be 1..17"),
        ({"max_length": 18}, "max_length must be 1..17"),
        ({"count": 0}, "count must be 1..beam_size"),
        ({"beam_size": 2, "count": 3}, "count must be 1..beam_size (2), got 3"),
        ({"model": "lenet5"}, "model 'lenet5' is a classifier, not a captioner"),
    ],
)
def test_invalid_arguments(
    cap_server: RunningServer, scenes: np.ndarray, options: dict, message: str
) -> None:
    with VisionClient(cap_server.target) as client, pytest.raises(grpc.RpcError) as info:
        client.caption([_rgb(scenes[0])], **options)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_unknown_model_and_bad_image(cap_server: RunningServer) -> None:
    with VisionClient(cap_server.target) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.caption([b"not an image"])
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("image 0:")
        with pytest.raises(grpc.RpcError) as info:
            client.caption([np.zeros((8, 8), np.uint8)], model="nope")
        assert info.value.code() is grpc.StatusCode.NOT_FOUND


class _EndlessDecoder:
    """A decoder that never wants <end> (word 2) before max_length, and takes 20 ms a step."""

    output_names = ("log_probs", "next_h", "next_c", "alpha")

    def __init__(self) -> None:
        self.rows: list[int] = []

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import time

        n = len(feeds["token"])
        self.rows.append(n)
        time.sleep(0.02)
        scores = np.full((n, 6), -20.0, np.float32)
        scores[:, 4] = -0.1 - 0.01 * feeds["token"].astype(np.float32)
        scores[:, 5] = -2.5
        return [scores, feeds["h"] + 1, feeds["c"], np.full((n, 4), 0.25, np.float32)]


def _search(beam: int = 2) -> BeamSearch:
    zeros = np.zeros((1, 4, 3), np.float32)
    h = np.zeros((1, 5), np.float32)
    return BeamSearch(zeros, zeros, h, h, beam_size=beam, max_length=20, start_token=1, end_token=2)


def _decode_alone(search: BeamSearch) -> list:
    """Decode with a model that likes word 4 best, then 3, then <end> (2), whatever it has said."""
    while True:
        feeds = merge([search], by_image=True)
        n = len(feeds["token"])
        scores = np.full((n, 6), -20.0, np.float32)
        scores[:, 4], scores[:, 3], scores[:, 2] = -0.1, -1.0, -5.0
        if search.advance(scores, feeds["h"], feeds["c"], np.full((n, 4), 0.25, np.float32)):
            return search.result()


@pytest.mark.parametrize("limit", [None, 3])
def test_beam_search_says_no_word_more_often_than_the_grammar_does(limit: int | None) -> None:
    zeros, h = np.zeros((1, 4, 3), np.float32), np.zeros((1, 5), np.float32)
    search = BeamSearch(
        zeros, zeros, h, h, beam_size=2, max_length=10, start_token=1, end_token=2, max_repeats=limit
    )
    best = _decode_alone(search)[0]
    if limit is None:
        assert best.tokens == (4,) * 10  # the favourite word to the end
    else:
        assert best.tokens == (4, 4, 4, 3, 3, 3)  # then the next best word, three times, then <end>
    assert best.mean_log_prob == pytest.approx(best.log_prob / (len(best.tokens) + 1))


def test_a_step_sends_each_images_features_once_or_per_hypothesis_to_older_graphs() -> None:
    rng = np.random.default_rng(0)
    searches = []
    for beam in (3, 1, 2):
        features, projected = rng.random((1, 4, 3), np.float32), rng.random((1, 4, 2), np.float32)
        h = rng.random((1, 5), np.float32)
        search = BeamSearch(
            features, projected, h, h, beam_size=beam, max_length=20, start_token=1, end_token=5
        )
        words = np.log(np.full((1, 6), 1 / 6, np.float32))  # every word alike: `beam` hypotheses live on
        search.advance(words, np.repeat(h, 6, 0), np.repeat(h, 6, 0), np.zeros((6, 4), np.float32))
        searches.append(search)
    assert [s.rows for s in searches] == [3, 1, 2]
    by_image = merge(searches, by_image=True)
    per_hypothesis = merge(searches, by_image=False)
    assert by_image["features"].shape == (3, 4, 3) and per_hypothesis["features"].shape == (6, 4, 3)
    assert by_image["image_index"].tolist() == [0, 0, 0, 1, 2, 2]
    assert "image_index" not in per_hypothesis
    for name in ("features", "projected"):  # gathering by image_index gives the older graphs' feeds
        assert np.array_equal(by_image[name][by_image["image_index"]], per_hypothesis[name])
    for name in ("token", "h", "c"):
        assert np.array_equal(by_image[name], per_hypothesis[name])
        assert len(by_image[name]) == 6


def test_expired_and_cancelled_searches_leave_the_loop_and_others_are_unaffected() -> None:
    def dropped(reason: str) -> float:
        return metrics.DECODE_DROPPED.labels("toy", "1", reason)._value.get()

    async def main() -> None:
        decoder = _EndlessDecoder()
        loop = DecodeLoop(decoder.run, decoder.output_names, DecodingOptions(), "toy", "1")
        alone = await loop.decode(_search())
        before = decoder.rows.copy()
        now = asyncio.get_running_loop().time()
        kept = asyncio.ensure_future(loop.decode(_search()))
        expiring = asyncio.ensure_future(loop.decode(_search(), deadline=now + 0.1))
        cancelled = asyncio.ensure_future(loop.decode(_search()))
        await asyncio.sleep(0.1)
        cancelled.cancel()
        with pytest.raises(DeadlineExceeded, match="during beam search"):
            await expiring
        assert [(h.tokens, h.log_prob) for h in await kept] == [(h.tokens, h.log_prob) for h in alone]
        steps = decoder.rows[len(before) :]
        assert max(steps) == 6  # three searches of two hypotheses in one step
        assert steps[-1] == 2  # then only the search that was kept
        await loop.close()

    cancelled_before, expired_before = dropped("cancelled"), dropped("deadline_exceeded")
    asyncio.run(main())
    assert dropped("cancelled") == cancelled_before + 1
    assert dropped("deadline_exceeded") == expired_before + 1


def test_deadline_over_grpc(cap_server: RunningServer, scenes: np.ndarray) -> None:
    with VisionClient(cap_server.target) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.caption([_rgb(s) for s in scenes], beam_size=10, timeout=0.001)
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert client.caption([_rgb(scenes[0])]).results[0].captions  # and the server carries on


def test_kserve_encoder_decoder_and_captioner(cap_server: RunningServer, scenes: np.ndarray) -> None:
    with grpc.insecure_channel(cap_server.target) as channel:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        encoder = stub.ModelMetadata(kserve_pb.ModelMetadataRequest(name="captioner.encoder"))
        assert [(t.name, t.datatype, list(t.shape)) for t in encoder.inputs] == [
            ("image", "UINT8", [-1, 3, 64, 64])
        ]
        assert [t.name for t in encoder.outputs] == ["features", "projected", "h", "c"]
        decoder = stub.ModelMetadata(kserve_pb.ModelMetadataRequest(name="captioner.decoder"))
        assert [t.name for t in decoder.inputs] == ["token", "h", "c", "features", "projected", "image_index"]
        whole = stub.ModelMetadata(kserve_pb.ModelMetadataRequest(name="captioner"))
        assert [(t.name, t.datatype, list(t.shape)) for t in whole.inputs] == [("image", "BYTES", [-1, 1])]
        assert [(t.name, t.datatype, list(t.shape)) for t in whole.outputs] == [("caption", "BYTES", [-1, 1])]
        config = stub.ModelConfig(kserve_pb.ModelConfigRequest(name="captioner.decoder")).config
        assert config.default_model_filename == "decoder.onnx"
        # hypotheses and images are two batch axes: requests cannot be merged, so no dynamic batching
        assert config.max_batch_size == 0
        assert [list(t.dims) for t in config.input][3] == [-1, 64, 96]
        assert stub.ModelReady(kserve_pb.ModelReadyRequest(name="captioner.encoder")).ready

        images = np.ascontiguousarray(scenes[:2])
        request = kserve_pb.ModelInferRequest(model_name="captioner.encoder")
        request.inputs.add(name="image", datatype="UINT8", shape=list(images.shape))
        request.raw_input_contents.append(images.tobytes())
        response = stub.ModelInfer(request)
        encoded = {
            t.name: decode_output(t, raw)
            for t, raw in zip(response.outputs, response.raw_output_contents, strict=True)
        }
        assert encoded["features"].shape == (2, 64, 96)
        assert response.model_name == "captioner.encoder"

        step = kserve_pb.ModelInferRequest(model_name="captioner.decoder")
        image_index = np.array(
            [0, 1, 1], np.int64
        )  # three hypotheses: one on the first image, two on the second
        feeds = {
            "token": np.ones(3, np.int64),
            "h": encoded["h"][image_index],
            "c": encoded["c"][image_index],
            "features": encoded["features"],
            "projected": encoded["projected"],
            "image_index": image_index,
        }
        for name, array in feeds.items():
            datatype = "INT64" if array.dtype == np.int64 else "FP32"
            step.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
            step.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
        out = stub.ModelInfer(step)
        log_probs = decode_output(out.outputs[0], out.raw_output_contents[0])
        assert log_probs.shape[0] == 3
        assert np.exp(log_probs).sum(axis=1) == pytest.approx([1.0, 1.0, 1.0], abs=1e-4)
        assert np.array_equal(log_probs[1], log_probs[2])  # the same image, token and state

        whole_request = kserve_pb.ModelInferRequest(model_name="captioner", id="c1")
        whole_request.inputs.add(name="image", datatype="BYTES", shape=[2, 1])
        whole_request.raw_input_contents.append(encode_bytes(np.array([_png(s) for s in scenes[:2]], object)))
        answer = stub.ModelInfer(whole_request)
        captions = decode_output(answer.outputs[0], answer.raw_output_contents[0])
        stats = stub.ModelStatistics(kserve_pb.ModelStatisticsRequest(name="captioner.decoder"))

        # the decoder's own checks: a token beyond the vocabulary, an image beyond those given
        vocabulary = log_probs.shape[1]  # one log-probability per word
        for name, bad, allowed in (("token", vocabulary, f"0..{vocabulary - 1}"), ("image_index", 2, "0..1")):
            wrong = kserve_pb.ModelInferRequest()
            wrong.CopyFrom(step)
            position = [t.name for t in step.inputs].index(name)
            values = np.frombuffer(step.raw_input_contents[position], np.int64).copy()
            values[1] = bad
            wrong.raw_input_contents[position] = values.tobytes()
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(wrong)
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert f"input {name!r}: {bad} at index [1] is outside {allowed}" in info.value.details()
    with VisionClient(cap_server.target) as client:
        best = client.caption([_png(s) for s in scenes[:2]])
    assert answer.id == "c1" and captions.shape == (2, 1)
    assert [c.decode() for c in captions.ravel()] == [r.captions[0].text for r in best.results]
    assert stats.model_stats[0].execution_count > 0  # decode-loop steps count as decoder runs
    with grpc.insecure_channel(cap_server.target) as channel:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        for name in ("captioner", "captioner.encoder", "captioner.decoder"):
            read = stub.ModelStatistics(kserve_pb.ModelStatisticsRequest(name=name)).model_stats[0]
            counts = read.inference_stats
            assert counts.success.count > 0, name
            assert (
                counts.success.count
                == counts.compute_input.count
                == counts.compute_infer.count
                == counts.compute_output.count
            ), (name, counts)


def test_http_caption_and_kserve_captioner(cap_server: RunningServer, scenes: np.ndarray) -> None:
    url = f"{cap_server.http_url}/v1/caption?beam=3&count=2"
    request = urllib.request.Request(url, data=_png(scenes[0]), method="POST")
    body = json.loads(urllib.request.urlopen(request).read())
    with VisionClient(cap_server.target) as client:
        expected = client.caption([_png(scenes[0])], beam_size=3, count=2).results[0].captions
    assert body["model"] == "captioner"
    assert [c["text"] for c in body["captions"]] == [c.text for c in expected]

    bad = urllib.request.Request(
        f"{cap_server.http_url}/v1/caption?beam=0", data=_png(scenes[0]), method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(bad)
    assert info.value.code == 400
    assert "beam_size must be" in json.loads(info.value.read())["error"]

    infer = {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [1, 1],
                "data": [base64.b64encode(_png(scenes[0])).decode()],
            }
        ]
    }
    # JSON BYTES elements are strings; a PNG is not text, so generic clients send it as binary data:
    blob = encode_bytes(np.array([_png(scenes[0])], object))
    infer["inputs"][0].pop("data")
    infer["inputs"][0]["parameters"] = {"binary_data_size": len(blob)}
    header = json.dumps(infer).encode()
    post = urllib.request.Request(
        f"{cap_server.http_url}/v2/models/captioner/infer",
        data=header + blob,
        headers={"Inference-Header-Content-Length": str(len(header))},
        method="POST",
    )
    answer = json.loads(urllib.request.urlopen(post).read())
    assert answer["outputs"][0]["data"] == [expected[0].text]


PARTS = ("captioner.encoder", "captioner.decoder")


def _http_ready(server: RunningServer, name: str) -> int:
    try:
        with urllib.request.urlopen(f"{server.http_url}/v2/models/{name}/ready", timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_unloading_the_captioner_unloads_its_parts(
    trained_captioner: Path, tmp_path: Path, transport: str
) -> None:
    """Repository control, as tritonclient calls it: unload with unload_dependents true or false takes
    the encoder and decoder with the captioner (they are parts of its version, not models of their
    own); load brings all three back."""
    repository = tmp_path / "models"
    shutil.copytree(trained_captioner / "models", repository)
    server = start_server(repository, tmp_path / "server.log", {"CONVSERVE_REPOSITORY_CONTROL": "enabled"})
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = kserve_grpc.GRPCInferenceServiceStub(channel)

            def grpc_ready() -> dict[str, bool]:
                return {
                    n: stub.ModelReady(kserve_pb.ModelReadyRequest(name=n)).ready
                    for n in ("captioner", *PARTS)
                }

            def control(action: str, dependents: bool | None = None) -> None:
                if transport == "grpc":
                    if action == "load":
                        stub.RepositoryModelLoad(kserve_pb.RepositoryModelLoadRequest(model_name="captioner"))
                        return
                    unload = kserve_pb.RepositoryModelUnloadRequest(model_name="captioner")
                    unload.parameters["unload_dependents"].bool_param = bool(dependents)
                    stub.RepositoryModelUnload(unload)
                    return
                body = {} if action == "load" else {"parameters": {"unload_dependents": dependents}}
                url = f"{server.http_url}/v2/repository/models/captioner/{action}"
                json_type = {"Content-Type": "application/json"}  # control refuses a form post (403)
                post = urllib.request.Request(url, json.dumps(body).encode(), json_type, method="POST")
                with urllib.request.urlopen(post, timeout=60) as answer:
                    assert answer.status == 200

            assert grpc_ready() == {"captioner": True, **dict.fromkeys(PARTS, True)}
            for dependents in (True, False):
                control("unload", dependents)
                assert grpc_ready() == {"captioner": False, **dict.fromkeys(PARTS, False)}, dependents
                # known but not ready: 503, as for any model that is not ready (an unknown one is 404)
                assert [_http_ready(server, n) for n in ("captioner", *PARTS)] == [503, 503, 503]
                control("load")
                assert grpc_ready() == {"captioner": True, **dict.fromkeys(PARTS, True)}, dependents
                assert [_http_ready(server, n) for n in ("captioner", *PARTS)] == [200, 200, 200]
    finally:
        server.stop()


def test_cli_caption_json_and_attention_picture(
    cap_server: RunningServer, scenes: np.ndarray, tmp_path: Path
) -> None:
    image = tmp_path / "scene.png"
    image.write_bytes(_png(scenes[0]))
    picture = tmp_path / "attention.png"
    result = subprocess.run(
        [sys.executable, "-m", "service", "caption", str(image), "--target", cap_server.target,
         "--beam", "3", "--count", "2", "--json", "--attention", str(picture)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    record = json.loads(result.stdout)
    assert record["model"] == "captioner" and len(record["captions"]) == 2
    words = record["captions"][0]["words"]
    with Image.open(picture) as opened:
        width, height = opened.size
    panels = len(words) + 1  # the image, then one panel per word
    assert width == min(panels, 6) * (128 + 4)
    assert height == -(-panels // 6) * (128 + 18 + 4)


def test_bench_captions_for_a_second(cap_server: RunningServer) -> None:
    workload = asyncio.run(bench.caption_workload(cap_server.target, "captioner", timeout=10))
    result = asyncio.run(
        bench.bench_server(cap_server.target, workload, "caption", 4, duration=1.0, warmup=0.2)
    )
    assert result.requests > 0 and result.errors == {}
    assert 0 < result.p50_ms <= result.p99_ms


def test_the_decoder_graph_is_timed_over_more_and_more_images(
    trained_captioner: Path, trained_lenet: Path, scenes: np.ndarray
) -> None:
    assert image_counts(32) == [1, 2, 4, 8, 16, 32] and image_counts(5) == [1, 2, 4, 5]
    assert image_counts(1) == [1]
    timer = DecoderTimer(trained_captioner / "models", "captioner", "1")
    searches = timer.searches_one_step_in(scenes[:4].transpose(0, 2, 3, 1))  # as drawn: H x W x RGB
    assert len(searches) >= 2 and all(search.length == 1 for search in searches)
    steps = timer.sweep(searches, [1, 2, 4], seconds=0.3, repeat=0) + timer.sweep(
        searches, [1, 2, 4], seconds=0.3, repeat=1
    )
    for step in steps:
        assert step.images <= len(searches) and step.seconds > 0
        assert step.images <= step.rows <= timer.beam_size * step.images
    gain = gains(steps)
    assert gain[1] == [1.0, 1.0] and len(gain[2]) == 2 and all(g > 0 for g in gain[2])
    rows = bench.decoder_step_rows(steps)
    assert [row["images"] for row in rows] == sorted({step.images for step in steps})
    with pytest.raises(DecoderBenchError, match="not a captioner"):
        DecoderTimer(trained_lenet, "lenet5", "1")
    with pytest.raises(DecoderBenchError, match=r"no .*encoder\.onnx"):
        DecoderTimer(trained_captioner / "models", "captioner", "7")


def test_a_failed_decoder_run_fails_its_searches_and_the_loop_serves_on() -> None:
    class FlakyDecoder(_EndlessDecoder):
        def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            if not self.rows:  # the first run only
                self.rows.append(-1)
                raise ValueError("the decoder broke")
            return super().run(feeds)

    async def main() -> None:
        decoder = FlakyDecoder()
        loop = DecodeLoop(decoder.run, decoder.output_names, DecodingOptions(), "toy", "1")
        with pytest.raises(ValueError, match="the decoder broke"):
            await loop.decode(_search())
        assert loop.active == 0
        assert (await loop.decode(_search()))[0].tokens  # the next search decodes normally
        assert loop.active == 0
        await loop.close()

    asyncio.run(main())


def test_a_full_decode_loop_refuses_at_once() -> None:
    async def main() -> None:
        decoder = _EndlessDecoder()
        loop = DecodeLoop(decoder.run, decoder.output_names, DecodingOptions(max_queue=2), "toy", "1")
        first = asyncio.ensure_future(loop.decode(_search()))
        second = asyncio.ensure_future(loop.decode(_search()))
        await asyncio.sleep(0)  # both have joined the queue
        with pytest.raises(QueueFull, match="max_decode_queue"):
            await loop.decode(_search())
        await asyncio.gather(first, second)  # the two admitted ones are unaffected
        await loop.decode(_search())  # and there is room again
        await loop.close()

    asyncio.run(main())
