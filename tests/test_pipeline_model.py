"""benchmarks/pipeline_model.py: the schedule simulation against textbook pipeline formulas, and
the report it writes."""

import pytest

from benchmark_scripts import load_benchmark

pm = load_benchmark("pipeline_model")


def _simulate(schedule, ranks, microbatches, times, transfer=0.0, hide=0.0):
    cls, local, overlap = pm.SCHEDULES[schedule]
    v_shape = cls in (pm.ScheduleZBVZeroBubble, pm.ScheduleDualPipeV)
    rank_of = [pm.stage_to_rank(s, ranks, local, v_shape) for s in range(ranks * local)]
    orders = pm.action_orders(cls, ranks, local, microbatches)
    return pm.simulate(orders, rank_of, times, transfer, overlap, hide)


@pytest.mark.parametrize("schedule", ["1F1B", "GPipe"])
@pytest.mark.parametrize("ranks, microbatches", [(2, 4), (4, 8), (3, 7)])
def test_one_stage_schedules_take_the_textbook_time(schedule, ranks, microbatches):
    """Uniform stages, instant links: (M + P - 1)·(f + b)."""
    f, i, w = 1.0, 1.5, 0.5
    step = _simulate(schedule, ranks, microbatches, [pm.StageTimes(f, i, w)] * ranks)
    assert step == pytest.approx((microbatches + ranks - 1) * (f + i + w))


@pytest.mark.parametrize("schedule", ["Interleaved 1F1B", "ZBV", "DualPipeV", "DualPipeV + overlap"])
def test_two_stage_schedules_beat_1f1b_and_links_only_add(schedule):
    ranks, microbatches = 4, 16
    half = pm.StageTimes(0.5, 0.5, 0.5, 0.1, 0.1)  # a stage of half the blocks
    whole = pm.StageTimes(1.0, 1.0, 1.0, 0.2, 0.2)
    one_f1b = _simulate("1F1B", ranks, microbatches, [whole] * ranks)
    ideal = _simulate(schedule, ranks, microbatches, [half] * (2 * ranks))
    work = microbatches * 3.0  # per rank
    assert work <= ideal < one_f1b
    assert _simulate(schedule, ranks, microbatches, [half] * (2 * ranks), transfer=0.3) >= ideal


def test_overlap_never_loses_and_hides_what_it_is_told():
    ranks, microbatches = 2, 8
    times = [pm.StageTimes(0.5, 0.5, 0.5, 0.1, 0.1)] * 4
    plain = _simulate("DualPipeV", ranks, microbatches, times, transfer=0.2)
    overlapped = _simulate("DualPipeV + overlap", ranks, microbatches, times, transfer=0.2)
    hidden = _simulate("DualPipeV + overlap", ranks, microbatches, times, transfer=0.2, hide=1.0)
    assert overlapped <= plain and hidden < overlapped


def test_report_runs_on_the_assumed_times():
    times = pm.assumed_times()
    text = pm.report(times, {"gpu-moe-3b": 6}, {"gpu-moe-3b": [2, 3]}, 0.5)
    assert "ASSUMED" in text and "| 3 | 6 | DualPipeV + overlap |" in text
    assert "| 41.9 |" in text  # mHC stage edge: 4096 tokens x 4 streams x 1280 x 2 bytes
