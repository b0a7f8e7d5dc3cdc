"""The log's tally of refused requests (server.metrics.Tally): one line at most every so often,
saying how many since the last line and why the last one was refused."""

from server.metrics import Tally


def test_a_tally_says_the_first_refusal_at_once_then_sums_up_at_most_every_period():
    t = Tally("refused", 422)
    assert t.due(100.0, 10.0) is None  # nothing refused: nothing to say
    t.add("latency_budget_ms=1 is below ...")
    assert t.due(100.0, 10.0) == (
        "refused 1 request (422) since start-up; the last: latency_budget_ms=1 is below ..."
    )
    assert t.due(101.0, 10.0) is None  # said already
    t.add("a")
    t.add("unknown stitch_id 99")
    assert t.due(105.0, 10.0) is None  # within the period: held back, not lost
    said = t.due(112.0, 10.0, "load level 0.50")
    assert said == (
        "refused 2 requests (422) in the last 12 s; load level 0.50; the last: unknown stitch_id 99"
    )
    assert t.due(130.0, 10.0) is None
