"""Admission's estimate of the work in flight, on its own, with a hand-driven clock."""
from __future__ import annotations

import pytest

from tuneserve.service.engine.admission import Admission, Deadline, Pacing, WorkEstimate


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def steady_load(work: WorkEstimate, clock: Clock, in_flight: int, per_second: int, seconds: float) -> None:
    """Keep `in_flight` images in flight while one finishes every 1/per_second seconds."""
    work.started(in_flight - work.in_flight)
    for _ in range(int(seconds * per_second)):
        clock.now += 1 / per_second
        work.finished(1)
        work.started(1)


def test_nothing_measured_or_nothing_ahead_means_no_wait():
    clock = Clock()
    work = WorkEstimate(clock)
    assert work.wait_s() == 0.0 and work.rate() is None
    work.started(1)
    clock.now += 0.01
    work.finished(1)
    assert work.wait_s() == 0.0  # nothing in flight now


def test_under_sustained_load_the_wait_is_the_work_ahead_over_the_rate():
    clock = Clock()
    work = WorkEstimate(clock)
    steady_load(work, clock, in_flight=20, per_second=100, seconds=2)
    rate, load = work.rate()
    assert rate == pytest.approx(100, rel=0.02) and load == pytest.approx(20, rel=0.05)
    assert work.wait_s(1) == pytest.approx(21 / 100, rel=0.02)
    assert work.wait_s(16) == pytest.approx(36 / 100, rel=0.02)


def test_idle_time_is_not_counted_as_busy():
    clock = Clock()
    work = WorkEstimate(clock)
    for _ in range(10):  # one request at a time, 10 ms each, one every second
        work.started(1)
        clock.now += 0.01
        work.finished(1)
        clock.now += 0.99
    rate, _ = work.rate()  # over the 3 s window: 3 images in 30 ms of busy time
    assert rate == pytest.approx(100, rel=0.02)


def test_a_rate_measured_under_less_load_is_scaled_up_to_the_parallelism():
    clock = Clock()
    work = WorkEstimate(clock, parallelism=2)
    steady_load(work, clock, in_flight=1, per_second=50, seconds=2)  # one at a time: 50 images/s
    work.started(1)  # 2 in flight: twice the load it was measured under
    assert work.wait_s() == pytest.approx(3 / 100, rel=0.03)
    work.started(62)  # 64 in flight: the scale stops at the parallelism, 2
    assert work.wait_s() == pytest.approx(65 / 100, rel=0.03)
    steady_load(work, clock, in_flight=64, per_second=150, seconds=3)  # now measured under that load
    assert work.wait_s() == pytest.approx(65 / 150, rel=0.03)


def test_work_refused_after_admission_does_not_raise_the_rate():
    clock = Clock()
    work = WorkEstimate(clock)
    steady_load(work, clock, in_flight=10, per_second=100, seconds=1)
    before = work.rate()[0]
    work.started(50)
    clock.now += 0.001
    work.finished(50, served=False)  # shed at their deadline: no work done
    assert work.rate()[0] == pytest.approx(before, rel=0.02) and work.in_flight == 10


def test_deadline():
    d = Deadline(arrived=10.0, expires=11.0)
    assert not d.expired(now=10.5) and d.expired(now=11.01)
    admission = Admission(bound_s=1.0, max_in_flight=8, clock=lambda: 20.0)
    assert admission.deadline() == Deadline(20.0, 21.0)  # arriving now
    assert admission.deadline(arrived=19.5) == Deadline(19.5, 20.5)  # the edge began it earlier: the bound counts from there


def test_a_refusal_is_held_the_bound_and_longer_when_many_are_held_at_most_max_hold():
    clock = Clock()
    pacing = Pacing(bound_s=1.0, clock=clock, max_hold_s=4.0)
    assert pacing.answer_at(None) == clock.now + 1.0  # nothing measured: the bound
    assert pacing.answer_at(50.0) == clock.now + 1.0  # 1 held: served in 20 ms at 50 images/s, under the bound
    for _ in range(98):
        pacing.answer_at(50.0)
    assert pacing.held() == 100
    assert pacing.answer_at(50.0) == pytest.approx(clock.now + 2.0)  # 100 held at 50/s: each comes back in 2 s
    for _ in range(400):
        pacing.answer_at(50.0)
    assert pacing.answer_at(50.0) == pytest.approx(clock.now + 4.0)  # capped
    clock.now += 4.5  # every hold has ended: back to the bound
    assert pacing.held() == 0 and pacing.answer_at(50.0) == pytest.approx(clock.now + 1.0)
    assert Pacing(bound_s=10.0, clock=clock).answer_at(1.0) == clock.now + 10.0  # never shorter than the bound


def test_admission_refuses_beyond_the_in_flight_limit_with_a_paced_answer():
    clock = Clock()
    admission = Admission(bound_s=1.0, max_in_flight=4, clock=clock)
    assert admission.refusal(4) is None
    admission.work.started(4)
    refused = admission.refusal(1)
    assert refused.status == 503 and refused.headers["Retry-After"] == "1"
    assert "TUNESERVE_MAX_IN_FLIGHT=4" in refused.message and refused.answer_at == clock.now + 1.0
