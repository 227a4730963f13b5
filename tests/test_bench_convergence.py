"""bench/convergence.py and bench/init_time.py still run end to end on a tiny model (seconds), so
they cannot silently rot; the full runs are documented in their docstrings, not run here."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def convergence():
    yield _load("bench_convergence", "convergence.py")
    sys.modules.pop("bench_convergence", None)


@pytest.fixture(scope="module")
def init_time():
    yield _load("bench_init_time", "init_time.py")
    sys.modules.pop("bench_init_time", None)


@pytest.fixture(scope="module")
def gsm8k_folder(tmp_path_factory) -> Path:
    """A GSM8K-shaped folder: short questions, answers ending in '#### N', one answer too long."""
    folder = tmp_path_factory.mktemp("gsm8k")
    rows = [{"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"}
            for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4)]]
    too_long = {"question": "Count.", "answer": " ".join(["one"] * 300) + "\n#### 1"}
    for split, records in (("train", rows + [too_long]), ("test", [too_long] + rows[:3])):
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_model_folder):
    import lorakit.models

    return lorakit.models.load(str(tiny_model_folder))


def test_every_recipe_that_can_run_trains_and_gets_a_curve_and_scores(convergence, tiny, gsm8k_folder, tmp_path):
    model, tokenizer = tiny
    settings = convergence.Settings(steps=2, warmup_steps=1, batch_size=2, max_length=128, seeds=(0, 1),
                                    eval_every=1, eval_examples=3, max_new_tokens=4, init_batches=1)
    data = convergence.load_data(gsm8k_folder, tokenizer, settings)
    assert data.dropped_test == 1 and len(data.test) == 3 and data.dropped_train <= 1
    wanted = "pissa,loraplus,lisa"  # an SVD init, an optimiser, full-parameter LISA (EVA: the init_time test)
    recipes, missing = convergence.select_recipes(None)
    keys = [r.key for r in recipes if r.key in wanted.split(",") + ["lora"]]
    recipes = [r for r in recipes if r.key in keys]
    runs = convergence.measure(model, tokenizer, data, recipes, settings)
    assert len(runs) == 2 * len(recipes)
    for run in runs:
        assert [step for step, _ in run.curve] == [0, 1, 2]
        assert all(math.isfinite(loss) for _, loss in run.curve), run.recipe
        assert 0.0 <= run.strict <= run.flexible <= 1.0 or 0.0 <= run.flexible <= run.strict <= 1.0
        assert run.trainable_params > 0
    lora = [r for r in runs if r.recipe == "lora"]
    assert lora[0].curve[0][1] == pytest.approx(lora[1].curve[0][1])  # B = 0: both seeds start at the base loss
    assert lora[0].curve[-1][1] != pytest.approx(lora[0].curve[0][1])  # and training moved it
    summaries = convergence.summarise(runs, recipes)
    table = convergence.rows(summaries)
    assert table[0][0] == "LoRA" and table[0][6] in ("1", "2")  # LoRA reaches its own final loss
    assert all("±" in row[3] for row in table)  # two seeds: mean ± std
    base = convergence.base_scores(model, tokenizer, data, settings)
    text = convergence.format_markdown(summaries, base, data, settings, {"device": "cpu"}, "python bench/convergence.py --quick",
                                       missing, "c.png")
    assert "python bench/convergence.py --quick" in text and "| base model (no training) |" in text and "![" in text
    convergence.plot(summaries, tmp_path / "c.png", "test")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads(convergence.to_json(summaries, base, settings, "cmd"))["recipes"][0]["runs"]


def test_steps_to_reach_uses_the_mean_curve_and_reports_not_reached(convergence):
    recipe = convergence.RECIPES[0]
    runs = [convergence.Run("lora", 0, 1, [(0, 3.0), (5, 2.0), (10, 1.0)], 0, 0, 0, 0),
            convergence.Run("lora", 1, 1, [(0, 3.0), (5, 1.0), (10, 1.2)], 0, 0, 0, 0)]
    summary = convergence.Summary(recipe, runs)
    assert summary.mean_curve() == [(0, 3.0), (5, 1.5), (10, 1.1)]
    assert summary.steps_to_reach(1.5) == 5 and summary.steps_to_reach(1.1) == 10
    assert summary.steps_to_reach(1.0) is None
    assert convergence.rows([summary])[0][6] == "10"  # its own final mean, 1.1, first reached at step 10


def test_extend_carries_over_only_new_recipes_from_runs_with_the_same_settings(convergence, tmp_path):
    by_key = {r.key: r for r in convergence.RECIPES}

    def summary(key, final):
        return convergence.Summary(by_key[key], [convergence.Run(key, 0, 1, [(0, 3.0), (10, final)], 0, 0, 0, 0)])

    settings = convergence.Settings(steps=10, warmup_steps=1, seeds=(0,))
    earlier = tmp_path / "earlier.json"
    earlier.write_text(convergence.to_json([summary("lora", 1.5), summary("dora", 1.4), summary("eva", 1.2)],
                                           {"eval_loss": 3.0}, settings, "python bench/convergence.py --only dora,eva"))
    here = [summary("lora", 1.6), summary("dora", 1.3)]
    added, lines = convergence.extend_from([earlier], settings, here)
    assert [s.recipe.key for s in added] == ["eva"]  # LoRA and DoRA were trained here: this run's rows win
    assert added[0].runs[0].curve == [(0, 3.0), (10, 1.2)] and added[0].steps_to_reach(1.6) == 10
    assert "EVA from `python bench/convergence.py --only dora,eva`" in lines[0] and "there 1.500, here 1.600" in lines[0]
    text = convergence.format_markdown(here + added, {"eval_loss": 3.0, "strict": 0.0, "flexible": 0.0},
                                       convergence.Data([], [1], [], 0, 0), settings, {}, "cmd", {}, "x.png", lines)
    assert "`--extend`" in text and "| EVA |" in text

    with pytest.raises(SystemExit, match="other settings.*steps"):
        convergence.extend_from([earlier], convergence.Settings(steps=20, warmup_steps=1, seeds=(0,)), here)
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(SystemExit, match="not a results JSON"):
        convergence.extend_from([tmp_path / "broken.json"], settings, here)


def test_run_describing_init_options_come_from_the_run(convergence):
    from lorakit.core.registry import data_initialiser

    settings = convergence.Settings(steps=40, warmup_steps=4)
    recipe = next(r for r in convergence.RECIPES if r.key == "lora-sb")
    if data_initialiser("lora-sb") is None:
        pytest.skip("LoRA-SB has not landed")
    config = convergence.adapter_config(recipe, settings)
    assert config.init_options == {"lr": recipe.lr, "warmup_ratio": 0.1, "total_steps": 40}


def test_the_pass_cap_reaches_eva_and_only_initialisers_that_cycle(convergence):
    capped = convergence.Settings(steps=40, warmup_steps=4, init_max_passes=7)
    eva = next(r for r in convergence.RECIPES if r.key == "eva")
    assert convergence.adapter_config(eva, capped).init_options["max_batches"] == 7
    assert "max_batches" not in convergence.adapter_config(eva, convergence.Settings()).init_options  # EVA's own cap
    lora_ga = next(r for r in convergence.RECIPES if r.key == "lora-ga")
    assert "max_batches" not in convergence.adapter_config(lora_ga, capped).init_options
    quick = convergence.settings_from_args(convergence.parse_args(["--quick", "--device", "cpu", "--init-max-passes", "3"]))
    assert quick.init_max_passes == 3 and quick.init_batches == convergence.QUICK["init_batches"]
    with pytest.raises(ValueError, match="init_max_passes"):
        convergence.Settings(init_max_passes=0).validate()


def test_unknown_recipe_names_are_rejected_and_lora_always_runs(convergence):
    with pytest.raises(SystemExit, match="unknown recipes"):
        convergence.select_recipes("lora,nonsense")
    recipes, _ = convergence.select_recipes("dora")
    assert [r.key for r in recipes] == ["lora", "dora"]
    quick = convergence.settings_from_args(convergence.parse_args(["--quick", "--device", "cpu", "--steps", "6"]))
    assert quick.steps == 6 and quick.seeds == (0,) and quick.warmup_steps == 1
    full = convergence.settings_from_args(convergence.parse_args(["--device", "cpu"]))
    assert (full.steps, full.seeds, full.batch_size) == (300, (0, 1, 2), 8)


def test_init_time_pissa_times_both_frameworks_and_checks_quality(init_time, tiny):
    import copy

    model, _ = tiny
    settings = init_time.Settings(r=4, alpha=8.0, rounds=1)
    method = next(m for m in init_time.METHODS if m.key == "pissa")
    (result,) = init_time.measure(copy.deepcopy(model), None, [method], settings)
    assert len(result.times["lorakit"]) == len(result.times["peft"]) == 1 and result.ratio > 0
    for framework in ("lorakit", "peft"):
        checks = result.quality[framework]
        assert checks["max |W_res + sBA - W| / max|W|"] < 1e-5
        assert checks["max ||sBA - W_r||_F / ||W_r||_F"] < 1e-4  # exact SVD: the principal part itself
    text = init_time.format_markdown([result], settings, {"device": "cpu"}, "python bench/init_time.py", ["X"], 14)
    assert "| PiSSA (exact SVD) |" in text and "Not measured" in text


def test_init_time_quick_leaves_eva_out_unless_named(init_time):
    quick, _ = init_time.select(None, quick=True)
    assert "eva" not in {m.key for m in quick} and "pissa" in {m.key for m in quick}
    named, _ = init_time.select("eva", quick=True)
    assert [m.key for m in named] == ["eva"]


def test_init_time_data_driven_entries_run_on_real_batches(init_time, tiny, gsm8k_folder):
    import copy

    model, tokenizer = tiny
    settings = init_time.Settings(r=4, alpha=8.0, rounds=1, batches=2, batch_size=2, max_length=128)
    # EVA at tau = 0.5 on both sides: the default 0.99 takes tens of passes to converge on random weights
    methods = [init_time.InitMethod(m.key, m.label, m.init, init_time.lorakit_init("eva", init_options={"tau": 0.5}),
                                    init_time.peft_eva(tau=0.5), m.quality, needs_data=True) if m.key == "eva" else m
               for m in init_time.METHODS if m.needs_data and init_time.available(m)]
    if not methods:
        pytest.skip("no data-driven initialiser has landed")
    batches = init_time.gsm8k_batches(gsm8k_folder, tokenizer, settings, "cpu")
    results = init_time.measure(copy.deepcopy(model), batches, methods, settings)
    for result in results:
        assert result.ratio > 0
        for checks in result.quality.values():
            assert all(not isinstance(v, float) or math.isfinite(v) for v in checks.values()), checks
            if "max |W_res + sBA - W| / max|W|" in checks:
                assert checks["max |W_res + sBA - W| / max|W|"] < 1e-5
            if "max |B|" in checks:  # EVA: B = 0, W untouched, A within the activations' principal subspace
                assert checks["max |B|"] == 0 and checks["max |W - W0|"] == 0
                assert 0.5 < checks["mean explained-variance share of the best"] <= 1 + 1e-9
