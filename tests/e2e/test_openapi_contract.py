"""The OpenAPI document says what the server does: Schemathesis (every check, including the
stateful phase; fixed seed) against a live `snnet serve` on the bundled weights."""

import subprocess
import sys
from pathlib import Path

from tests._servers import SnnetServer, suite_profile_cache

HERE = Path(__file__).resolve().parent
SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))


def test_the_server_keeps_its_openapi_contract(tmp_path, tmp_path_factory):
    srv = SnnetServer(
        {
            "SNNET_PROFILE_CACHE": suite_profile_cache(tmp_path_factory),
            "SNNET_MAX_IMAGE_PIXELS": "1000000",
        }
    )
    try:
        srv.wait_for("ready in")
        run = subprocess.run(
            [
                SCHEMATHESIS, "--config-file", str(HERE / "schemathesis.toml"), "--no-color",
                "run", f"{srv.url}/openapi.json", "--checks", "all", "--seed", "0",
                "--max-examples", "100", "--workers", "1", "--generation-database", "none",
                "--phases", "examples,coverage,fuzzing,stateful", "--request-timeout", "30",
            ],
            capture_output=True, text=True, timeout=540, cwd=tmp_path,
        )  # fmt: skip
    finally:
        srv.stop()
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
