"""Crash-safe checkpoints: which checkpoint a resume takes, and SIGKILL at random points of a
run's checkpoint saves, resumed each time, reaching the adapter an uninterrupted run reaches.

In the kill test, Python and torch start once in a driver process (run as `python this_file.py PLAN`); every run
is a child forked from it that loads the model, builds its Trainer and resumes from disk like
`lorakit train --resume` does, and is then killed with a real SIGKILL: by the child itself at
the k-th Python or file-system call inside a save (profiled), or by the driver after a random
delay once the child says a save began (which can land inside a single write).
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli.main import main as cli_main
from lorakit.core.errors import ConfigError
from lorakit.train import TrainConfig, train
from lorakit.core.io import temp_path_for
from lorakit.train.checkpoints import (MANIFEST_NAME, RunLock, newest_complete_checkpoint, remove_leftovers,
                                       rotate_checkpoints, staging_folder)
from lorakit.train.runner import resume_checkpoint

SRC = Path(__file__).resolve().parents[1] / "src"
# Calls that change or make durable what is on disk: where a kill leaves half-done work.
FILE_SYSTEM_CALLS = {"open", "close", "write", "replace", "rename", "unlink", "rmdir", "mkdir", "fsync",
                     "truncate", "scandir", "file_digest"}


def run_config(model: Path, data: Path, output_dir: Path, max_steps: int) -> dict:
    return dict(model=str(model), data=str(data), output_dir=str(output_dir), max_steps=max_steps, batch_size=4,
                save_steps=1, logging_steps=1, eval_examples=4, max_new_tokens=2, eval_fraction=0.2,
                learning_rate=1e-2, adapter={"r": 4, "alpha": 8, "dropout": 0.1})


@pytest.fixture(scope="module")
def repeat_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Repeat the word: w{i}", "response": f"w{i}"}) for i in range(60)) + "\n")
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_folder, repeat_data) -> Path:
    """A real 3-step run saving every step; rotation leaves checkpoint-2 and checkpoint-3."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train(TrainConfig.from_dict(run_config(tiny_model_folder, repeat_data, run, max_steps=3)), progress=False)
    return run


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    shutil.copytree(finished_run, tmp_path / "run")
    return tmp_path / "run"


def _truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


BREAKAGES = {
    "missing optimizer": (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    "missing manifest": (lambda c: (c / MANIFEST_NAME).unlink(), f"has no {MANIFEST_NAME}"),
    "truncated safetensors": (lambda c: _truncate(c / "adapter_model.safetensors"),
                              "adapter_model.safetensors has"),
    "changed byte": (lambda c: _flip_a_byte(c / "adapter_model.safetensors"), "does not match the sha256"),
    "garbled manifest": (lambda c: (c / MANIFEST_NAME).write_text("{not json"), f"{MANIFEST_NAME} is unreadable"),
    "copied from another step": (lambda c: shutil.copy(c.parent / "checkpoint-2" / MANIFEST_NAME, c / MANIFEST_NAME),
                                 "is for step 2"),
}


def test_a_finished_run_keeps_two_published_checkpoints_with_manifests(finished_run):
    checkpoints = finished_run / "checkpoints"
    assert {p.name for p in checkpoints.iterdir()} == {"checkpoint-2", "checkpoint-3"}
    for folder in checkpoints.iterdir():
        listed = json.loads((folder / MANIFEST_NAME).read_text())["files"]
        assert set(listed) == {p.name for p in folder.iterdir()} - {MANIFEST_NAME}
    choice = newest_complete_checkpoint(checkpoints)
    assert choice.chosen == checkpoints / "checkpoint-3" and choice.skipped == []


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_resume_skips_a_broken_newest_checkpoint_and_names_it(run_copy, breakage, capsys):
    checkpoints = run_copy / "checkpoints"
    damage, reason = BREAKAGES[breakage]
    damage(checkpoints / "checkpoint-3")
    assert resume_checkpoint(checkpoints, progress=True) == str(checkpoints / "checkpoint-2")
    printed = capsys.readouterr()
    assert "skipping checkpoint-3: " in printed.err and reason in printed.err, printed.err
    assert "resuming from" in printed.out and printed.out.strip().endswith("checkpoint-2")


def test_staging_and_trash_folders_are_never_taken_for_checkpoints_and_are_removed(run_copy):
    checkpoints = run_copy / "checkpoints"
    # Complete copies under a staging or trash name: never published (or already unpublished).
    staged = staging_folder(checkpoints / "checkpoint-4")
    shutil.copytree(checkpoints / "checkpoint-3", staged / "checkpoint-4")
    trash = temp_path_for(checkpoints / "checkpoint-9", "trash")
    shutil.copytree(checkpoints / "checkpoint-3", trash)
    assert newest_complete_checkpoint(checkpoints).chosen == checkpoints / "checkpoint-3"
    assert set(remove_leftovers(checkpoints)) == {staged, trash}  # at once: the run's lock says no writer uses them
    assert {p.name for p in checkpoints.iterdir()} == {"checkpoint-2", "checkpoint-3"}


@pytest.mark.parametrize("broken_file", ["optimizer.pt", "adapter_model.safetensors", "trainer_state.json"])
def test_a_run_from_before_manifests_is_judged_by_reading_its_files(run_copy, broken_file):
    checkpoints = run_copy / "checkpoints"
    for folder in checkpoints.iterdir():
        (folder / MANIFEST_NAME).unlink()
    assert newest_complete_checkpoint(checkpoints).chosen == checkpoints / "checkpoint-3"
    _truncate(checkpoints / "checkpoint-3" / broken_file)
    choice = newest_complete_checkpoint(checkpoints)
    assert choice.chosen == checkpoints / "checkpoint-2"
    assert [(p.name, broken_file in why) for p, why in choice.skipped] == [("checkpoint-3", True)], choice.skipped


def test_rotation_never_deletes_the_last_complete_checkpoint_for_a_broken_newer_one(run_copy):
    checkpoints = run_copy / "checkpoints"
    shutil.copytree(checkpoints / "checkpoint-2", checkpoints / "checkpoint-1")  # an older complete one
    manifest = json.loads((checkpoints / "checkpoint-1" / MANIFEST_NAME).read_text())
    (checkpoints / "checkpoint-1" / MANIFEST_NAME).write_text(json.dumps({**manifest, "step": 1}))
    (checkpoints / "checkpoint-3" / MANIFEST_NAME).unlink()  # checkpoint-3 is not complete
    rotate_checkpoints(checkpoints, keep=1)
    assert {p.name for p in checkpoints.iterdir()} == {"checkpoint-2", "checkpoint-3"}
    assert newest_complete_checkpoint(checkpoints).chosen == checkpoints / "checkpoint-2"


def test_cli_resume_past_a_broken_checkpoint_reaches_the_finished_runs_adapter(run_copy, capsys):
    reference = load_file(run_copy / "adapter" / "adapter_model.safetensors")
    shutil.rmtree(run_copy / "adapter")
    _truncate(run_copy / "checkpoints" / "checkpoint-3" / "optimizer.pt")
    assert cli_main(["train", "--resume", str(run_copy), "--quiet"]) == 0
    assert "skipping checkpoint-3: optimizer.pt has" in capsys.readouterr().err
    metrics = json.loads((run_copy / "metrics.json").read_text())
    assert metrics["train"]["resumed_from"].endswith("checkpoint-2")
    resumed = load_file(run_copy / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.allclose(resumed[key], reference[key], atol=1e-6), key
    assert newest_complete_checkpoint(run_copy / "checkpoints").skipped == []  # step 3 saved again, whole


def test_a_second_run_into_a_folder_being_written_is_refused(tmp_path, tiny_model_folder, repeat_data):
    run = tmp_path / "run"
    run.mkdir()
    with RunLock(run):
        with pytest.raises(ConfigError, match=f"another lorakit train \\(pid {os.getpid()}\\) is writing"):
            train(TrainConfig.from_dict(run_config(tiny_model_folder, repeat_data, run, max_steps=1)), progress=False)


def test_resume_of_a_folder_that_is_not_a_run_says_so(tmp_path, capsys):
    assert cli_main(["train", "--resume", str(tmp_path / "nothing-here"), "--quiet"]) == 2
    assert "config.yaml' does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- driver (runs in its own process)

class SaveProbe:
    """A profile function for one checkpoint save that SIGKILLs the process at the k-th call of
    the kind it counts (every Python/C call, or file-system calls and returns)."""

    def __init__(self, mode: str | None, k: int):  # mode "calls": every call and return; "fs": file-system ones
        self.mode, self.k = mode, k
        self.calls = self.file_system_calls = 0

    def __call__(self, frame, event, arg) -> None:
        if frame.f_code.co_filename.startswith("<frozen"):  # import machinery: differs between first and later saves
            return
        self.calls += 1
        if (event in ("c_call", "c_return") and getattr(arg, "__name__", "") in FILE_SYSTEM_CALLS
                and not isinstance(getattr(arg, "__self__", None), str)):  # str.replace is no file-system call
            self.file_system_calls += 1
        if self.mode is not None and {"calls": self.calls, "fs": self.file_system_calls}[self.mode] >= self.k:
            os.kill(os.getpid(), signal.SIGKILL)


def _child(config: dict, resume: bool, target: dict | None, report) -> None:
    from lorakit.train import runner
    from lorakit.train.config import TrainConfig

    class Probed(runner.AdapterTrainer):
        def _save_checkpoint(self, model, trial):
            step = self.state.global_step
            report(event="save_begin", step=step)
            # The first save at or after the drawn step (a kill just after a rename resumes one step later).
            armed = target is not None and step >= target["step"] and target["mode"] in ("calls", "fs")
            probe = SaveProbe(target["mode"] if armed else None, target["k"] if armed else 0)
            start = time.perf_counter()
            sys.setprofile(probe)
            try:
                super()._save_checkpoint(model, trial)
            finally:
                sys.setprofile(None)
            if armed:  # the drawn call lies past this save's end: kill right after it
                os.kill(os.getpid(), signal.SIGKILL)
            report(event="save_end", step=step, calls=probe.calls, fs=probe.file_system_calls,
                   seconds=time.perf_counter() - start)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            report(event="resumed", path=str(resume_from_checkpoint))
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    runner.AdapterTrainer = Probed
    runner.train(TrainConfig.from_dict(config), resume=resume, progress=False)


def _run(config: dict, resume: bool, target: dict | None) -> tuple[int, list[dict]]:
    """Fork a child that trains; returns its wait status and what it reported."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)

        def report(**event):
            os.write(write_end, (json.dumps(event) + "\n").encode())

        try:
            _child(config, resume, target, report)
        except BaseException:
            report(event="error", message=traceback.format_exc()[-3000:])
            os._exit(1)
        os._exit(0)
    os.close(write_end)
    events, buffer, killed = [], b"", False
    while True:
        select.select([read_end], [], [])
        chunk = os.read(read_end, 65536)
        if not chunk:
            break
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            event = json.loads(line)
            events.append(event)
            if (target is not None and target["mode"] == "timed" and event["event"] == "save_begin"
                    and event["step"] >= target["step"] and not killed):
                time.sleep(target["delay"])
                os.kill(pid, signal.SIGKILL)
                killed = True
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    return (-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)), events


def drive(plan_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    torch.set_num_threads(1)
    import lorakit.train.runner  # noqa: F401  (imported once here, shared by every forked run)

    rng = random.Random(plan["seed"])
    results: dict = {"rounds": []}
    status, events = _run(plan["reference"], resume=False, target=None)
    results["reference"] = {"status": status, "events": events}
    saves = {e["step"]: e for e in events if e["event"] == "save_end"}
    # A run's first save also runs code for the first time (lazy imports, caches): measured as the
    # difference between the reference's first two saves (neither rotates yet), added to later ones.
    first_save_extra = {key: max(0, saves[1][key] - saves[2][key]) for key in ("calls", "fs")}
    rotation_fs = saves[3]["fs"] - saves[2]["fs"]  # the third save is the first to delete an older one
    finished = 0  # the newest step whose save finished in some run: the next run starts at it or later
    for round_index, mode in enumerate(plan["modes"]):
        # This run's first, second or third save, so that runs get on to the saves that rotate.
        step = min(finished + 1 + rng.randrange(3), plan["max_steps"])
        expected = saves[step]
        target = {"mode": mode, "step": step}
        if mode == "timed":
            target["delay"] = rng.uniform(0, 1.5 * expected["seconds"])
        elif mode == "late-fs":  # a save's last file-system calls: the rename that publishes it, then rotation
            target.update(mode="fs", k=rng.randint(expected["fs"] - 2 * rotation_fs, expected["fs"]))
        else:
            extra = first_save_extra[mode] if step == finished + 1 else 0
            target["k"] = rng.randint(1, expected[mode] + extra)
        status, events = _run(plan["run"], resume=round_index > 0, target=target)
        round_ = {"target": target, "status": status, "resumed": [e["path"] for e in events if e["event"] == "resumed"],
                  "begun": [e["step"] for e in events if e["event"] == "save_begin"],
                  "finished": [e["step"] for e in events if e["event"] == "save_end"],
                  "errors": [e["message"] for e in events if e["event"] == "error"]}
        results["rounds"].append(round_)
        if status != -signal.SIGKILL:
            break  # the run failed (or was never killed): the test reports it
        finished = max([finished, *round_["finished"]])
    status, events = _run(plan["run"], resume=True, target=None)
    results["final"] = {"status": status, "resumed": [e["path"] for e in events if e["event"] == "resumed"],
                        "errors": [e["message"] for e in events if e["event"] == "error"]}
    Path(plan["results"]).write_text(json.dumps(results, indent=1))


# ---------------------------------------------------------------- the kill test

def test_sigkill_at_random_points_of_checkpoint_saves_always_resumes_to_the_same_adapter(
        tmp_path, tiny_model_folder, repeat_data):
    max_steps = 10
    plan = {
        "seed": 13, "max_steps": max_steps, "results": str(tmp_path / "results.json"),
        "reference": run_config(tiny_model_folder, repeat_data, tmp_path / "straight", max_steps),
        "run": run_config(tiny_model_folder, repeat_data, tmp_path / "killed", max_steps),
        "modes": ["calls", "fs", "timed", "late-fs", "calls", "fs", "timed", "late-fs"],
    }
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, __file__, str(tmp_path / "plan.json")], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["reference"]["status"] == 0, results["reference"]
    finished = begun = 0  # over the runs so far: the newest save that finished, the newest that began
    for number, round_ in enumerate([*results["rounds"], results["final"]]):
        what = f"run {number + 1} (after {number} kills): {round_}"
        assert round_["status"] == (0 if round_ is results["final"] else -signal.SIGKILL), what  # not failed
        # It resumed from the newest checkpoint whose save finished, or one its kill caught after the rename.
        if finished == 0 and not round_["resumed"]:
            pass  # killed before any save finished: a fresh start
        else:
            assert len(round_["resumed"]) == 1, what
            assert finished <= int(round_["resumed"][0].rsplit("-", 1)[1]) <= begun, what
        finished, begun = max([finished, *round_.get("finished", [])]), max([begun, *round_.get("begun", [])])
    assert len(results["rounds"]) == len(plan["modes"])
    resumed = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    reference = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.allclose(resumed[key], reference[key], atol=1e-6), key
    left = {p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()}
    assert left == {f"checkpoint-{max_steps - 1}", f"checkpoint-{max_steps}"}  # rotated, no staging or trash left


if __name__ == "__main__":
    drive(sys.argv[1])
