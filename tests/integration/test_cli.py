"""The `snnet` console script: its commands in this process (`tests._cli.snnet`), and as a
real subprocess what is about the process (`serve`, signals, the installed entry point)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import snnet_core
from tests._cli import ENV, ROOT, SNNET, snnet, snnet_process
from tests.conftest import TINY_ANCHORS, TINY_NUM_STITCHES, TINY_OVERRIDES, build_tiny


def test_stitches_json_for_deit():
    out = snnet_process(  # through the installed entry point
        "stitches",
        "--anchors",
        "deit_tiny_patch16_224,deit_small_patch16_224,deit_base_patch16_224",
        "--json",
    )
    rows = json.loads(out.stdout)
    assert len(rows) == 71
    assert [r["id"] for r in rows] == list(range(71))
    assert all({"id", "description", "gflops", "params_m"} <= set(r) for r in rows)
    assert rows[0]["description"] == "deit_tiny[0:12]"


def test_stitches_table_for_a_tiny_family():
    out = snnet("stitches", "--anchors", TINY_ANCHORS, "--overrides", json.dumps(TINY_OVERRIDES))
    legend = [line for line in out.stdout.splitlines() if line.startswith("# ")]
    lines = [line for line in out.stdout.strip().splitlines() if not line.startswith("# ")]
    # Above the table, what each anchor is: the timm name says ViT-Ti, the overrides say not.
    assert (
        legend[0].startswith("# vit_tiny: vit_tiny_patch16_224 with ") and "embed_dim=" in legend[0]
    )
    assert len(legend) == len(TINY_ANCHORS.split(","))
    # Every stitch of the tiny family is well under a GFLOP: the cost is in MFLOPs, and no row
    # reads 0.000 (three decimals of GFLOPs did, for the bundled model).
    assert lines[0].split()[:6] == ["id", "description", "anchors", "cut", "mflops", "params_m"]
    assert len(lines) == 1 + TINY_NUM_STITCHES
    assert "vit_tiny[0:1] -> vit_small[0:4]" in lines[4]
    at = lines[0].index("mflops")  # columns are aligned: the value starts where its name does
    assert all(float(line[at:].split()[0]) > 0 for line in lines[1:])


def test_stitches_lists_the_resnet_family():
    out = snnet("stitches", "--anchors", "resnet18,resnet50", "--json")
    rows = json.loads(out.stdout)
    assert len(rows) == 10 and rows[0]["description"] == "resnet18[2,2,2,2]"
    assert rows[2]["description"] == "resnet18[:s1.0] -> resnet50[s1.1:]"


def test_import_converts_a_release_file(tmp_path):
    torch.manual_seed(0)
    names = TINY_ANCHORS.split(",")
    net = build_tiny()
    raw = {k: v for k, v in net.state_dict().items()}  # DeiT's release keys are ours
    torch.save({"model": raw}, tmp_path / "snnet_deit.pth")
    out = snnet(
        "import",
        str(tmp_path / "snnet_deit.pth"),
        "--family",
        "deit",
        "--out",
        str(tmp_path / "ckpt"),
        "--anchors",
        ",".join(names),
        "--overrides",
        json.dumps(TINY_OVERRIDES),
    )
    assert f"imported {len(raw)} tensors" in out.stderr
    loaded, manifest = snnet_core.load(tmp_path / "ckpt")
    assert manifest.config.space.stitched_final_norm is False
    info = manifest.training["imported_from"]
    assert info["file"] == "snnet_deit.pth" and len(info["sha256"]) == 64
    assert len(manifest.stitches) == TINY_NUM_STITCHES


def test_profile_writes_into_the_manifest(tmp_path):
    snnet_core.save(build_tiny(), tmp_path)
    out = snnet(
        "profile",
        "--weights",
        str(tmp_path),
        "--device",
        "cpu",
        "--batch-sizes",
        "1,2",
        "--stitches",
        "0,4",
        "--repeats",
        "2",
        "--warmup",
        "0",
    )
    assert "ms@1" in out.stdout and "ms@2" in out.stdout
    assert "latency" in out.stderr  # progress bar
    _, manifest = snnet_core.load(tmp_path)
    (profile,) = manifest.profiles
    assert set(profile.latency_ms) == {0, 4} and profile.batch_sizes == [1, 2]


def test_eval_records_accuracy_per_dtype(tmp_path):
    """What SNNET_DTYPE=auto reads: held-out top-1 per dtype, beside float32's."""
    snnet_core.save(build_tiny(), tmp_path)
    common = ["eval", "--weights", str(tmp_path), "--data", "mnist", "--limit", "64", "--write"]
    table = snnet(*common, "--stitches", "0,5", "--device", "cpu").stdout.splitlines()
    # the cost in the unit `snnet stitches` shows (three decimals of GFLOPs printed 0.000)
    assert table[0].split() == ["id", "description", "mflops", "top1", "top5"]
    stitches = snnet("stitches", "--weights", str(tmp_path)).stdout.splitlines()
    header = next(line.split() for line in stitches if line.startswith("id "))
    assert "mflops" in header
    mflops = snnet_core.load(tmp_path)[1].stitches[5]["gflops"] * 1e3
    assert float(table[2].split()[-3]) == pytest.approx(mflops, abs=1e-3)
    snnet(*common, "--stitches", "0,5", "--device", "cpu", "--dtype", "bfloat16")
    _, manifest = snnet_core.load(tmp_path)
    by_dtype = manifest.evaluation["accuracy_by_dtype"]
    assert set(by_dtype) == {"float32", "bfloat16"}
    assert set(by_dtype["bfloat16"]) == {"0", "5"} == set(by_dtype["float32"])
    assert manifest.stitches[0]["accuracy"] == by_dtype["float32"]["0"]  # rows: float32 only
    assert manifest.evaluation["images"] == 64


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["stitches", "--anchors", "a,b", "--overrides", "{oops"], "--overrides must be JSON"),
        (
            ["stitches", "--weights", "/nonexistent/ckpt"],
            "checkpoint directory /nonexistent/ckpt does not exist",
        ),
        (
            ["stitches", "--anchors", "no_such_model,vit_tiny_patch16_224"],
            "unknown timm model 'no_such_model'",
        ),
        (
            ["import", "/nonexistent/snnet_swin.pth", "--family", "swin", "--out", "/tmp/x"],
            "/nonexistent/snnet_swin.pth does not exist",
        ),
        (  # two separate models, not an SN-Net: it listed them with no stitch between
            ["stitches", "--anchors", "deit_tiny_patch16_224,resnet18"],
            "deit_tiny_patch16_224 and resnet18 share no stage where one could be cut",
        ),
        (["import", "/", "--family", "deit", "--out", "/tmp/x"], "/ is a directory; snnet import"),
        (
            ["stitches", "--anchors", "resnet18,resnet50", "--overrides", '{"bogus": 1}'],
            "timm's resnet18 does not take the overrides {'bogus': 1}",
        ),
    ],
)
def test_bad_input_is_a_clear_error(args, message):
    proc = snnet(*args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_with_a_bad_setting_is_a_clear_error():
    """Each wrong setting is named with what it got and what is allowed (a setting of two types,
    threads: an int or auto, in one line); the option's name too when it came from one. A real
    process: `serve` checks them before its model process starts, and leaves nothing behind."""
    env = {"SNNET_THREADS": "-3", "SNNET_DTYPE": "fp8"}
    proc = snnet_process("serve", "--port", "0", check=False, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--port / SNNET_PORT: got 0; Input should be greater than or equal to 1" in proc.stderr
    assert "SNNET_THREADS: got '-3'; Input should be greater than or equal to 1, or Input " \
        "should be 'auto'" in proc.stderr  # fmt: skip
    assert "SNNET_DTYPE: got 'fp8'; Input should be 'auto', 'float32'," in proc.stderr


def test_serve_refuses_settings_that_would_serve_wrongly():
    """An empty API key (a secret that resolved to nothing) would let every request in; the gRPC
    endpoint on the HTTP port cannot bind. Each is a start-up error that says why; the log level
    is taken in capitals too, as Python's logging names it."""
    proc = snnet_process("serve", check=False, env={"SNNET_API_KEY": ""})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "SNNET_API_KEY: got ''; api_key is set but empty, which would let every request in; " \
        "set a key, or unset SNNET_API_KEY" in proc.stderr  # fmt: skip
    env = {"SNNET_GRPC_PORT": "8100", "SNNET_LOG_LEVEL": "DEBUG"}
    proc = snnet_process("serve", "--port", "8100", check=False, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "\n  SNNET_GRPC_PORT and SNNET_PORT (--port) are both 8100: the gRPC endpoint needs a " \
        "port of its own; set SNNET_GRPC_PORT (--grpc-port) to another (0: no gRPC)" in proc.stderr  # fmt: skip
    assert "LOG_LEVEL" not in proc.stderr
    # A Kubernetes Service named snnet, with service links on, sets SNNET_PORT=tcp://...
    env = {"SNNET_PORT": "tcp://10.96.12.34:8000", "SNNET_SERVICE_HOST": "10.96.12.34"}
    proc = snnet_process("serve", check=False, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "SNNET_PORT: got 'tcp://10.96.12.34:8000'" in proc.stderr
    assert "Kubernetes puts in a pod's environment for a Service named snnet; set " \
        "enableServiceLinks: false" in proc.stderr  # fmt: skip


def test_serve_refuses_more_threads_than_cpus_and_a_host_that_does_not_resolve():
    """SNNET_THREADS=64 on 2 CPUs was taken (stitch 0 ran 20x slower; 9999 stalled start-up);
    a host name that does not resolve failed after loading, in a traceback naming gRPC."""
    from server.environ import cores

    n = cores()
    proc = snnet_process("serve", check=False, env={"SNNET_THREADS": str(n + 1)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: cannot serve: SNNET_THREADS={n + 1} is more than the {n} CPU" in proc.stderr
    assert f"allowed: auto or 1..{n}" in proc.stderr
    proc = snnet_process("serve", check=False, env={"SNNET_HOST": "not a host"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot be bound ('not a host': " in proc.stderr
    assert "SNNET_HOST is not an address of this machine" in proc.stderr


def test_serve_warns_of_a_setting_it_does_not_know():
    env = {**ENV, "SNNET_MAX_BATCH": "4", "SNNET_SLO": "0.9", "SNNET_WEIGHTS": "/nonexistent"}
    proc = snnet_process("serve", check=False, env=env)
    assert proc.returncode == 2  # (the missing checkpoint, after the warning)
    assert (
        "SNNET_MAX_BATCH is not a setting of snnet serve and is ignored; did you mean "
        "SNNET_MAX_BATCH_SIZE?"
    ) in proc.stderr
    assert "SNNET_SLO is not a setting of snnet serve and is ignored; did you mean " \
        "SNNET_SLO_TARGET?" in proc.stderr  # fmt: skip


def test_serve_starts_its_model_process_before_importing_torch():
    """`snnet serve` spawns the model process from `server.cli.main` before anything imports
    torch (server.early), so that both processes import it side by side: what runs before that
    point must not import it."""
    code = (
        "import sys, server.cli, server.config, server.early, server.environ; "
        "print(sorted(m for m in ('torch', 'timm', 'numpy', 'snnet_core') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=ENV
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _serve_until_its_model_process_starts(tmp_path, stderr) -> tuple[subprocess.Popen, list[str]]:
    """`snnet serve` in its first second: torch still importing, the model process started early
    (its children's pids; the other is multiprocessing's resource tracker)."""
    import time

    from tests._prometheus import free_port

    env = {**ENV, "SNNET_PORT": str(free_port()), "XDG_CACHE_HOME": str(tmp_path)}
    proc = subprocess.Popen(
        [SNNET, "serve"], env=env, stderr=stderr, stdout=subprocess.DEVNULL, text=True
    )
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    deadline = time.monotonic() + 60
    # The model process is spawned before the imports; nothing is logged that early, so its
    # appearance among the children is the event, polled.
    while not (kids := children.read_text().split()):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    return proc, kids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_while_serve_imports_ends_it_quietly_with_its_model_process(tmp_path):
    """Ctrl-C in the first seconds of `snnet serve` (torch still importing, the model process
    already started early) ends both, with exit code 130 and no traceback."""
    import signal

    proc, _ = _serve_until_its_model_process_starts(tmp_path, subprocess.PIPE)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)  # (its end: the model process holds stderr too)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err, err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_model_process_still_importing_ends_with_a_server_killed_early(tmp_path):
    """SIGTERM in the first second kills `snnet serve` at once (no handler yet); its model
    process, which ignores SIGTERM and was still importing torch, ran on for 6.1 s. Now it
    sees its parent gone within a poll."""
    import signal
    import time

    proc, kids = _serve_until_its_model_process_starts(tmp_path, subprocess.DEVNULL)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == -signal.SIGTERM
    gone = time.monotonic()
    # torch and timm take 5-9 s to import here: a child still there after 3 s was importing on.
    # (Not our children: nothing to wait on but /proc, polled.)
    while any(Path(f"/proc/{k}").exists() and "Z" not in _state(k) for k in kids):
        assert time.monotonic() - gone < 3.0, f"model process {kids} outlived its server"
        time.sleep(0.05)


def _state(pid: str) -> str:
    try:  # (a zombie has exited; it waits for init to reap it)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "Z"


def test_ctrl_c_during_start_up_exits_130(tmp_path):
    """Ctrl-C once start-up has begun (loading, timing the model) exits 130, not 0: uvicorn
    returned normally, and a supervisor read a cancelled start as a clean exit."""
    import signal

    from tests._prometheus import free_port

    env = {
        **ENV, "SNNET_PORT": str(free_port()), "XDG_CACHE_HOME": str(tmp_path),
        "SNNET_PROFILE_CACHE": str(tmp_path / "profiles.json"), "SNNET_GRPC_PORT": "0",
    }  # fmt: skip
    proc = subprocess.Popen(
        [SNNET, "serve"], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    lines = []
    for line in proc.stderr:  # a fresh profile cache: seconds of timing after this line
        lines.append(line)
        if "starting: loading the model" in line:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    err = "".join(lines) + err
    assert "ready in" not in err, err  # (it was stopped during start-up)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err


def _serve_to_its_end(weights: Path, timeout: float) -> subprocess.CompletedProcess:
    """`snnet serve` of ``weights`` in a bare environment on a free port, without gRPC (the
    default port 8081 may be another test's server's, and the port check, which comes first,
    then said so instead; a CI run failed so), run until it exits."""
    from tests._prometheus import free_port

    env = {"SNNET_WEIGHTS": str(weights), "SNNET_GRPC_PORT": "0", "PATH": "/usr/bin:/bin",
           "PYTHONPATH": ROOT, "SNNET_PROFILE_CACHE": str(weights / "p.json")}  # fmt: skip
    return subprocess.run(
        [SNNET, "serve", "--port", str(free_port())],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


def test_serve_refuses_a_corrupt_checkpoint(tmp_path):
    snnet_core.save(build_tiny(), tmp_path)
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\0")
    proc = _serve_to_its_end(tmp_path, timeout=60)
    # (run() waits for the end of stderr: a model process started early and left running
    # would hold it open until the timeout)
    assert proc.returncode == 2
    assert "cannot serve" in proc.stderr and "does not match its manifest" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_whose_start_up_fails_exits_with_the_reason_last(tmp_path):
    """A failure inside start-up (here a manifest edited so that its net no longer fits the
    weights, which only loading finds) left the server running for ever: /healthz 200, /readyz
    503, nothing for a supervisor to restart. It now stops, exit code 1, the reason its last
    line."""
    snnet_core.save(build_tiny(), tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["config"]["anchors"][0]["overrides"]["embed_dim"] += 8
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    proc = _serve_to_its_end(tmp_path, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot serve: start-up failed: CheckpointError: "), last
    assert "does not fit the architecture in manifest.json" in last


def test_serve_installed_without_the_checkout_says_to_set_snnet_weights(tmp_path):
    """`pip install .` puts the packages in site-packages and leaves the bundled weights/ folder
    in the checkout: the default then names a folder that is not there. The error says what to
    set. (The packages copied to a folder of their own, as an install lays them out.)"""
    import shutil

    from tests._prometheus import free_port

    site = tmp_path / "site"
    for package in ("server", "snnet_core"):
        shutil.copytree(Path(ROOT) / package, site / package)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from server.cli import main; sys.exit(main(['serve']))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(site),
            "HOME": str(tmp_path),
            "SNNET_PORT": str(free_port()),
            "SNNET_GRPC_PORT": "0",
        },  # fmt: skip
    )
    assert proc.returncode == 2, proc.stderr
    assert f"checkpoint directory {site / 'weights'} does not exist" in proc.stderr
    assert "SNNET_WEIGHTS is unset" in proc.stderr and "Traceback" not in proc.stderr


def test_input_size_gives_the_anchors_its_channels():
    """`--input-size 1,28,28` built ResNets for 3 channels (timm's default) and failed on the
    first image with a traceback; the channels are the anchors' in_chans unless given."""
    proc = snnet(
        "stitches", "--anchors", "resnet18,resnet50", "--input-size", "1,28,28",
        "--overrides", '{"num_classes": 10}', "--json",
    )  # fmt: skip
    assert len(json.loads(proc.stdout)) == 10
