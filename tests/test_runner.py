"""How a run executes: fixed defaults, resume reuse, the opt-in autotune (a fake clock, nothing timed), its
cache, the thread rule and the low-precision check (injected CPU flags and speed ratios)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from occbench.errors import UserError
from occbench.runner import (Execution, autotune, cached_autotune, check_precision, decide_precision,
                             default_threads, parse_batch_size, plan_execution)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class CostedRunner:
    """A runner whose call costs ``overhead + per_image * batch`` seconds of a fake clock (no sleeping)."""

    device = torch.device("cpu")

    def __init__(self, clock, overhead=0.004, per_image=0.0005, spike=None):
        self.clock, self.overhead, self.per_image, self.spike = clock, overhead, per_image, spike or {}
        self.calls, self.memory_format, self.precision = [], "contiguous", "fp32"

    def set_memory_format(self, fmt):
        self.memory_format = fmt

    def grad_context(self):
        return torch.no_grad()

    def __call__(self, images):
        self.calls.append(len(images))
        self.clock.now += self.overhead + self.per_image * len(images) + self.spike.get(len(self.calls), 0.0)


def test_autotune_starts_at_batch_8_on_cpu_and_prefers_the_larger_of_near_equal_batches():
    clock = FakeClock()
    runner = CostedRunner(clock)
    tuned = autotune(runner, 8, max_batch=64, clock=clock)
    assert [m["batch"] for m in tuned["measurements"]] == [8, 16, 32, 64]      # never batch 1, 2 or 4 on CPU
    assert tuned["batch_size"] == 64                                           # 64 and 32 within 10%
    assert min(runner.calls) == 8


def test_autotune_times_after_a_warm_up_and_stays_within_its_budget():
    clock = FakeClock()
    runner = CostedRunner(clock, spike={1: 1.0})          # the warm-up call (first allocations) is slow
    tuned = autotune(runner, 8, max_batch=64, clock=clock, budget_s=1.03)
    speeds = {m["batch"]: m["images_per_s"] for m in tuned["measurements"]}
    assert speeds[8] == pytest.approx(8 / (0.004 + 8 * 0.0005), rel=1e-3)     # the warm-up is not counted
    assert runner.calls == [8, 8, 16, 16] and tuned["tuning_s"] >= 1.03       # budget spent after batch 16


def test_autotune_choice_is_cached_per_key(tmp_path, monkeypatch):
    monkeypatch.setenv("OCCBENCH_CACHE_DIR", str(tmp_path))
    clock = FakeClock()
    runner = CostedRunner(clock)
    monkeypatch.setattr("occbench.runner._clock", lambda device: clock)
    first = cached_autotune(runner, 8, "m|96|cpu|fp32|1t", max_batch=64)
    calls = len(runner.calls)
    second = cached_autotune(runner, 8, "m|96|cpu|fp32|1t", max_batch=64)
    assert first["cached"] is False and second["cached"] is True and len(runner.calls) == calls
    assert second["batch_size"] == first["batch_size"]
    other = cached_autotune(runner, 8, "m|96|cpu|fp32|2t", max_batch=64)          # another thread count
    assert other["cached"] is False
    assert set(json.loads((tmp_path / "autotune.json").read_text())) == {"m|96|cpu|fp32|1t", "m|96|cpu|fp32|2t"}


def test_plan_uses_fixed_defaults_and_reuses_a_resumed_runs_choices():
    runner = CostedRunner(FakeClock())
    plan = plan_execution(runner, 8, max_batch=64, threads=1)
    assert (plan.batch_size, plan.memory_format, plan.threads, plan.batch_rule) == (32, "channels_last", 1, "default")
    assert runner.calls == [] and torch.get_num_threads() == 1                   # nothing timed
    assert plan_execution(runner, 8, max_batch=5, threads=1).batch_size == 5
    recorded = {"batch_size": 16, "memory_format": "contiguous", "threads": 1}
    resumed = plan_execution(runner, 8, batch_size="auto", recorded=recorded)
    assert (resumed.batch_size, resumed.memory_format, resumed.batch_rule) == (16, "contiguous", "resumed")
    assert runner.calls == [] and runner.memory_format == "contiguous"
    with pytest.raises(UserError, match="--threads 2: this run directory was made with 1 threads"):
        plan_execution(runner, 8, threads=2, recorded=recorded)
    assert isinstance(plan, Execution) and plan.record()["batch_rule"] == "default"


@pytest.mark.parametrize("value", [0, -3, "abc", "1.5", " 8x"])
def test_batch_size_must_be_positive_or_auto(value):
    with pytest.raises(UserError, match="--batch-size"):
        parse_batch_size(value)
    assert parse_batch_size("16") == 16 and parse_batch_size("auto") == "auto" and parse_batch_size(None) is None


def test_default_threads_rule(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert default_threads() == 8 and default_threads(workers=8) == 1 and default_threads(workers=3) == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(4)), raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    assert default_threads() == 4 and default_threads(workers=4) == 1 and default_threads(workers=9) == 1


def test_precision_decision_follows_the_hardware():
    assert decide_precision("bf16", "cpu", {"avx2", "avx512f"})[0] == "fp32"        # EPYC without AVX-512 bf16
    assert decide_precision("bf16", "cpu", {"avx512f", "avx512_bf16"})[0] == "bf16"
    assert decide_precision("bf16", "cpu", {"amx_bf16"})[0] == "bf16"
    assert decide_precision("fp16", "cpu", {"avx512_bf16"})[0] == "fp32"
    assert decide_precision("fp16", "cpu", {"avx512_fp16"})[0] == "fp16"
    assert decide_precision("bf16", "cuda", set(), cuda_bf16=False)[0] == "fp32"
    assert decide_precision("fp16", "cuda", set())[0] == "fp16"
    assert decide_precision("fp32", "cpu", set())[0] == "fp32"


def test_precision_check_falls_back_with_the_measured_ratio_and_records_it():
    runner = CostedRunner(FakeClock())
    with pytest.warns(UserWarning, match=r"--precision bf16: .*0\.05x the speed of fp32.*uses fp32"):
        used, record = check_precision(runner, 8, "bf16", cpu_flags={"avx2"}, speed_ratio=0.05)
    assert used == "fp32" and record["requested"] == "bf16" and record["used"] == "fp32"
    assert record["speed_vs_fp32"] == 0.05 and "avx512_bf16" in record["reason"]
    with pytest.warns(UserWarning, match=r"0\.80x the speed of fp32 on this model"):
        used, record = check_precision(runner, 8, "bf16", cpu_flags={"amx_bf16"}, speed_ratio=0.8)
    assert used == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        used, _ = check_precision(runner, 8, "bf16", cpu_flags={"amx_bf16"}, speed_ratio=1.7)
    assert used == "bf16"


def test_plan_applies_the_precision_fallback(monkeypatch):
    runner = CostedRunner(FakeClock())
    runner.precision = "fp16"
    monkeypatch.setattr("occbench.runner._measure_speed_ratio", lambda *a, **k: 0.1)
    with pytest.warns(UserWarning, match="uses fp32"):
        plan = plan_execution(runner, 8, threads=1, cpu_flags={"avx2"})
    assert plan.precision == "fp32" == runner.precision and plan.precision_check["requested"] == "fp16"
