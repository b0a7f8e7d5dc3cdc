"""`snnet serve` starting and stopping, over real HTTP on a free loopback port: the model process
started early, a drain on SIGTERM, a stop signal during start-up."""

import concurrent.futures
import signal
import time

import httpx
import pytest

from tests._servers import SnnetServer as Server
from tests._servers import classify, suite_profile_cache


def test_serve_starts_its_model_process_early_and_sigterm_finishes_accepted_requests(
    tmp_path_factory, held_out
):
    """`snnet serve` spawns the model process before it imports torch (server.early), so that
    both import side by side; with the thread count given, that early process is the one that
    takes the weights and serves. SIGTERM under traffic then drains: what was accepted is
    answered, later connections are refused. (One server for both: a start is 10 s here.)"""
    srv = Server(
        {"SNNET_PROFILE_CACHE": suite_profile_cache(tmp_path_factory), "SNNET_THREADS": "1"}
    )
    try:
        srv.wait_for("ready in")
        ready = next(line for line in srv.log if "model process" in line and " ready (" in line)
        assert "started early" in ready, ready
        pngs = held_out[0][:4]

        def attempt():
            try:
                return classify(srv.url, pngs, stitch_id=2).status_code
            except httpx.TransportError:  # arrived after the listener closed
                return "refused"

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(attempt) for _ in range(64)]
            next(concurrent.futures.as_completed(futures))  # traffic is flowing
            srv.proc.send_signal(signal.SIGTERM)
            outcomes = [f.result() for f in futures]
        # uvicorn drains, then re-raises the signal so the process ends "killed by SIGTERM".
        assert srv.proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        srv.stop()
    assert any(line and "draining" in line for line in srv.log + list(srv.lines.queue))
    assert outcomes.count(200) >= 1
    assert set(outcomes) <= {200, "refused"}  # nothing accepted is dropped or failed


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_start_up_stops_the_server_at_once(tmp_path, sig):
    """Profiling every stitch 2000 times would take minutes; a stop signal must not wait for it
    (Kubernetes would kill the pod; a user at a terminal would wait)."""
    srv = Server(
        {
            "SNNET_PROFILE_CACHE": str(tmp_path / "p.json"),
            "SNNET_PROFILE_REPEATS": "2000",
            "SNNET_PROFILE_SECONDS": "600",
            # A batch size no stored profile has: it measures whatever the manifest holds.
            "SNNET_PROFILE_BATCH_SIZES": "[1, 3]",
        }
    )
    try:
        srv.wait_for("measuring the rest")
        start = time.monotonic()
        srv.proc.send_signal(sig)
        code = srv.proc.wait(30)
        took = time.monotonic() - start
    finally:
        if srv.proc.poll() is None:  # never left running, whatever failed
            srv.proc.kill()
            srv.proc.wait(30)
    assert code in (0, 130, -sig), code  # 130: Ctrl-C, as a shell reports it
    assert took < 10, f"took {took:.1f} s to stop"  # the profile alone would take minutes
    print(f"stopped {took:.2f} s after {sig.name}")
    assert not (tmp_path / "p.json").exists()  # nothing half-measured is kept


def test_sigterm_stops_grpc_taking_calls_while_http_still_drains(tmp_path_factory, held_out):
    """On SIGTERM the gRPC endpoint stops taking new calls at once, alongside uvicorn's HTTP
    drain, not after it: a slow HTTP upload holds the drain open (up to SNNET_SHUTDOWN_GRACE_S)
    and new gRPC calls are refused meanwhile; the stages run together, so a pod's grace period
    bounds the whole stop."""
    import socket

    import numpy as np
    import tritonclient.grpc as tgrpc
    from tritonclient.utils import InferenceServerException

    from tests._prometheus import free_port

    grpc_port = free_port()
    srv = Server({
        "SNNET_PROFILE_CACHE": suite_profile_cache(tmp_path_factory),
        "SNNET_GRPC_PORT": str(grpc_port), "SNNET_SHUTDOWN_GRACE_S": "20",
    })  # fmt: skip
    slow = None
    try:
        srv.wait_for("ready in")
        slow = socket.create_connection(("127.0.0.1", srv.port))
        client = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        image = tgrpc.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array(held_out[0][:1], dtype=np.object_))
        client.infer("weights", [image])  # serving
        # An upload that has sent its headers and a little of its body: uvicorn's drain waits.
        slow.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"images\": [")  # fmt: skip
        for _ in range(200):  # until the server holds it (the controller loop publishes it)
            metrics = httpx.get(f"{srv.url}/metrics").text
            if "\nsnnet_http_backlog 1.0" in metrics:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the upload never showed in snnet_http_backlog")
        srv.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        refused = None
        while refused is None and time.monotonic() < deadline:
            try:
                client.infer("weights", [image], client_timeout=5)
            except InferenceServerException as e:
                refused = e
        assert refused is not None, "gRPC kept taking calls during the HTTP drain"
        assert srv.proc.poll() is None  # the HTTP drain still waits on the upload
        client.close()
    finally:
        if slow is not None:
            slow.close()
        srv.stop()


def test_a_second_ctrl_c_exits_at_once(tmp_path_factory):
    """The first Ctrl-C drains (here held open by an upload that never ends); a second one
    exits now, model process included (it ignores signals: only the server ends it)."""
    import socket

    srv = Server({"SNNET_PROFILE_CACHE": suite_profile_cache(tmp_path_factory)})
    slow = None
    try:
        srv.wait_for("ready in")
        slow = socket.create_connection(("127.0.0.1", srv.port))
        slow.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{")  # fmt: skip
        for _ in range(200):  # until the server holds it
            if "\nsnnet_http_backlog 1.0" in httpx.get(f"{srv.url}/metrics").text:
                break
            time.sleep(0.05)
        srv.proc.send_signal(signal.SIGINT)
        srv.wait_for("Waiting for connections to close")
        srv.proc.send_signal(signal.SIGINT)
        srv.proc.wait(30)  # (it waited for ever on the model process)
    finally:
        if slow is not None:
            slow.close()
        srv.stop()
