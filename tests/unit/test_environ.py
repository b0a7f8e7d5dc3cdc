"""How many cores a model may use: the affinity mask, or fewer under a CPU quota (a container's
``--cpus``, a Kubernetes CPU limit), read from the cgroup files as the kernel lays them out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.environ import cores_within, cpu_quota, cpus

ROOT = Path(__file__).resolve().parents[2]


def tree(tmp_path: Path, line: str, files: dict[str, str]) -> tuple[str, str]:
    """A /proc/self/cgroup holding ``line`` and a cgroup root holding ``files``."""
    proc = tmp_path / "cgroup"
    proc.write_text(line + "\n")
    root = tmp_path / "fs"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return str(proc), str(root)


def test_a_cgroup_v2_quota_is_the_tightest_of_the_cgroup_and_those_above_it(tmp_path):
    proc, root = tree(
        tmp_path,
        "0::/kubepods/pod1/ctr",
        {
            "cpu.max": "max 100000\n",
            "kubepods/cpu.max": "max 100000\n",
            "kubepods/pod1/cpu.max": "150000 100000\n",  # the pod: 1.5 CPUs
            "kubepods/pod1/ctr/cpu.max": "400000 100000\n",
        },
    )
    assert cpu_quota(proc, root) == 1.5


def test_no_quota_or_no_cgroup_files_is_no_limit(tmp_path):
    assert cpu_quota(*tree(tmp_path, "0::/", {"cpu.max": "max 100000\n"})) is None
    assert cpu_quota(str(tmp_path / "absent"), str(tmp_path)) is None
    v1 = tree(tmp_path, "4:cpu,cpuacct:/docker/abc", {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n"})
    assert cpu_quota(*v1) is None


def test_a_quota_is_rounded_up_to_whole_cores_within_the_cpus():
    """1.5 CPUs' worth of time is 2 threads' work, each running part of the time; under one CPU
    still one; never more than the CPUs the process may run on."""
    assert [cores_within(64, q) for q in (None, 0.5, 1.0, 1.5, 2.0, 100.0)] == [64, 1, 1, 2, 2, 64]


def test_a_malformed_quota_is_no_limit(tmp_path):
    for k, text in enumerate(("100000 0\n", "-5 100000\n", "lots 100000\n", "")):
        (tmp_path / str(k)).mkdir()
        assert cpu_quota(*tree(tmp_path / str(k), "0::/", {"cpu.max": text})) is None, text


def test_a_container_that_sees_only_its_own_cgroup_reads_the_root_files(tmp_path):
    """cgroup v1 without a cgroup namespace: /proc/self/cgroup names the host's path, and the
    container's cpu mount is its own cgroup."""
    proc, root = tree(
        tmp_path,
        "4:cpu,cpuacct:/docker/0123abcd",
        {"cpu,cpuacct/cpu.cfs_quota_us": "200000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
    )
    assert cpu_quota(proc, root) == 2.0


def cgroup_v1_with_quota(name: str, cpus_allowed: float) -> Path:
    """A real cgroup (v1 cpu controller) with a CPU quota, or a skip where none can be made."""
    base = Path("/sys/fs/cgroup/cpu")
    if not (base / "cpu.cfs_quota_us").is_file():
        pytest.skip("no cgroup v1 cpu controller mounted at /sys/fs/cgroup/cpu")
    group = base / name
    try:
        group.mkdir(exist_ok=True)
    except OSError as e:
        pytest.skip(f"cannot make a cgroup here: {e}")
    try:
        (group / "cpu.cfs_quota_us").write_text(str(int(cpus_allowed * 100000)))
    except OSError as e:
        group.rmdir()
        pytest.skip(f"cannot set a cgroup's quota here: {e}")
    return group


@pytest.mark.skipif(cpus() < 2, reason="a quota of 1 CPU bounds nothing on a 1-CPU machine")
def test_a_process_allowed_one_cpu_of_two_chooses_threads_for_one_core():
    """In a real cgroup allowed 1 CPU's time on a machine of 2: ``SNNET_THREADS=auto`` takes one
    thread, without timing two (which the quota would throttle), and says why."""
    group = cgroup_v1_with_quota(f"snnet-test-{os.getpid()}", 1.0)
    script = (
        "import torch\n"
        "from server.environ import cores, cpus\n"
        "from server.profiling import choose_threads\n"
        "print(cores(), cpus(), choose_threads(None, None, 0.0))\n"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", script],
            preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())),
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
    finally:
        group.rmdir()
    n = cpus()
    assert out.strip() == f"1 {n} (1, '1 core (a CPU quota of 1 CPU on {n})')", out


def test_the_prometheus_selector_takes_promql_label_matchers_and_refuses_the_rest():
    """SNNET_PROMETHEUS_SELECTOR goes into every fleet query: a bad one would fail every query
    for the server's lifetime (seen only in /controller), so it is refused at start-up."""
    from pydantic import ValidationError

    from server.config import Settings

    for given, kept in [
        ('job="snnet",namespace="prod"', 'job="snnet",namespace="prod"'),
        ('{job="snnet"}', 'job="snnet"'),  # as written in a selector
        ("job='x', pod=~`snnet-.*`", "job='x', pod=~`snnet-.*`"),
        ('job="a\\"b"', 'job="a\\"b"'),
        ("", ""),
    ]:
        assert Settings(prometheus_selector=given).prometheus_selector == kept
    for bad in [
        "job=snnet",
        'job="\\q"',
        'job="a\nb"',
        '__name__="x"',
        '{{job="x"}}',
        'job="x" a="y"',
    ]:
        with pytest.raises(ValidationError, match="PromQL label matchers"):
            Settings(prometheus_selector=bad)


def test_budget_settings_that_would_refuse_every_request_are_refused_at_start_up():
    """SNNET_NETWORK_MS at or over SNNET_DEFAULT_BUDGET_MS left nothing to the server: every
    request without a budget got a 422; a default budget over the hour a request may give was
    accepted and reported as given."""
    from pydantic import ValidationError

    from server.config import Settings

    assert Settings(network_ms=999.0).network_ms == 999.0
    with pytest.raises(ValidationError, match="SNNET_NETWORK_MS=2000 leaves nothing of "):
        Settings(network_ms=2000.0)
    with pytest.raises(ValidationError, match="less than or equal to 3600000"):
        Settings(default_budget_ms=5_000_000)


def test_settings_that_start_up_or_the_protocol_could_not_use_are_refused_at_start_up():
    """Each passed validation, then: a batch size of 0 to profile failed inside start-up (a
    traceback; the server stayed up, never ready); an empty profile cache (an unset compose
    variable) was the directory "."; a request of more images than the queue holds was told
    to retry for ever; a model name with "/" could not be reached; nan was "not <= 0.999"."""
    from pydantic import ValidationError

    from server.config import Settings

    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        Settings(profile_batch_sizes=[1, 0])
    assert Settings(profile_cache="").profile_cache is None  # (the default place)
    assert Settings(profile_cache=" ").profile_cache is None
    with pytest.raises(ValidationError, match=r"SNNET_MAX_IMAGES_PER_REQUEST=12 is more than "
                       r"SNNET_MAX_QUEUE=8: a request that large would never fit"):  # fmt: skip
        Settings(max_queue=8, max_images_per_request=12)
    assert Settings(max_queue=8, max_images_per_request=8).max_queue == 8
    for name in ("a/b", "", " "):
        with pytest.raises(ValidationError, match="model_name must be a non-empty name without"):
            Settings(model_name=name)
    assert Settings(model_name="digits-v2.1").model_name == "digits-v2.1"
    for field in ("slo_target", "default_budget_ms", "network_ms"):
        with pytest.raises(ValidationError, match="finite number"):
            Settings(**{field: float("nan")})


def test_the_promise_is_a_share_the_margin_can_be_fitted_to():
    """SNNET_SLO_TARGET: 0.8 to 0.995. Above, the margin's cap (half the prediction) cannot
    keep it on this VM's answers; below 0.8 the margin's quantile would fall inside the tail it
    is extrapolated from."""
    from pydantic import ValidationError

    from server.config import Settings

    assert Settings().slo_target == 0.99
    assert Settings(slo_target=0.95).slo_target == 0.95
    for bad in (1.0, 0.999, 0.5):
        with pytest.raises(ValidationError, match="slo_target"):
            Settings(slo_target=bad)
