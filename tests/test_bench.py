"""The training-step benchmark still runs end to end, so it cannot silently rot."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from conftest import tiny_llama

BENCH_FILE = Path(__file__).resolve().parents[1] / "bench" / "train_step.py"


@pytest.fixture(scope="module")
def train_step_bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", BENCH_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def tiny_result(train_step_bench):
    settings = train_step_bench.Settings(device="cpu", steps=1, rounds=1, warmup=1, batch_size=2, seq_len=16,
                                         rank=4, alpha=8.0)
    return train_step_bench.measure(tiny_llama, settings)


def test_measure_on_tiny_llama_gives_positive_medians_and_finite_ratios(tiny_result):
    for name in ("lorakit", "peft"):
        result = tiny_result.results[name]
        assert len(result.step_times_s) == 1
        assert result.median_time_s > 0
        assert result.saved_bytes > 0 and result.state_bytes > 0 and result.memory_bytes > 0
        assert math.isfinite(result.loss)
        assert len(result.cpu_share) == 1 and result.cpu_share[0] > 0  # contention check ran
    assert math.isfinite(tiny_result.time_ratio()) and tiny_result.time_ratio() > 0
    assert math.isfinite(tiny_result.paired_time_ratio()) and tiny_result.paired_time_ratio() > 0
    assert math.isfinite(tiny_result.memory_ratio()) and tiny_result.memory_ratio() > 0


def test_both_frameworks_train_the_same_parameters_and_state(tiny_result):
    lorakit_result, peft_result = tiny_result.results["lorakit"], tiny_result.results["peft"]
    assert lorakit_result.trainable_params == peft_result.trainable_params > 0
    # params + grads + AdamW's two moments (+ its step counters) of identical shapes
    assert lorakit_result.state_bytes == peft_result.state_bytes


def test_markdown_report_names_the_command_and_the_memory_measure(train_step_bench, tiny_result):
    env = {"device": "cpu (test)"}
    text = train_step_bench.format_markdown(tiny_result, env, "python bench/train_step.py --quick")
    assert "python bench/train_step.py --quick" in text
    assert "saved_tensors_hooks" in text
    assert f"{tiny_result.time_ratio():.3f}" in text
    assert "lorakit / peft" in text


def test_quick_flag_shrinks_the_run_and_explicit_options_win(train_step_bench):
    settings = train_step_bench.settings_from_args(train_step_bench.parse_args(["--quick", "--device", "cpu", "--seq-len", "32"]))
    assert (settings.steps, settings.rounds, settings.batch_size, settings.seq_len) == (1, 1, 1, 32)
    defaults = train_step_bench.settings_from_args(train_step_bench.parse_args(["--device", "cpu"]))
    assert (defaults.batch_size, defaults.seq_len, defaults.rank, defaults.alpha) == (8, 128, 16, 32.0)
    assert defaults.steps * defaults.rounds >= 9  # enough timed steps for a median


def test_contention_note_flags_contended_steps_and_gives_uncontended_medians(train_step_bench):
    bench = train_step_bench
    fake = dict(trainable_params=10, saved_bytes=1, state_bytes=1)
    results = {  # one contended step each (CPU share 0.5), the others free
        "lorakit": bench.FrameworkResult("lorakit", step_times_s=[50.0, 3.0, 3.2], cpu_share=[0.5, 0.98, 0.97], **fake),
        "peft": bench.FrameworkResult("peft", step_times_s=[3.3, 49.0, 3.3], cpu_share=[0.99, 0.5, 0.99], **fake),
    }
    result = bench.BenchResult(bench.Settings(steps=1, rounds=3), "m", 1, results)
    note = bench.contention_note(result)
    assert "lorakit 1/3, peft 1/3" in note
    assert "ratio 0.939" in note  # median(3.0, 3.2) / median(3.3, 3.3)
    assert "not judged" in bench.format_text(result, {})
    results["lorakit"].cpu_share = results["peft"].cpu_share = [0.99, 0.99, 0.99]
    assert bench.contention_note(result) is None


FAMILIES_FILE = BENCH_FILE.parent / "families.py"


@pytest.fixture(scope="module")
def families_bench():
    spec = importlib.util.spec_from_file_location("bench_families", FAMILIES_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_families_bench_trains_each_family_on_the_default_task_and_reports_ratios(families_bench, tiny_model_folder):
    import lorakit

    model, tokenizer = lorakit.models.load(str(tiny_model_folder))
    settings = families_bench.Settings(steps=3, warmup_steps=1, batch_size=2, eval_examples=3)
    families = families_bench.select_families("vera")
    base_loss, results = families_bench.measure(model, tokenizer, families, settings)
    assert [r.family.method for r in results] == ["lora", "vera"]
    lora, vera = results
    assert lora.trainable_params == sum(16 * (i + o) for i, o in [(32, 32), (32, 16), (32, 16), (32, 32),
                                                                  (32, 64), (32, 64), (64, 32)]) * 2
    assert vera.lr == pytest.approx(settings.lr * families_bench.LR_MULTIPLIER["vera"])
    for result in results:
        assert len(result.step_times_s) == 1 and result.median_time_s > 0 and result.memory_bytes > 0
        assert math.isfinite(result.eval_loss) and result.eval_loss != pytest.approx(base_loss)
    table = families_bench.rows(results)
    assert table[0][2] == "1.000" and table[0][4] == "1.00" and table[0][6] == "1.00"
    text = families_bench.format_markdown(base_loss, results, settings, {"device": "cpu"}, "python bench/families.py --quick")
    assert "python bench/families.py --quick" in text and "| VeRA" not in text and "| vera |" in text


def test_families_bench_rejects_unknown_method_names(families_bench):
    with pytest.raises(SystemExit, match="unknown methods"):
        families_bench.select_families("lora,nonsense")
