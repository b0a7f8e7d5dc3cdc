from fastapi.testclient import TestClient

import snnet_core
from server.app import create_app
from server.config import Settings
from tests.conftest import build_tiny


def test_health_then_ready(tmp_path):
    snnet_core.save(build_tiny(), tmp_path)
    app = create_app(Settings(weights=tmp_path))
    with TestClient(app) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert app.state.model.done.wait(60)
        r = client.get("/readyz")
        assert r.status_code == 200 and r.json()["ready"] is True


def test_not_ready_when_the_checkpoint_fails_to_load(tmp_path):
    app = create_app(Settings(weights=tmp_path / "missing"))
    with TestClient(app) as client:
        assert app.state.model.done.wait(60)
        r = client.get("/readyz")
        assert r.status_code == 503
        assert "does not exist" in r.json()["detail"]
        assert client.get("/healthz").status_code == 200
