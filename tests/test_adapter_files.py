"""Adapter files from anywhere: patterns that cannot hang, config values that fail naming their field,
weights that are refused when non-finite, a CLI that answers in one line, and writes that leave the
permissions the umask gives and no lasting debris."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import stat
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.core.errors import AdapterFileError, ConfigError, DtypeConversionWarning
from lorakit.core.io import (
    CONFIG_NAME,
    STALE_TEMP_AGE_S,
    TEMP_MARK,
    WEIGHTS_NAME,
    adapter_state,
    atomic_write_bytes,
    staged_folder,
)
from lorakit.core.patterns import fullmatch_target, pattern_value

from conftest import tiny_llama

TARGETS = ["q_proj", "v_proj"]
# Patterns Python's backtracking `re` needs exponential (or huge polynomial) time for, each with a
# module name that triggers it; the last ones blow up on ordinary module paths.
CATASTROPHIC = [
    (r"(a+)+$", "model." + "a" * 40 + "!"),
    (r"(a|a)*b", "model." + "a" * 40),
    (r"(x+x+)+y", "model." + "x" * 40),
    (r"(.*a){25}", "model." + "a" * 30),
    (r"(.|.)*Q", "model.layers.0.self_attn.q_proj_and_some_more_text"),
    (r"(\w|[a-z])*\.Q", "model.layers.0.self_attn.q_proj_and_some_more_text"),
]


# --- helpers ---------------------------------------------------------------------------------------
def _saved_adapter(folder: Path, **config) -> Path:
    model = lorakit.inject(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=TARGETS, **config))
    with torch.no_grad():
        for param in lorakit.core.adapter_parameters(model).values():
            param.normal_()
    return lorakit.save_adapter(model, folder)


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory) -> dict[str, bytes]:
    folder = _saved_adapter(tmp_path_factory.mktemp("adapter") / "a")
    return {name: (folder / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}


def _write(folder: Path, files: dict[str, bytes], config: dict | bytes | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / WEIGHTS_NAME).write_bytes(files[WEIGHTS_NAME])
    raw = files[CONFIG_NAME] if config is None else config if isinstance(config, bytes) else json.dumps(config).encode()
    (folder / CONFIG_NAME).write_bytes(raw)
    return folder


def _config(files: dict[str, bytes], **changes) -> dict:
    return {**json.loads(files[CONFIG_NAME]), **changes}


def _state(model) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def _assert_untouched(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], before[key]) for key in before)
    assert lorakit.core.adapter_configs(model) == {} and not list(lorakit.core.adapted_layers(model))


def _refused(model, folder: Path, *expected_in_message: str) -> AdapterFileError:
    before = _state(model)
    with pytest.raises(AdapterFileError) as info:
        lorakit.load_adapter(model, folder)
    _assert_untouched(model, before)
    for text in expected_in_message:
        assert text in str(info.value)
    return info.value


def _in_child(target, *args, deadline_s: float = 60.0) -> None:
    """Run target(*args) in a forked child; fail if it raises or outlives the deadline. A regex that
    backtracks holds the GIL, so only another process can be stopped from outside."""
    child = multiprocessing.get_context("fork").Process(target=target, args=args)
    child.start()
    child.join(deadline_s)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail(f"{target.__name__} was still running after {deadline_s} s (a regex backtracking?)")
    assert child.exitcode == 0, f"{target.__name__} failed in the child (exit code {child.exitcode})"


# --- 1. patterns: PEFT's semantics, linear time ---------------------------------------------------------
MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.10.mlp.up_proj",
           "model.layers.1.self_attn.v_proj", "q_proj", "model.decoder.q_proj_extra", "lm_head", "model.layers.2.mlp.down_proj"]
PATTERN_SETS = [
    {"q_proj": 2},
    {"self_attn.q_proj": 2, "v_proj": 6},
    {r"model\.layers\.1\..*": 3, "q_proj": 5},
    {r".*\.(q|v)_proj": 7},
    {r"layers\.\d+\.mlp\.up_proj": 9, "proj": 1},
    {"layers.1.self_attn.q_proj": 4, r"(?i:Q_PROJ)": 3},
    {"q": 1, "_proj": 2, r"\w+_proj": 3},
    {r"model.layers.1[0-9]?.mlp|lm_head": 5},
]


@pytest.mark.parametrize("patterns", PATTERN_SETS)
def test_pattern_keys_resolve_as_peft_resolves_them(patterns):
    from peft.utils.other import get_pattern_key

    for module in MODULES:
        peft_value = patterns.get(get_pattern_key(list(patterns), module), 8)
        assert pattern_value(patterns, module, 8) == peft_value, module


@pytest.mark.parametrize("target", [r".*\.(q|v)_proj", r"model\.layers\.1\..*", "q_proj", r".*proj", r"lm_head|.*\.1\..*q_proj",
                                    r"model\.layers\.\d+\.mlp\.(up|down)_proj"])
def test_target_regex_selects_what_peft_selects(target):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config = LoraConfig(target_modules=target)
    for module in MODULES:
        assert fullmatch_target(target, module) == bool(check_target_module_exists(config, module)), module


def _match_catastrophic_patterns() -> None:
    for pattern, name in CATASTROPHIC:
        assert pattern_value({pattern: 2}, name, 8) in (2, 8)
        fullmatch_target(pattern, name)


def test_catastrophic_patterns_match_in_linear_time():
    _in_child(_match_catastrophic_patterns, deadline_s=30)


def _load_adapter_with_catastrophic_patterns(folder: str) -> None:
    model = tiny_llama()
    lorakit.load_adapter(model, folder)
    assert lorakit.core.adapter_configs(model)["default"].rank_pattern


def test_adapter_file_with_catastrophic_patterns_loads_without_hanging(tmp_path, adapter_files):
    patterns = {pattern: 4 for pattern, _ in CATASTROPHIC}  # none matches: every module keeps r = 4
    folder = _write(tmp_path / "a", adapter_files, _config(adapter_files, rank_pattern=patterns, alpha_pattern=dict(patterns)))
    _in_child(_load_adapter_with_catastrophic_patterns, str(folder), deadline_s=60)


UNSAFE = [r"(q)\1_proj", r"(?=q)q_proj", r"(?<=self_attn\.)q_proj", r"(?!k)._proj", r"q_proj\Z", r"q{,3}_proj"]


@pytest.mark.parametrize("pattern", UNSAFE)
def test_patterns_re2_cannot_match_are_refused_naming_field_and_key(pattern, tmp_path, adapter_files, capfd):
    for field in ("rank_pattern", "alpha_pattern"):
        with pytest.raises(ConfigError) as info:
            lorakit.LoraConfig(r=4, target_modules=TARGETS, **{field: {pattern: 2}})
        assert field in str(info.value) and repr(pattern) in str(info.value)
        folder = _write(tmp_path / field, adapter_files, _config(adapter_files, **{field: {pattern: 2}}))
        _refused(tiny_llama(), folder, field, repr(pattern))
    with pytest.raises(ConfigError, match="target_modules"):
        lorakit.LoraConfig(r=4, target_modules=".*" + pattern)
    folder = _write(tmp_path / "target", adapter_files, _config(adapter_files, target_modules=".*" + pattern))
    _refused(tiny_llama(), folder, "target_modules")
    assert capfd.readouterr().err == ""  # RE2 must not log its parse errors on stderr


# --- 2. config values: AdapterFileError naming the field, model untouched -------------------------------
BAD_FIELDS = [
    ("r", "4"), ("r", [4]), ("r", None), ("r", 4.5), ("r", 10**12), ("r", -3), ("r", True),
    ("lora_alpha", "x"), ("lora_alpha", -1), ("lora_alpha", [1]), ("lora_dropout", "0.1"), ("lora_dropout", 2.0),
    ("target_modules", 3), ("target_modules", None), ("target_modules", [1]), ("target_modules", []),
    ("target_modules", {"q_proj": 1}), ("target_modules", ["nothing_like_this"]),
    ("rank_pattern", [1]), ("rank_pattern", {"q_proj": "x"}), ("rank_pattern", {"q_proj": {"a": 1}}),
    ("rank_pattern", {"q_proj": 0}), ("rank_pattern", {"q_proj": 10**9}), ("alpha_pattern", {"q_proj": -2}),
    ("alpha_pattern", "q_proj"), ("alpha_pattern", {"q_proj": None}),
    ("init_lora_weights", 3), ("init_lora_weights", "pissa_niter_x"), ("init_lora_weights", "unknown"),
    ("use_dora", "false"), ("use_rslora", 1), ("use_dora", {"nested": [1, {"deeper": None}]}),
    ("peft_type", ["LORA"]), ("peft_type", 7),
    ("bias", "all"), ("bias", []), ("modules_to_save", ["lm_head"]),
    ("lorakit", [1]), ("lorakit", "lora"), ("lorakit", {"method": {}}), ("lorakit", {"method": "no-such-method"}),
    ("lorakit", {"method": "lora", "freeze_a": "yes"}),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS, ids=[f"{f}={str(v)[:24]}" for f, v in BAD_FIELDS])
def test_bad_config_value_is_an_adapter_file_error_naming_the_field(field, value, tmp_path, adapter_files):
    folder = _write(tmp_path / "a", adapter_files, _config(adapter_files, **{field: value}))
    error = _refused(tiny_llama(), folder, str(folder / CONFIG_NAME))
    named = {"peft_type": ("peft_type",), "lorakit": ("lorakit", "method")}.get(field, (field, field.removeprefix("lora_")))
    assert any(name in str(error) for name in named), str(error)


def test_unknown_peft_type_is_refused(tmp_path, adapter_files):
    config = _config(adapter_files, peft_type="NOT_A_METHOD", lorakit={})  # no lorakit method to go by
    _refused(tiny_llama(), _write(tmp_path / "a", adapter_files, config), "'NOT_A_METHOD'", "cannot load")


def test_missing_required_field_is_named(tmp_path, adapter_files):
    config = _config(adapter_files)
    del config["r"]
    _refused(tiny_llama(), _write(tmp_path / "a", adapter_files, config), "'r'")


@pytest.mark.parametrize("raw,expected", [
    (b"[1, 2]", "array, not an object"), (b"null", "null, not an object"), (b'"LORA"', "string, not an object"),
    (b'{"r": "\xff"}', "not valid JSON"), (b'{"r": 4, "r": 8}', "appears twice"), (b'{"r": NaN}', "NaN"),
    (b'{"lora_alpha": Infinity}', "Infinity"), (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b"", "not valid JSON"), (b"\x00\x01garbage", "not valid JSON"),
], ids=["array", "null", "string", "utf8", "duplicate", "nan", "infinity", "deep", "empty", "binary"])
def test_config_bytes_that_are_not_a_json_object_are_refused(raw, expected, tmp_path, adapter_files):
    _refused(tiny_llama(), _write(tmp_path / "a", adapter_files, raw), expected)


def test_oversized_config_is_refused_before_parsing(tmp_path, adapter_files):
    from lorakit.core.io import MAX_CONFIG_BYTES

    huge = b'{"pad": "' + b"x" * (MAX_CONFIG_BYTES + 1) + b'"}'
    _refused(tiny_llama(), _write(tmp_path / "a", adapter_files, huge), "larger than")


FIELDS = ["r", "lora_alpha", "lora_dropout", "target_modules", "rank_pattern", "alpha_pattern", "init_lora_weights",
          "use_dora", "use_rslora", "peft_type", "bias", "lorakit", "task_type", "base_model_name_or_path", "inference_mode"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12) | st.sampled_from(["q_proj", "all-linear", ".*", "(a+)+$", "(?=x)", "LORA", "pissa_niter_2", "gaussian"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8) | st.sampled_from(TARGETS), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, min_size=1, max_size=3))
def test_fuzzed_config_loads_or_fails_cleanly(changes, tmp_path, adapter_files):
    """Whatever a file's fields hold, load_adapter loads it or raises AdapterFileError, and a refused
    file leaves the model exactly as it was."""
    folder = _write(tmp_path / "fuzz", adapter_files, _config(adapter_files, **changes))
    model = tiny_llama()
    before = _state(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lorakit.load_adapter(model, folder)
    except AdapterFileError:
        _assert_untouched(model, before)
    else:
        assert "default" in lorakit.core.adapter_configs(model)


WRONG_KIND = {
    "r": st.text(max_size=4) | st.floats(allow_nan=False, allow_infinity=False).filter(lambda v: not float(v).is_integer())
    | st.lists(st.integers(), max_size=2) | st.none() | st.booleans(),
    "lora_alpha": st.text(max_size=4) | st.lists(st.integers(), max_size=2) | st.booleans() | st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    "use_dora": st.text(max_size=4) | st.integers() | st.lists(st.booleans(), max_size=2),
    "target_modules": st.integers() | st.none() | st.booleans() | st.lists(st.integers(), min_size=1, max_size=2) | st.just([]),
    "rank_pattern": st.lists(st.integers(), max_size=2) | st.text(max_size=4)
    | st.dictionaries(st.text(min_size=1, max_size=4), st.text(max_size=3) | st.floats(allow_nan=False, allow_infinity=False) | st.none(), min_size=1, max_size=2),
    "alpha_pattern": st.lists(st.integers(), max_size=2)
    | st.dictionaries(st.text(min_size=1, max_size=4), st.text(max_size=3) | st.none() | st.booleans(), min_size=1, max_size=2),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_value_of_the_wrong_kind_is_refused_naming_its_field(data, tmp_path, adapter_files):
    field = data.draw(st.sampled_from(sorted(WRONG_KIND)))
    value = data.draw(WRONG_KIND[field])
    folder = _write(tmp_path / "wrong", adapter_files, _config(adapter_files, **{field: value}))
    error = _refused(tiny_llama(), folder)
    assert field in str(error), str(error)


# --- 2b. weights: corrupt, non-finite, other dtypes ---------------------------------------------------
def _header_only(header: dict, body: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.mark.parametrize("weights", [
    struct.pack("<Q", 2**62) + b"{}",  # a header claiming to be huge
    struct.pack("<Q", 10_000) + b"{}",  # longer than the file
    _header_only({"x": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}}),  # a tensor the file lacks
    _header_only({"x": {"dtype": "F32", "shape": [2**40, 2**40, 2**40], "data_offsets": [0, 4]}}, b"\0" * 4),  # overflow
    _header_only({"x": {"dtype": "Q99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
    b"PK\x03\x04 this is a zip, not safetensors", b"", os.urandom(64),
], ids=["huge-header", "header-past-end", "tensor-past-end", "shape-overflow", "bad-dtype", "zip", "empty", "random"])
def test_weights_that_are_not_safetensors_are_refused(weights, tmp_path, adapter_files):
    folder = _write(tmp_path / "a", adapter_files)
    (folder / WEIGHTS_NAME).write_bytes(weights)
    _refused(tiny_llama(), folder, WEIGHTS_NAME)


def test_truncated_weights_are_refused(tmp_path, adapter_files):
    folder = _write(tmp_path / "a", adapter_files)
    (folder / WEIGHTS_NAME).write_bytes(adapter_files[WEIGHTS_NAME][:-100])
    _refused(tiny_llama(), folder, "corrupt or truncated")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_are_refused_unless_allowed(bad, tmp_path, adapter_files):
    folder = _write(tmp_path / "a", adapter_files)
    tensors = load_file(str(folder / WEIGHTS_NAME))
    key = sorted(tensors)[1]
    tensors[key][0, 0] = bad
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    _refused(tiny_llama(), folder, repr(key), "allow_non_finite=True")
    model = lorakit.load_adapter(tiny_llama(), folder, allow_non_finite=True)
    loaded = adapter_state(model, "default")[key]
    assert torch.equal(loaded.isnan(), tensors[key].isnan()) and torch.equal(loaded.isinf(), tensors[key].isinf())


def test_half_precision_file_is_converted_with_one_warning_naming_the_dtypes(tmp_path, adapter_files):
    folder = _write(tmp_path / "a", adapter_files)
    tensors = {key: value.to(torch.bfloat16) for key, value in load_file(str(folder / WEIGHTS_NAME)).items()}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    with pytest.warns(DtypeConversionWarning) as caught:
        model = lorakit.load_adapter(tiny_llama(), folder)
    assert len(caught) == 1
    assert f"bfloat16 -> float32 ({len(tensors)} tensors)" in str(caught[0].message)
    loaded = adapter_state(model, "default")
    assert all(torch.equal(loaded[key], tensors[key].float()) for key in tensors)


def test_same_dtype_file_loads_without_warnings(tmp_path, adapter_files):
    folder = _write(tmp_path / "a", adapter_files)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DtypeConversionWarning)
        lorakit.load_adapter(tiny_llama(), folder)


def test_integer_tensor_where_weights_belong_is_refused(tmp_path, adapter_files):
    folder = _write(tmp_path / "a", adapter_files)
    tensors = load_file(str(folder / WEIGHTS_NAME))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    _refused(tiny_llama(), folder, repr(key), "int32")


def _load_expecting_refusal(folder: str) -> None:
    try:
        lorakit.load_adapter(tiny_llama(), folder)
    except AdapterFileError as err:
        assert "not a regular file" in str(err)
    else:
        raise AssertionError("a FIFO was read as an adapter file")


@pytest.mark.parametrize("name", [CONFIG_NAME, WEIGHTS_NAME])
def test_fifo_in_place_of_an_adapter_file_is_refused_without_blocking(name, tmp_path, adapter_files):
    folder = _write(tmp_path / "a", adapter_files)
    (folder / name).unlink()
    os.mkfifo(folder / name)
    _in_child(_load_expecting_refusal, str(folder), deadline_s=60)


# --- 3. the CLI: one line, no traceback ---------------------------------------------------------------
def _corrupt_folders(root: Path, files: dict[str, bytes]) -> dict[str, Path]:
    nan_folder = _write(root / "nan", files)
    tensors = load_file(str(nan_folder / WEIGHTS_NAME))
    tensors[sorted(tensors)[0]][0, 0] = math.nan
    save_file(tensors, str(nan_folder / WEIGHTS_NAME), metadata={"format": "pt"})
    truncated = _write(root / "truncated", files)
    (truncated / WEIGHTS_NAME).write_bytes(files[WEIGHTS_NAME][: len(files[WEIGHTS_NAME]) // 2])
    return {
        "array": _write(root / "array", files, b"[1, 2, 3]"),
        "backreference": _write(root / "backreference", files, _config(files, rank_pattern={r"(q)\1": 2})),
        "rank_pattern_list": _write(root / "rank_pattern_list", files, _config(files, rank_pattern=[4])),
        "nan": nan_folder,
        "truncated": truncated,
    }


def _error_lines(stderr: str) -> list[str]:
    """stderr without transformers' weight-loading progress bar (not lorakit's output)."""
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.strip() and not line.startswith("Loading weights")]


def test_cli_reports_corrupt_adapters_in_one_line(tmp_path, adapter_files, tiny_model_folder, capsys):
    from lorakit.cli.main import main

    bad = _corrupt_folders(tmp_path, adapter_files)
    model = str(tiny_model_folder)
    commands = {
        "eval": ["eval", "--adapter", str(bad["array"]), "--model", model, "--examples", "1"],
        "generate": ["generate", "--adapter", str(bad["nan"]), "--model", model, "--prompt", "hi"],
        "export": ["export", str(bad["backreference"]), "--to", "lora", "--rank", "2", "--model", model,
                   "--out", str(tmp_path / "exported"), "--quiet"],
        "merge": ["merge", str(bad["rank_pattern_list"]), str(bad["truncated"]), "--out", str(tmp_path / "merged"), "--quiet"],
        "analyze": ["analyze", str(bad["truncated"]), "--base", model, "--out", str(tmp_path / "analysis"), "--quiet"],
    }
    for verb, argv in commands.items():
        capsys.readouterr()
        assert main(argv) == 2, verb
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(_error_lines(err)) == 1, err
        assert _error_lines(err)[0].startswith(f"lorakit {verb}: error: "), err


def test_cli_process_prints_one_line_and_no_traceback(tmp_path, adapter_files, tiny_model_folder):
    bad = _corrupt_folders(tmp_path, adapter_files)
    result = subprocess.run(
        [sys.executable, "-m", "lorakit", "generate", "--adapter", str(bad["backreference"]), "--model", str(tiny_model_folder),
         "--prompt", "hi"], capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = _error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("lorakit generate: error: ") and "rank_pattern" in lines[0], result.stderr


def test_cli_allow_non_finite_flag_loads_the_adapter(tmp_path, adapter_files, tiny_model_folder, capsys):
    from lorakit.cli.main import main

    nan = str(_corrupt_folders(tmp_path, adapter_files)["nan"])
    argv = ["generate", "--adapter", nan, "--model", str(tiny_model_folder), "--prompt", "hi", "--max-new-tokens", "2"]
    assert main(argv) == 2 and "--allow-non-finite" in capsys.readouterr().err
    assert main(argv + ["--allow-non-finite"]) == 0


# --- 4. writes: umask permissions, stale temporaries --------------------------------------------------
@pytest.fixture
def umask():
    previous = os.umask(0o022)

    def set_umask(value: int) -> None:
        os.umask(value)

    yield set_umask
    os.umask(previous)


@pytest.mark.parametrize("mask,file_mode,folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)])
def test_written_files_get_the_permissions_the_umask_gives(mask, file_mode, folder_mode, tmp_path, umask):
    umask(mask)
    folder = _saved_adapter(tmp_path / "adapter")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert stat.S_IMODE((folder / name).stat().st_mode) == file_mode, name
    atomic_write_bytes(tmp_path / "plain.txt", b"x")
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == file_mode
    with staged_folder(tmp_path / "staged", "test", ["f"]) as stage:
        atomic_write_bytes(stage / "f", b"y")
    assert stat.S_IMODE((tmp_path / "staged").stat().st_mode) == folder_mode
    assert stat.S_IMODE((tmp_path / "staged" / "f").stat().st_mode) == file_mode


def test_pruned_model_folder_gets_the_permissions_the_umask_gives(tmp_path, umask):
    from lorakit.prune.loraprune import save_pruned

    umask(0o022)
    out = save_pruned(tiny_llama(), tmp_path / "pruned")
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _age(path: Path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_stale_temporaries_are_ignored_by_readers_and_removed_by_the_next_write(tmp_path, adapter_files):
    folder = _write(tmp_path / "a", adapter_files)
    stale_file = folder / f".{WEIGHTS_NAME}{TEMP_MARK}0123456789ab"
    stale_file.write_bytes(adapter_files[WEIGHTS_NAME][:50])  # what a killed save leaves
    stale_stage = tmp_path / f".a{TEMP_MARK}export-deadbeef"
    stale_stage.mkdir()
    (stale_stage / CONFIG_NAME).write_bytes(b"{")
    _age(stale_stage / CONFIG_NAME, STALE_TEMP_AGE_S + 60)
    fresh_file = folder / f".{CONFIG_NAME}{TEMP_MARK}fedcba987654"  # a write still in progress elsewhere
    fresh_file.write_bytes(b"{")
    users_file = folder / f".{CONFIG_NAME}.orig"  # not ours, however old
    users_file.write_bytes(b"{}")
    for path in (stale_file, stale_stage, users_file):
        _age(path, STALE_TEMP_AGE_S + 60)

    model = lorakit.load_adapter(tiny_llama(), folder)
    lorakit.save_adapter(model, folder)
    with staged_folder(tmp_path / "b", "test", [CONFIG_NAME]) as stage:
        atomic_write_bytes(stage / CONFIG_NAME, b"{}")

    assert not stale_file.exists() and not stale_stage.exists()
    assert fresh_file.exists() and users_file.exists()
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [CONFIG_NAME, WEIGHTS_NAME]
    lorakit.load_adapter(tiny_llama(), folder)
