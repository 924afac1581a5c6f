"""Step windows (diffeditor.schedule): fractions of the run -> step indices."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from diffeditor.schedule import Schedule, ScheduleSpec, Window, union_indices

PROPS = settings(max_examples=150, deadline=None)

fractions = st.one_of(
    st.floats(0.0, 1.0, allow_nan=False),
    st.sampled_from([0.0, 0.1, 0.2, 0.22, 0.4, 0.42, 0.6, 0.72, 1.0]),  # the reference's values
)


@st.composite
def windows(draw, explicit: bool = True):
    if explicit and draw(st.integers(0, 5)) == 0:
        return Window(steps=tuple(draw(st.lists(st.integers(0, 1200), max_size=20))))
    a, b = sorted((draw(fractions), draw(fractions)))
    return Window(start=a, stop=b, every=draw(st.one_of(st.integers(1, 4), st.integers(1, 1000))))


step_counts = st.integers(1, 1000)


def _inside(w: Window, i: int, n: int) -> bool:
    """Independent statement of the window rule: start*N <= i < stop*N (up to 1e-9 of
    rounding slack, so decimal fractions such as 0.22*50 land on their integer), every | i."""
    return w.start * n - 1e-9 <= i < w.stop * n - 1e-9 and i % w.every == 0 and i < n


@PROPS
@given(w=windows(), n=step_counts)
def test_indices_in_range_sorted_and_strided(w, n):
    idx = w.indices(n)
    assert all(isinstance(i, int) for i in idx)
    assert all(0 <= i < n for i in idx)
    assert all(a < b for a, b in zip(idx, idx[1:])), "strictly increasing"
    if w.steps is None:
        assert all(i % w.every == 0 for i in idx)
        assert idx == [i for i in range(n) if _inside(w, i, n)]
    else:
        assert idx == sorted({s for s in w.steps if s < n})


@PROPS
@given(a=fractions, every=st.integers(1, 7), n=step_counts)
def test_full_and_empty_windows(a, every, n):
    assert Window(start=0.0, stop=1.0).indices(n) == list(range(n))
    assert Window(start=0.0, stop=1.0, every=every).indices(n) == list(range(0, n, every))
    assert Window(start=a, stop=a, every=every).indices(n) == []
    # stop = 1.0 always reaches the last stride point
    idx = Window(start=a, stop=1.0).indices(n)
    if a * n - 1e-9 <= n - 1:
        assert idx[-1] == n - 1
    else:
        assert idx == []


@PROPS
@given(w=windows(), n=st.integers(-5, 0))
def test_no_steps_no_indices(w, n):
    assert w.indices(n) == []


@PROPS
@given(ws=st.lists(windows(), max_size=5), n=step_counts)
def test_union_sorted_and_exact(ws, n):
    u = union_indices(ws, n)
    assert u == sorted(set(u))
    assert set(u) == set().union(*[set(w.indices(n)) for w in ws])
    assert union_indices(tuple(ws), n) == u


@PROPS
@given(a=st.floats(0.0, 1.0), b=st.floats(0.0, 1.0))
def test_start_after_stop_rejected(a, b):
    lo, hi = sorted((a, b))
    if lo == hi:
        return
    with pytest.raises(ValidationError):
        Window(start=hi, stop=lo)
    Window(start=lo, stop=hi)  # the right order is fine


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(start=-0.1),
        dict(stop=1.5),
        dict(every=0),
        dict(steps=(1, -2)),
        dict(bogus=1),
    ],
)
def test_window_bounds_rejected(kwargs):
    with pytest.raises(ValidationError):
        Window(**kwargs)


def test_window_is_frozen():
    w = Window(start=0.1, stop=0.5)
    with pytest.raises(ValidationError):
        w.start = 0.2
    assert hash(w) == hash(Window(start=0.1, stop=0.5))


@pytest.mark.parametrize(
    "start, stop, n, expect",
    [
        (0.14, 0.57, 100, range(14, 57)),  # 0.14*100 = 14.000000000000002 in floating point
        (0.29, 0.7, 100, range(29, 70)),  # 0.29*100 = 28.999999999999996
        (0.0, 0.14, 100, range(0, 14)),  # stop overshoots too: step 14 is excluded
        (0.22, 0.4, 50, range(11, 20)),
    ],
)
def test_decimal_fractions_land_on_their_integer(start, stop, n, expect):
    assert Window(start=start, stop=stop).indices(n) == list(expect)


def test_explicit_steps_override():
    w = Window(start=0.5, stop=0.6, every=7, steps=(30, 3, 3, 1, 0, 49, 50, 999))
    assert w.indices(50) == [0, 1, 3, 30, 49]
    assert w.indices(10) == [0, 1, 3]
    assert w.indices(1) == [0]
    assert Window(steps=()).indices(50) == []


@PROPS
@given(steps=st.lists(st.integers(0, 100), max_size=10), start=fractions, every=st.integers(1, 9),
       n=st.integers(1, 120))
def test_explicit_steps_ignore_fractions(steps, start, every, n):
    w = Window(start=start, stop=1.0, every=every, steps=tuple(steps))
    assert w.indices(n) == sorted({s for s in steps if s < n})


# -- the reference's windows at N = 50 ---------------------------------------------------------

def test_reference_schedule_at_50_steps():
    s = Schedule.resolve(ScheduleSpec(), 50, Window(start=0.1, stop=1.0))
    assert s.num_steps == 50
    assert s.guidance == frozenset(range(10)) | frozenset(range(10, 29, 2))
    assert len(s.guidance) == 20
    # the reference's condition, verbatim
    assert s.guidance == {i for i in range(50) if i < 30 and (i < 10 or i % 2 == 0)}
    assert s.sde == frozenset(range(11, 20)) == {i for i in range(50) if 10 < i < 20}
    assert s.time_travel == frozenset({22, 24, 26, 28})
    assert s.time_travel == {i for i in range(50) if 20 < i < 30 and i % 2 == 0}
    assert s.time_travel_repeats == 3
    assert s.image_prompt == frozenset(range(10, 20))
    assert s.memory_bank == frozenset(range(5, 50))
    assert sum(s.passes(i) for i in s.guidance) == 28
    assert [s.passes(i) for i in (21, 22, 23, 28, 29, 30)] == [1, 3, 1, 3, 1, 1]
    assert s.passes(0) == 1


def test_reference_memory_bank_windows():
    assert Window(start=0.1, stop=1.0).indices(50) == [i for i in range(50) if i >= 5]
    assert Window(start=0, stop=0.72).indices(50) == [i for i in range(50) if i <= 35]
    s = Schedule.resolve(ScheduleSpec(), 50, Window(start=0, stop=0.72))
    assert s.memory_bank == frozenset(range(36))
    # a spec-level memory-bank window wins over the task's own
    spec = ScheduleSpec(memory_bank=Window(steps=(1, 2)))
    assert Schedule.resolve(spec, 50, Window(start=0, stop=0.72)).memory_bank == {1, 2}


def test_time_travel_outside_guidance_is_one_pass():
    spec = ScheduleSpec(guidance=(Window(start=0.0, stop=0.2),), time_travel_repeats=5)
    s = Schedule.resolve(spec, 50, Window())
    assert s.time_travel == {22, 24, 26, 28}
    assert all(s.passes(i) == 1 for i in range(50))
    s2 = Schedule.resolve(ScheduleSpec(time_travel_repeats=5), 50, Window())
    assert s2.passes(22) == 5


@PROPS
@given(n=step_counts)
def test_default_schedule_any_step_count(n):
    s = Schedule.resolve(ScheduleSpec(), n, Window(start=0.1, stop=1.0))
    for field in ("guidance", "sde", "time_travel", "image_prompt", "memory_bank"):
        assert all(0 <= i < n for i in getattr(s, field)), field
    assert s.time_travel <= s.guidance
    assert all(s.passes(i) in (1, 3) for i in range(n))


# -- pydantic round trip -----------------------------------------------------------------------

@st.composite
def schedule_specs(draw):
    kw = {}
    if draw(st.booleans()):
        kw["guidance"] = tuple(draw(st.lists(windows(), max_size=3)))
    for name in ("sde", "time_travel", "image_prompt"):
        if draw(st.booleans()):
            kw[name] = draw(windows())
    if draw(st.booleans()):
        kw["time_travel_repeats"] = draw(st.integers(1, 20))
    if draw(st.booleans()):
        kw["memory_bank"] = draw(st.one_of(st.none(), windows()))
    return ScheduleSpec(**kw)


@PROPS
@given(spec=schedule_specs(), n=st.integers(1, 200))
def test_schedule_spec_round_trip(spec, n):
    again = ScheduleSpec.model_validate(spec.model_dump())
    assert again == spec
    from_json = ScheduleSpec.model_validate_json(spec.model_dump_json())
    assert from_json == spec
    bank = Window(start=0.1, stop=1.0)
    assert Schedule.resolve(from_json, n, bank) == Schedule.resolve(spec, n, bank)


def test_schedule_spec_rejects_unknown_and_bad_values():
    with pytest.raises(ValidationError):
        ScheduleSpec(guidence=())
    with pytest.raises(ValidationError):
        ScheduleSpec(time_travel_repeats=0)
    with pytest.raises(ValidationError):
        ScheduleSpec.model_validate({"sde": {"start": 0.5, "stop": 0.4}})
