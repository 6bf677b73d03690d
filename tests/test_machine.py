"""Machine facts: the dtype decision (a pure function, fed injected timings), the time-capped race and probes."""

import time

import pytest
import torch

from minigrok import ModelConfig, machine
from minigrok.machine import DECISIVE_S, DROP_FACTOR, choose_dtype, race, resolve_dtype

CPU = torch.device("cpu")
DEMO = ModelConfig.from_yaml("demo-cpu")


@pytest.mark.parametrize(
    "rates,expected",
    [
        ({"fp32": 46.5e9, "bf16": 80e9}, "bf16"),  # a CPU with native bf16
        ({"fp32": 46.5e9, "bf16": 46.5e9 / 40}, "fp32"),  # bf16 emulated: 40x slower
        ({"fp32": 46.5e9, "bf16": 0.55 * 46.5e9}, "fp32"),
        ({"fp32": 46.5e9}, "fp32"),  # fp32 is the only candidate
        ({"fp32": 46.5e9, "bf16": None}, "fp32"),  # bf16 could not be measured
        ({"fp32": 100e9, "bf16": 105e9}, "fp32"),  # a near tie keeps the safer dtype
        ({"fp32": 100e9, "bf16": 120e9}, "fp32"),  # a small matmul gain is no gain for the whole step
        ({"fp32": 100e9, "bf16": 126e9}, "bf16"),
        ({"fp32": 100e9, "bf16": 300e9, "fp16": 310e9}, "bf16"),  # fp16 must beat bf16 clearly, not by a hair
        ({"fp32": 100e9, "bf16": 300e9, "fp16": 400e9}, "fp16"),
        ({"fp32": 100e9, "fp16": 300e9}, "fp16"),  # a GPU without bf16
    ],
)
def test_choice_is_the_fastest_clearly_faster_dtype(rates, expected):
    assert choose_dtype(rates) == expected


def test_choice_needs_a_measurement():
    with pytest.raises(ValueError, match="no dtype was measured"):
        choose_dtype({"fp32": None})


class FakeMachine:
    """A clock and a `measure` for the race: a call of `dtype` on `rows` rows costs cost(dtype, rows) seconds, and a
    measurement spends three calls of clock time (warm-up + two timed), as time_call does."""

    def __init__(self, cost):
        self.cost, self.now, self.calls = cost, 0.0, []

    def clock(self) -> float:
        return self.now

    def measure(self, dtype: str, rows: int, deadline: float):
        per_call = self.cost(dtype, rows)
        if self.now + per_call > deadline:
            return None
        self.now += 3 * per_call
        self.calls.append((dtype, rows))
        return per_call


def linear(seconds_per_row: dict[str, float]):
    return lambda dtype, rows: seconds_per_row[dtype] * rows


def rates_of(reached: dict) -> dict[str, float]:
    return {dtype: rows / seconds for dtype, (rows, seconds) in reached.items()}


def test_race_drops_a_very_slow_dtype_on_the_first_decisive_problem():
    fake = FakeMachine(linear({"fp32": 1e-6, "bf16": 40e-6}))
    reached = race(fake.measure, ["fp32", "bf16"], max_rows=8192, first_rows=4, budget_s=0.5, clock=fake.clock)
    # fp32 needs 1024 rows for a call of DECISIVE_S; bf16 is never timed past them
    assert DECISIVE_S == pytest.approx(1024e-6, rel=0.03)
    assert [rows for dtype, rows in fake.calls if dtype == "bf16"] == [4, 16, 64, 256, 1024]
    assert reached["fp32"] == (8192, pytest.approx(8192e-6)) and reached["bf16"][0] == 1024
    assert fake.now <= 0.5 and choose_dtype(rates_of(reached)) == "fp32"


def test_race_does_not_judge_on_problems_too_small_to_time():
    # bf16 pays a fixed 0.4 ms per call (a weight cast, a kernel launch) that only small problems notice.
    fake = FakeMachine(lambda dtype, rows: 0.1e-3 + rows * 1e-6 if dtype == "fp32" else 0.4e-3 + rows * 0.3e-6)
    reached = race(fake.measure, ["fp32", "bf16"], max_rows=4096, first_rows=4, budget_s=0.5, clock=fake.clock)
    assert reached["fp32"][0] == reached["bf16"][0] == 4096 and choose_dtype(rates_of(reached)) == "bf16"


def test_race_keeps_close_dtypes_to_the_largest_problem_that_fits():
    fake = FakeMachine(linear({"fp32": 2e-6, "bf16": 1e-6}))
    reached = race(fake.measure, ["fp32", "bf16"], max_rows=1 << 20, first_rows=16, budget_s=0.5, clock=fake.clock)
    assert reached["fp32"][0] == reached["bf16"][0] > 16  # compared on one problem, grown while it fit
    assert fake.now <= 0.5 and choose_dtype(rates_of(reached)) == "bf16"


def test_race_does_not_compare_on_a_level_the_deadline_cut_short():
    # bf16 stays within DROP_FACTOR on small problems, then falls off a cliff the prediction cannot see.
    fake = FakeMachine(lambda dtype, rows: rows * (1e-6 if dtype == "fp32" else 2.5e-6 if rows < 256 else 1e-3))
    assert 2.5 < DROP_FACTOR
    reached = race(fake.measure, ["fp32", "bf16"], max_rows=4096, first_rows=16, budget_s=0.1, clock=fake.clock)
    assert ("fp32", 256) in fake.calls and ("bf16", 256) not in fake.calls
    assert reached["fp32"][0] == reached["bf16"][0] == 64


def test_race_goes_on_without_a_dtype_the_deadline_left_untimed():
    # On a loaded machine bf16's first call does not fit the budget at all: fp32 alone goes on growing.
    fake = FakeMachine(lambda dtype, rows: rows * 1e-6 + (0 if dtype == "fp32" else 10.0))
    reached = race(fake.measure, ["fp32", "bf16"], max_rows=4096, first_rows=16, budget_s=0.5, clock=fake.clock)
    assert set(reached) == {"fp32"} and reached["fp32"][0] == 4096 and choose_dtype(rates_of(reached)) == "fp32"


def test_auto_takes_the_measured_choice(measured):
    choice = resolve_dtype("auto", DEMO, 3072, CPU, training=True)
    assert (choice.dtype, choice.source, choice.note) == ("bf16", "auto", None)
    assert choice.to_dict()["dtype_gflops"] == {"fp32": 50.0, "bf16": 100.0}
    assert "bf16" in choice.summary() and "50.0 GFLOP/s" in choice.summary()


def test_explicit_fp32_is_not_measured(measured):
    assert resolve_dtype("fp32", DEMO, 3072, CPU, training=True).dtype == "fp32"
    assert measured.calls == 0


def test_explicit_slow_dtype_is_honoured_with_a_warning(measured):
    measured.rates = {"fp32": 46.5e9, "bf16": 1.0e9}
    choice = resolve_dtype("bf16", DEMO, 3072, CPU, training=True, field="train.dtype")
    assert choice.dtype == "bf16" and choice.source == "explicit"
    assert "warning: bf16 measured 46.5x slower than fp32" in choice.note and "auto would choose fp32" in choice.note
    measured.rates = {"fp32": 46.5e9, "bf16": 30e9}  # slower, but not 2x: no warning
    assert resolve_dtype("bf16", DEMO, 3072, CPU, training=True).note is None


def test_a_resumed_run_keeps_its_dtype_and_says_when_this_machine_differs(measured):
    measured.rates = {"fp32": 46.5e9, "bf16": 1.0e9}
    choice = resolve_dtype("auto", DEMO, 3072, CPU, training=True, recorded="bf16")
    assert (choice.dtype, choice.source) == ("bf16", "resumed")
    assert "measures fp32 fastest; the run keeps its bf16" in choice.note
    assert resolve_dtype("auto", DEMO, 3072, CPU, training=True, recorded="fp32").note is None
    forced = resolve_dtype("fp32", DEMO, 3072, CPU, training=True, recorded="bf16")
    assert forced.dtype == "fp32" and "not bit for bit" in forced.note


@pytest.mark.parametrize("recorded", ["fp16", "fp64"])
def test_a_recorded_dtype_this_device_cannot_run_is_refused_with_the_fix(recorded):
    with pytest.raises(
        ValueError, match=f"trained in '{recorded}', which cannot run on cpu; set train.dtype to one of"
    ):
        resolve_dtype("auto", DEMO, 3072, CPU, training=True, recorded=recorded, field="train.dtype")


def test_a_dtype_the_probe_could_not_time_is_not_chosen_and_said(measured):
    measured.rates = {"fp32": 46.5e9}
    choice = resolve_dtype("auto", DEMO, 3072, CPU, training=True)
    assert choice.dtype == "fp32" and "bf16 could not be timed within the probe's" in choice.note
    measured.rates = {}  # not even fp32: the safe default
    assert resolve_dtype("auto", DEMO, 3072, CPU, training=True).dtype == "fp32"


@pytest.mark.parametrize(
    "requested,message",
    [("fp16", "train.dtype=fp16 is not supported on cpu (fp16 needs loss scaling"), ("fp8", "train.dtype='fp8'")],
)
def test_unusable_dtypes_name_the_field_and_the_choices(requested, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as error:
        resolve_dtype(requested, DEMO, 3072, CPU, training=True, field="train.dtype")
    assert "auto" in str(error.value)


@pytest.mark.parametrize("training,rows", [(True, 12 * 256), (False, 1), (False, 8 * 256)])
def test_the_real_probe_finishes_within_its_cap(training, rows):
    start = time.perf_counter()
    rates, probe_rows, wall_s = machine.measure_dtypes.__wrapped__(machine.matmul_shapes(DEMO), rows, CPU, training)
    assert time.perf_counter() - start < 1.0  # the promise: under a second on any CPU, however slow a dtype is
    # fp32 is timed first; on a heavily loaded machine the cap can leave bf16 untimed, which the choice survives.
    assert "fp32" in rates and set(rates) <= {"fp32", "bf16"} and all(rate > 0 for rate in rates.values())
    assert all(1 <= r <= rows for r in probe_rows.values()) and wall_s <= time.perf_counter() - start
    assert choose_dtype(rates) in rates


def test_the_matmul_peak_is_time_capped_and_measured_once(monkeypatch):
    start = time.perf_counter()
    peak = machine.matmul_peak_flops.__wrapped__("bf16", CPU)
    assert time.perf_counter() - start < 0.5 and peak > 0
    first = machine.matmul_peak_flops("fp32", CPU)
    monkeypatch.setattr(machine, "time_call", lambda *args, **kwargs: pytest.fail("measured twice"))
    assert machine.matmul_peak_flops("fp32", CPU) == first


def test_time_call_never_starts_past_its_deadline():
    calls = []
    assert machine.time_call(lambda: calls.append(1), CPU, deadline=time.perf_counter() - 1) is None
    assert calls == []
    seconds = machine.time_call(lambda: time.sleep(0.01), CPU, deadline=time.perf_counter() + 0.05)
    assert 0.009 < seconds < 0.05
    # Room for the warm-up alone: a warm-up is no measurement.
    assert machine.time_call(lambda: time.sleep(0.02), CPU, deadline=time.perf_counter() + 0.03) is None
