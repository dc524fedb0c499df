"""Several models in one service, and their versions changing while it serves (in-process: a Worker behind the
real routes; the multi-engine and under-load checks are in tests/test_live_updates.py)."""
from __future__ import annotations

import dataclasses

import pytest
from starlette.testclient import TestClient

from tuneserve.models.store import save_model
from tuneserve.service.edges.routes import create_app
from support import RecordingMetrics, front_app, make_engine, photo

pytestmark = pytest.mark.slow

ADMIN = "admin-key-for-tests"
API = "api-key-for-tests"


def new_version(model, damaged: bool = False) -> str:
    """Register the same graph again as a new version of `model`'s name (optionally with a damaged file)."""
    stored = save_model(model.name, dataclasses.replace(model.card, files={}), model.onnx_path)
    if damaged:
        data = bytearray(stored.onnx_path.read_bytes())
        data[len(data) // 2:len(data) // 2 + 4096] = bytes(4096)
        stored.onnx_path.write_bytes(bytes(data))
    return stored.version


@pytest.fixture(scope="module")
def two_models(two_tones, three_shades):
    return two_tones, three_shades


def test_two_models_each_answer_with_their_own_labels(two_models):
    tones, shades = two_models
    engine = make_engine(models=f"{tones.tag},{shades.name}")
    with TestClient(create_app(lambda: engine)) as client:
        listed = client.get("/models").json()
        assert listed["default"] == tones.name
        assert [(m["name"], m["version"], m["labels"], m["state"]) for m in listed["models"]] == [
            (tones.name, tones.version, 2, "ready"), (shades.name, shades.version, 3, "ready")]
        dark = client.post(f"/models/{tones.name}/classify", content=photo("coffee.png")).json()
        shade = client.post(f"/models/{shades.name}/classify", content=photo("coffee.png")).json()
        assert dark["model"] == tones.tag and {p["label"] for p in dark["predictions"]} == {"dark", "light"}
        assert shade["model"] == shades.tag and {p["label"] for p in shade["predictions"]} == {"alpha", "beta", "gamma"}
        assert client.post("/classify", content=photo("coffee.png")).json()["model"] == tones.tag  # the default
        assert client.get("/model").json()["tag"] == tones.tag
        batch = client.post(f"/models/{shades.name}/classify_batch", files=[("images", ("c.png", photo("coffee.png")))])
        assert batch.json()["model"] == shades.tag
        one = client.get(f"/models/{shades.name}").json()
        assert one["version"] == shades.version and one["labels"] == ["alpha", "beta", "gamma"] and one["state"] == "ready"
        missing = client.post("/models/nope/classify", content=photo("coffee.png"))
        assert missing.status_code == 404 and missing.headers["content-type"] == "application/json"
        assert f"served models: {tones.name}, {shades.name}" in missing.json()["error"]
        assert client.get("/models/nope").status_code == 404
    engine.close()


def test_the_default_model_can_be_named(two_models):
    tones, shades = two_models
    engine = make_engine(models=f"{tones.tag},{shades.tag}", default_model=shades.name)
    with TestClient(create_app(lambda: engine)) as client:
        assert client.post("/classify", content=photo("coffee.png")).json()["model"] == shades.tag
    engine.close()
    with pytest.raises(ValueError, match="TUNESERVE_DEFAULT_MODEL='nope' is not among the served models"):
        make_engine(models=tones.tag, default_model="nope")
    with pytest.raises(ValueError, match="more than once"):
        make_engine(models=f"{tones.tag},{tones.name}")


def test_explicit_control_loads_rolls_back_and_unloads(two_models):
    tones, shades = two_models
    metrics = RecordingMetrics()
    engine = make_engine(metrics, models=f"{tones.tag},{shades.tag}", model_control="explicit")
    app = front_app(engine, None, ADMIN)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with TestClient(app) as client:
        v2 = new_version(shades)
        r = client.post(f"/v2/repository/models/{shades.name}/load", json={"version": v2}, headers=admin)
        assert r.status_code == 200 and r.json()["version"] == v2, r.text
        assert client.post(f"/models/{shades.name}/classify", content=photo("coffee.png")).json()["model"] == f"{shades.name}:{v2}"
        r = client.post(f"/v2/repository/models/{shades.name}/rollback", headers=admin)
        assert r.status_code == 200 and r.json()["version"] == shades.version, r.text
        assert client.post(f"/models/{shades.name}/classify", content=photo("coffee.png")).json()["model"] == shades.tag

        bad = new_version(shades, damaged=True)
        r = client.post(f"/v2/repository/models/{shades.name}/load", json={"version": bad}, headers=admin)
        assert r.status_code == 422 and "the version before keeps serving" in r.json()["error"], r.text
        assert client.post(f"/models/{shades.name}/classify", content=photo("coffee.png")).json()["model"] == shades.tag
        state = next(m for m in client.get("/models").json()["models"] if m["name"] == shades.name)
        assert state["state"] == "failed" and "has changed since it was registered" in state["error"]
        assert state["version"] == shades.version and metrics.failed_loads == [shades.name]

        index = client.post("/v2/repository/index", headers=admin).json()
        assert {(m["name"], m["state"]) for m in index} == {(tones.name, "READY"), (shades.name, "FAILED")}
        r = client.post(f"/v2/repository/models/{tones.name}/unload", headers=admin)
        assert r.status_code == 409 and "default model" in r.json()["error"]
        r = client.post(f"/v2/repository/models/{shades.name}/unload", headers=admin)
        assert r.status_code == 200 and r.json()["unloaded"] is True
        assert client.post(f"/models/{shades.name}/classify", content=photo("coffee.png")).status_code == 404
        r = client.post(f"/v2/repository/models/{shades.name}/load", headers=admin)  # its newest: the damaged one
        assert r.status_code == 422
        r = client.post(f"/v2/repository/models/{shades.name}/load", json={"version": v2}, headers=admin)
        assert r.status_code == 200 and client.get(f"/models/{shades.name}").json()["version"] == v2
        assert client.post("/v2/repository/models/nope/load", headers=admin).status_code == 404
    engine.close()


def test_versions_change_only_in_explicit_mode(two_models):
    tones, _ = two_models
    engine = make_engine(models=tones.tag, model_control="poll")
    with TestClient(create_app(lambda: engine, management=True)) as client:
        r = client.post(f"/v2/repository/models/{tones.name}/load")
        assert r.status_code == 409 and "TUNESERVE_MODEL_CONTROL=explicit" in r.json()["error"]
    with TestClient(create_app(lambda: engine, management=False)) as client:
        assert client.post(f"/v2/repository/models/{tones.name}/load").status_code == 404  # no admin key: no API
    engine.close()


def test_api_keys(two_models):
    tones, _ = two_models
    engine = make_engine(models=tones.tag, model_control="explicit")
    app = front_app(engine, API, ADMIN)
    with TestClient(app) as client:
        for headers, problem in (({}, "no 'Authorization: Bearer <key>' header"),
                                 ({"Authorization": "Bearer nope"}, "the key is wrong"),
                                 ({"Authorization": f"Basic {API}"}, "no 'Authorization: Bearer <key>' header"),
                                 ({"Authorization": f"Bearer {ADMIN}"}, "the key is wrong")):  # the admin key is not the API key
            for method, path in (("POST", "/classify"), ("GET", "/models"), ("GET", "/model"),
                                 ("POST", f"/models/{tones.name}/classify")):
                r = client.request(method, path, content=photo("coffee.png") if method == "POST" else None, headers=headers)
                assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), (path, r.text)
                assert problem in r.json()["error"] and "TUNESERVE_API_KEY" in r.json()["error"]
                assert API not in r.text and ADMIN not in r.text
        ok = {"Authorization": f"Bearer {API}"}
        assert client.post("/classify", content=photo("coffee.png"), headers=ok).status_code == 200
        assert client.get("/models", headers=ok).status_code == 200
        assert client.post("/v2/repository/index", headers=ok).status_code == 401  # the API key is not the admin key
        assert client.post("/v2/repository/index", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200
        assert client.get("/docs.json").status_code == 404  # open (no document in this bare app): not a 401
    engine.close()
