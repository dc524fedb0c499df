"""Service settings and request-parsing rules, without a model or a server (fast)."""
from __future__ import annotations

import pytest

from tuneserve.models.preprocessing import ImageDecodeError, load_image
from tuneserve.service.config import BATCHING_DEFAULTS, ServiceConfig
from tuneserve.service.edges.routes import parse_top_k
from tuneserve.service.engine.errors import RequestError
from tuneserve.service.engine.model_version import decode_error_status
from support import encode


def test_defaults_and_env_mapping():
    cfg = ServiceConfig.from_env({})
    assert cfg == ServiceConfig()
    assert cfg.max_image_bytes == 20 * 1024 * 1024 and cfg.models is None and cfg.device == "auto"
    cfg = ServiceConfig.from_env({"TUNESERVE_MODEL": "hym:v1", "TUNESERVE_MAX_BATCH_SIZE": " 16 ",
                                  "TUNESERVE_DEVICE": "cpu", "TUNESERVE_TOP_K": "", "TUNESERVE_METRICS_AUTH": "true"})
    assert (cfg.models, cfg.max_batch_size, cfg.device, cfg.top_k) == ("hym:v1", 16, "cpu", 5)
    assert cfg.metrics_auth is True and cfg.model_tags() == ["hym:v1"]
    assert ServiceConfig.from_env({"TUNESERVE_MODELS": "a, b:v2", "TUNESERVE_MODEL": "ignored"}).model_tags() == ["a", "b:v2"]
    assert ServiceConfig.from_env(cfg.to_env()) == cfg  # what `tuneserve serve` hands to bentoml's workers


@pytest.mark.parametrize("env, message", [
    ({"TUNESERVE_MAX_BATCH_SIZE": "many"}, r"TUNESERVE_MAX_BATCH_SIZE='many' is not an integer"),
    ({"TUNESERVE_MAX_BATCH_SIZE": "0"}, r"TUNESERVE_MAX_BATCH_SIZE=0 is out of range: it must be an integer >= 1"),
    ({"TUNESERVE_MAX_IMAGE_BYTES": "-5"}, r"TUNESERVE_MAX_IMAGE_BYTES=-5 is out of range"),
    ({"TUNESERVE_DEVICE": "tpu"}, r"TUNESERVE_DEVICE='tpu' is not one of: auto, cuda, cpu"),
    ({"TUNESERVE_PRECISION": "bf16"}, r"TUNESERVE_PRECISION='bf16' is not one of: auto, fp32, fp16, int8"),
    ({"TUNESERVE_GPU_DECODE": "yes"}, r"TUNESERVE_GPU_DECODE='yes' is not one of: auto, off"),
])
def test_bad_settings_name_the_variable_and_what_is_accepted(env, message):
    with pytest.raises(ValueError, match=message):
        ServiceConfig.from_env(env)


def test_batching_defaults_per_device_and_overrides():
    assert ServiceConfig().batching("cpu") == BATCHING_DEFAULTS["cpu"]
    assert ServiceConfig().batching("cuda") == BATCHING_DEFAULTS["cuda"]
    assert ServiceConfig(max_batch_size=1).batching("cuda") == (1, BATCHING_DEFAULTS["cuda"][1])
    assert ServiceConfig(max_latency_ms=50).batching("cpu") == (BATCHING_DEFAULTS["cpu"][0], 50)


def test_onnxruntime_threads_default_to_every_cpu(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert ServiceConfig().onnxruntime_threads("cpu") == 8  # they sleep when idle (spin=False), see config.py
    assert ServiceConfig().onnxruntime_threads("cpu", workers=2) == 4  # the workers share the CPUs
    assert ServiceConfig().onnxruntime_threads("cuda") == 1  # the GPU does the work: one thread feeds it
    assert ServiceConfig(ort_threads=3).onnxruntime_threads("cpu") == 3
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert ServiceConfig().onnxruntime_threads("cpu") == 1
    assert ServiceConfig().threads() == 2


def test_worker_count_per_device(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert ServiceConfig().worker_count("cpu") == 2  # one can die while the other serves
    assert ServiceConfig().worker_count("cuda") == 8
    assert ServiceConfig(workers=3).worker_count("cuda") == 3 and ServiceConfig(workers=3).worker_count("cpu") == 3
    assert ServiceConfig().threads(workers=8) == 2  # the CPUs are shared among the workers
    assert ServiceConfig(preprocess_threads=5).threads(workers=8) == 5
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert ServiceConfig().worker_count("cuda") == 1
    assert ServiceConfig().threads(workers=2) == 2  # never fewer than 2: one stays free of huge images
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert ServiceConfig().worker_count("cpu") == 1
    with pytest.raises(ValueError, match="TUNESERVE_WORKERS=-1 is out of range"):
        ServiceConfig.from_env({"TUNESERVE_WORKERS": "-1"})


@pytest.mark.parametrize("raw, expected", [(None, 5), ("", 5), ("3", 3), (" 7 ", 7), ("1000", 1000), ("5000", 1000)])
def test_top_k_defaults_and_clamps_to_the_number_of_classes(raw, expected):
    assert parse_top_k(raw, 5, 1000) == expected


@pytest.mark.parametrize("raw, message", [("abc", "is not an integer"), ("2.5", "is not an integer"),
                                          ("0", "out of range"), ("-3", "out of range")])
def test_bad_top_k_is_a_400_that_says_what_to_send(raw, message):
    with pytest.raises(RequestError, match=message) as e:
        parse_top_k(raw, 5, 1000)
    assert e.value.status == 400 and "integer >= 1" in e.value.message


def _decode_failure(data: bytes, **kw) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as e:
        load_image(data, **kw)
    return e.value


def test_decode_failures_map_to_status_codes():
    from PIL import Image

    img = Image.new("RGB", (64, 48), (200, 30, 30))
    jpeg = encode(img, "JPEG")
    assert decode_error_status(_decode_failure(b"")) == 400
    assert decode_error_status(_decode_failure(b"plain text, not pixels")) == 400
    assert decode_error_status(_decode_failure(jpeg[: len(jpeg) // 2])) == 400
    assert decode_error_status(_decode_failure(encode(img, "ICO"))) == 415
    assert decode_error_status(_decode_failure(encode(img, "PNG"), max_pixels=1000)) == 413


def test_device_comes_from_a_session_that_ran(model, monkeypatch):
    """The plan says CUDA only where a CUDA session ran the model: a CUDA provider that is listed but cannot
    run (a missing driver or cuDNN) gives a CPU plan with the reason, or an error when CUDA was asked for."""
    import onnxruntime

    from tuneserve.models import runtime
    from tuneserve.service.plan import ModelUnusable, ServingPlan, probe_device

    assert probe_device("cpu", model) == ("cpu", "TUNESERVE_DEVICE=cpu")
    if runtime.gpu_present():  # a host whose CUDA works: stand in for a driver or cuDNN that does not load
        def broken(*args, **kwargs):
            raise RuntimeError("device 'cuda' was asked for, but onnxruntime could not start CUDAExecutionProvider")
        monkeypatch.setattr(runtime, "OnnxClassifier", broken)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr("tuneserve.service.plan.gpu_present", lambda: True)
    device, reason = probe_device("auto", model)  # listed, but it cannot run: the session falls back or fails
    assert device == "cpu" and "did not run" in reason
    plan = ServingPlan.resolve(ServiceConfig(models=model.tag))
    assert plan.device == "cpu" and plan.device_reason == reason and plan.max_batch_size == BATCHING_DEFAULTS["cpu"][0]  # CPU defaults
    with pytest.raises(ModelUnusable, match="TUNESERVE_DEVICE=cuda, but the CUDA provider did not run"):
        probe_device("cuda", model)


def test_the_plan_travels_to_the_workers_whole(model):
    from tuneserve.service.plan import ServingPlan

    plan = ServingPlan.resolve(ServiceConfig(models=model.tag, max_latency_ms=750))
    env = plan.to_env()
    config = ServiceConfig.from_env(env)
    assert ServingPlan.from_env(config, env) == plan
    assert ServingPlan.from_env(config, {}) is None


@pytest.mark.parametrize("host, ok", [("127.0.0.1", True), ("localhost", True), ("::1", True), ("0.0.0.0", False),
                                      ("10.1.2.3", False)])
def test_no_key_on_a_reachable_address_refuses_to_start(host, ok):
    from tuneserve.service.config import check_exposure

    if ok:
        check_exposure(ServiceConfig(), host)
    else:
        with pytest.raises(ValueError, match="TUNESERVE_API_KEY.*--allow-no-key"):
            check_exposure(ServiceConfig(), host)
    check_exposure(ServiceConfig(api_key="k"), host)
    check_exposure(ServiceConfig(allow_no_key=True), host)
