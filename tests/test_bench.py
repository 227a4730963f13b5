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


def test_bf16_run_on_cpu_stores_the_base_in_bf16_and_trains_float32_master_weights(train_step_bench):
    settings = train_step_bench.Settings(device="cpu", dtype="bfloat16", steps=1, rounds=1, warmup=1, batch_size=2,
                                         seq_len=16, rank=4, alpha=8.0)
    result = train_step_bench.measure(tiny_llama, settings)
    for name in ("lorakit", "peft"):
        assert result.results[name].dtypes == ("frozen weights bfloat16, trainable float32, AdamW state float32, "
                                               "logits never materialised (fused head + loss), loss float32")
        assert math.isfinite(result.results[name].loss)
    text = train_step_bench.format_markdown(result, {"device": "cpu (test)"}, "python bench/train_step.py --dtype bfloat16")
    assert "frozen weights bfloat16, trainable float32" in text


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


SERVE_FILE = BENCH_FILE.parent / "serve.py"


@pytest.fixture(scope="module")
def serve_bench():
    spec = importlib.util.spec_from_file_location("bench_serve", SERVE_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_serve_workload_is_s_loras_generator_with_real_prompts(serve_bench):
    import numpy as np

    settings = serve_bench.Settings(requests=4000, rate=20.0, cv=2.0, alpha=0.5, prompt_range=(5, 12),
                                    output_range=(3, 7))
    questions = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    requests = serve_bench.make_workload(10, settings, questions)
    arrivals = np.array([r.arrival_s for r in requests])
    assert np.all(np.diff(arrivals) >= 0)
    gaps = np.diff(np.concatenate([[0.0], arrivals]))
    assert gaps.mean() == pytest.approx(1 / 20.0, rel=0.1)  # Gamma(1/cv^2, cv^2/rate): mean 1/rate, cv 2
    assert gaps.std() / gaps.mean() == pytest.approx(2.0, rel=0.15)
    adapters = np.array([r.adapter for r in requests])
    assert adapters.min() == 0 and adapters.max() == 9
    # power(0.5): P(u < x) = sqrt(x), so adapters 0..2 (u < 0.3) take ~55% of the traffic, not 30%
    assert np.mean(adapters < 3) == pytest.approx(np.sqrt(0.3), abs=0.03)
    assert all(5 <= len(r.prompt) < 12 and 3 <= r.max_tokens < 7 for r in requests)
    stream = [t for i in range(6) for t in questions[(1 + i) % 3]]
    assert requests[1].prompt == tuple(stream[:len(requests[1].prompt)])  # question 1 onwards, truncated
    other = serve_bench.make_workload(64, settings, questions)  # only the adapter indices depend on n
    assert [(r.arrival_s, r.prompt, r.max_tokens) for r in other] == [(r.arrival_s, r.prompt, r.max_tokens)
                                                                       for r in requests]
    assert [r.adapter for r in other] != [r.adapter for r in requests]


def test_serve_bench_runs_every_system_on_tiny_model_and_outputs_agree(serve_bench, tiny_model_folder, tmp_path):
    import lorakit

    model, tokenizer = lorakit.models.load(str(tiny_model_folder))
    settings = serve_bench.Settings(adapter_counts=(2,), requests=4, rate=1000.0, prompt_range=(4, 9),
                                    output_range=(2, 5), max_batch_size=4, registered=3, check_requests=6, warmup=1,
                                    delta_scale=4.0)
    specs = serve_bench.adapter_specs(3, settings)
    linears = serve_bench.target_linears(model)
    sizes = [sum(4 * s.rank * sum(m.weight.shape) for path, m in linears.items()
                 if path.rsplit(".", 1)[-1] in serve_bench.TARGET_SETS[s.targets]) for s in specs]
    settings.check_budget_mib = max(sizes) / serve_bench.MIB  # room for the largest adapter, never for two
    questions = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("Natalia sold clips.\n", "Add 2 and 3.\n")]
    result = serve_bench.measure(model, tokenizer, settings, tmp_path / "adapters", questions)

    assert sorted((tmp_path / "adapters").iterdir())[0].joinpath("adapter_config.json").is_file()
    requests = serve_bench.make_workload(2, settings, questions)
    for system in serve_bench.SYSTEMS:
        run = result.run(system, 2)
        assert [len(o) for o in run.outputs] == [r.max_tokens for r in requests]  # EOS never stops anyone
        assert run.tokens_per_s > 0 and run.p90_latency_s >= 0
    for system in ("lorakit", "peft-mixed", "merge-swap"):
        assert result.run(system, 2).matches == (4, 4), system  # token for token = PEFT single requests
    assert result.run("lorakit", 2).outputs != result.run("base-engine", 2).outputs  # the adapters act
    assert result.run("base-hf", 2).outputs == result.run("base-engine", 2).outputs
    check = result.memory_check
    assert check["registered"] == 3 and check["passed"] and check["max_host_bytes"] <= check["budget_bytes"]
    assert check["evictions"] > 0  # the budget really bounded the cache

    text = serve_bench.format_markdown(result, {"device": "cpu"}, "python bench/serve.py --quick", "serve.png")
    assert "python bench/serve.py --quick" in text and "| lorakit engine | 2 |" in text and "serve.png" in text
    serve_bench.plot(result, tmp_path / "serve.png")
    assert (tmp_path / "serve.png").stat().st_size > 0


def test_serve_quick_flag_and_explicit_options(serve_bench):
    quick = serve_bench.settings_from_args(serve_bench.parse_args(["--quick", "--device", "cpu", "--requests", "8"]))
    assert quick.adapter_counts == (1, 8, 64) and quick.requests == 8
    full = serve_bench.settings_from_args(serve_bench.parse_args(["--device", "cpu", "--systems", "lorakit,peft-mixed"]))
    assert full.adapter_counts == (1, 8, 64, 512) and full.registered == 1000 and full.systems == ("lorakit", "peft-mixed")
    with pytest.raises(ValueError, match="unknown"):
        serve_bench.Settings(systems=("nonsense",)).validate()


RANK_FILE = BENCH_FILE.parent / "rank.py"


@pytest.fixture(scope="module")
def rank_bench():
    spec = importlib.util.spec_from_file_location("bench_rank", RANK_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.mark.parametrize("steps", [40, 300])
def test_rank_bench_gives_every_policy_the_same_total_rank(rank_bench, steps):
    from lorakit.train import TrainConfig

    settings = rank_bench.Settings(steps=steps, rank=4)
    modules = 210
    for policy in rank_bench.POLICIES:
        recipe = rank_bench.policy_recipe(policy, settings, modules)
        config = TrainConfig(max_steps=steps, **recipe)
        config.validate()
        adapter = config.adapter_config()
        if policy == "diffora":
            kept = math.ceil(recipe["rank_policy_options"]["ratio"] * modules)
            assert kept * adapter.r == settings.rank * modules
        elif policy in ("adalora", "increlora"):
            assert adapter.target_r == settings.rank
        else:
            assert adapter.r == settings.rank
        if policy == "increlora":  # the last round the budget needs runs inside the run
            from lorakit.rank.increlora import first_round_step

            rounds = math.ceil((settings.rank - adapter.init_r) * modules / (adapter.top_h * adapter.incre_rank_num))
            last = first_round_step(adapter.init_warmup, adapter.incre_interval) + (rounds - 1) * adapter.incre_interval
            assert last < steps


def test_rank_bench_reads_per_module_ranks_from_saved_adapters(rank_bench, tmp_path):
    import lorakit

    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                             rank_pattern={"model.layers.1.self_attn.q_proj": 5}))
    lorakit.save_adapter(model, tmp_path / "lora")
    ranks = rank_bench.ranks_in_file(tmp_path / "lora")
    assert ranks["model.layers.1.self_attn.q_proj"] == 5
    assert ranks["model.layers.0.self_attn.v_proj"] == 2 and len(ranks) == 4
    grid = rank_bench.heat_grid(ranks, 3)
    assert len(grid) == 3 and grid[2] == [0.0] * len(rank_bench.MODULE_TYPES)  # a layer without adapters stays
    assert grid[1][rank_bench.MODULE_TYPES.index("q_proj")] == 5 and grid[0][rank_bench.MODULE_TYPES.index("k_proj")] == 0
