"""The model runners: the child process gives the in-thread answers, survives its own death."""

import os
import signal

import pytest
import torch

from server.runner import InlineRunner, ProcessRunner, RunnerError


@pytest.fixture(scope="module")
def runners():
    from tests.conftest import build_tiny

    net = build_tiny().eval()
    inline = InlineRunner(net, torch.device("cpu"), torch.float32)
    proc = ProcessRunner(net, torch.float32, threads=1)
    yield inline, proc
    proc.close()


def test_the_process_runner_answers_like_the_model_in_this_process(runners, digits):
    inline, proc = runners
    x = digits[0][:8]
    for stitch in (0, 5, 22):
        expected = inline(x, stitch)
        got = proc(x, stitch)
        assert got.dtype == torch.float32 and got.shape == (8, 10)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_child_shares_the_weights_instead_of_copying_them(runners):
    inline, proc = runners
    assert all(p.is_shared() for p in inline.net.parameters())


def test_a_model_error_is_reported_and_the_child_goes_on(runners, digits):
    _, proc = runners
    with pytest.raises(RunnerError, match="ValueError: unknown stitch id 999"):
        proc(digits[0][:2], 999)  # no such stitch
    assert proc(digits[0][:2], 1).shape == (2, 10)


def test_a_killed_child_fails_its_batch_and_is_replaced(runners, digits):
    inline, proc = runners
    old = proc.pid
    os.kill(old, signal.SIGKILL)
    with pytest.raises(RunnerError, match="died"):
        proc(digits[0][:4], 3)
    assert proc.pid != old and proc.restarts == 1
    torch.testing.assert_close(proc(digits[0][:4], 3), inline(digits[0][:4], 3))


def test_ctrl_c_to_the_process_group_leaves_the_child_serving(runners, digits):
    """The parent drains accepted requests on Ctrl-C and still needs the model for that."""
    _, proc = runners
    pid, restarts = proc.pid, proc.restarts
    os.kill(pid, signal.SIGINT)
    assert proc(digits[0][:2], 0).shape == (2, 10)
    assert (proc.pid, proc.restarts) == (pid, restarts)
