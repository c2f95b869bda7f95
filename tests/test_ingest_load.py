"""The load benchmark's figures (headavatar.bench.ingest_load) from hand-made timelines whose answers are known:
how many captures overlap, how busy a worker was, and whether captures finished in the order they started."""

from __future__ import annotations

import pytest
from scipy.stats import kendalltau

from headavatar.bench.ingest_load import Span, busy, in_progress, kendall_tau, priority_picks


def test_captures_in_progress_count_overlaps_over_their_extent() -> None:
    # Depth-first: each capture done before the next starts -> never more than one in progress.
    assert in_progress([(0, 10), (10, 20), (20, 30)]) == (1, 1.0)
    # Breadth-first: three started at once, all in progress until near the end.
    most, mean = in_progress([(0, 30), (0, 29), (0, 28)])
    assert most == 3 and mean == pytest.approx((30 + 29 + 28) / 30)


def test_finish_order_against_start_order_is_kendalls_tau() -> None:
    starts, ends = [0, 1, 2, 3, 4, 5], [10, 12, 11, 20, 30, 25]
    assert kendall_tau(starts, ends) == pytest.approx(kendalltau(starts, ends).statistic)  # no ties: tau-a = tau-b
    assert kendall_tau([0, 1, 2], [3, 2, 1]) == -1.0 and kendall_tau([5], [7]) == 1.0


def test_worker_busyness_counts_task_seconds_per_slot_and_idle_gaps() -> None:
    spans = [Span("201", "extract", "a-cpu", 0, 10), Span("202", "extract", "a-cpu", 5, 15),
             Span("201", "matting", "b-gpu", 20, 30)]
    out = busy(spans, {"a-cpu": 2, "b-gpu": 1}, (0, 40))
    assert out["a-cpu"] == {"slots": 2, "tasks": 2, "utilisation": 0.25, "any_task_running": 0.375}
    assert out["b-gpu"] == {"slots": 1, "tasks": 1, "utilisation": 0.25, "any_task_running": 0.25}


def test_priority_picks_count_when_the_higher_weight_waiting_went_first() -> None:
    # meshhead (weight 5) of capture 201 was ready at 10; matting (3) of 202 was queued at 12 before it: inverted.
    # gaussianhead (6) of 201, ready at 20, went at 21 before 203's matting at 25: held.
    spans = [Span("201", "meshhead", "a-gpu", 14, 20, queued=13, ready=10, weight=5),
             Span("202", "matting", "b-gpu", 12, 18, queued=12, ready=5, weight=3),
             Span("201", "gaussianhead", "a-gpu", 21, 30, queued=21, ready=20, weight=6),
             Span("203", "matting", "b-gpu", 25, 28, queued=25, ready=22, weight=3)]
    picks = priority_picks(spans, ("matting", "meshhead", "gaussianhead"))
    # Pairs (higher, lower) with the higher ready by the lower's queueing: (meshhead 201, matting 202): inverted;
    # (meshhead 201, matting 203): held; (gaussianhead 201, matting 203): held; (gaussianhead 201, matting 202): the
    # gaussianhead was not ready when 202's matting was queued, so not counted.
    assert picks == {"held": 2, "inverted": 1}
