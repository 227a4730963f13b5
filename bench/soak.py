"""A standing soak test of `lorakit serve`: many concurrent clients, good and hostile requests, for a
fixed time; nothing a bad request, file or disconnect does may change another request's answer.

It starts `lorakit serve` as a child process on 127.0.0.1 (a free port; no other address is ever
contacted) over an adapter root this script writes into a temporary folder:

- good adapters: random PEFT-format LoRA folders (bench/serve.py's `write_adapters`);
- hostile adapters, each a class the server must refuse without harm: finite but huge weights
  (the logits overflow to inf/NaN at sampling), NaN weights, a truncated safetensors file, a FIFO
  named adapter_config.json, a symlinked weights file leading out of the root, and a sub-folder
  that is a symlink out of the root;
- `redos`: a valid adapter whose `rank_pattern` key hangs a backtracking regex engine (it matches
  no module): it must be served, like any good adapter, and answer as its twin a00.

First every good request template is sent alone, one at a time: its answer is the reference.
Then `--clients` workers send a seeded random mix for `--seconds` (or until `--max-requests`):

- good: greedy completions and chat completions over the good adapters and the base, streamed
  and not, plus load -> request -> unload churn under per-worker names (reloading a name from
  another folder must serve the new folder's weights);
- hostile fields: seeds past 2**64 and negative, temperature/top_p that underflow, NaN, wrong types,
  lone surrogates, invalid UTF-8 bytes, malformed JSON, oversized bodies, over-long prompts,
  out-of-vocabulary token ids, unknown adapters, path traversal in load_lora_adapter;
- hostile adapters (above), and connections that hang up mid-stream or trickle the body.

Every answer must be well-formed: a JSON body with `choices` or an OpenAI error object whose `code`
is the HTTP status, or an SSE stream of JSON events ending in `data: [DONE]`. The script prints
requests sent, the concurrency reached, responses by status and by class, good answers that differ
from their reference (must be 0), malformed answers and hung requests (must be 0), leaked pool cells
once idle (must be 0), /health answers during the run, and the server's RSS at start and end; it
exits 1 when an invariant fails. Writes bench/results/soak_<device>[_quick].md.

    .venv/bin/python bench/soak.py --quick     # tiny random Llama, 20 s (the test suite runs this form)
    .venv/bin/python bench/soak.py             # the embedded default model, 32 clients, 300 s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve as serve_bench  # noqa: E402  (random PEFT-format adapters)
import train_step as step_bench  # noqa: E402  (environment description, results header)

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["What is 47 + 38?", "Sort these numbers in ascending order: 47 12 89 30", "Reverse the order of these words: "
           "apple river stone", "Paris is the capital of", "def add(a, b):", "Once upon a time"]
# Nested quantifiers over the module path: exponential backtracking in a backtracking engine.
CATASTROPHIC_PATTERN = r"((.*)*)*\.q_projZ"
HUNG_AFTER_S = 60.0


@dataclass
class Settings:
    quick: bool = False
    model: str | None = None  # None: the embedded default model (--quick: a tiny random Llama)
    clients: int = 32
    seconds: float = 300.0
    max_requests: int = 20000
    adapters: int = 8
    max_tokens: int = 8
    seed: int = 0
    threads: int = 1
    max_body_bytes: int = 1 << 20

    @classmethod
    def quick_form(cls) -> "Settings":
        return cls(quick=True, clients=16, seconds=20.0, max_requests=2000, adapters=4, max_tokens=6)


@dataclass
class Outcome:
    kind: str
    status: int | str  # an HTTP status, or "hung" / "disconnected" / "connection-error"
    well_formed: bool
    text: str | None = None  # the generated text of a good request
    expected: str | None = None
    problem: str = ""


@dataclass
class Report:
    settings: Settings
    sent: int = 0
    max_in_flight: int = 0
    outcomes: list[Outcome] = field(default_factory=list)
    health: Counter = field(default_factory=Counter)
    rss_start_mib: float = 0.0
    rss_end_mib: float = 0.0
    rss_samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds into the run, MiB)
    leaked_cells: int | None = None
    pool_cells: int | None = None
    seconds: float = 0.0
    server_alive: bool = True

    @property
    def mismatches(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.expected is not None and o.text is not None and o.text != o.expected]

    @property
    def malformed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.well_formed]

    @property
    def hung(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "hung"]

    def failures(self) -> list[str]:
        found = []
        if self.mismatches:
            found.append(f"{len(self.mismatches)} good answers differ from their single-request reference")
        if self.malformed:
            found.append(f"{len(self.malformed)} answers are not well-formed, e.g. {self.malformed[0].kind}: "
                         f"{self.malformed[0].problem}")
        if self.hung:
            found.append(f"{len(self.hung)} requests got no answer within {HUNG_AFTER_S:.0f} s")
        if self.leaked_cells:
            found.append(f"{self.leaked_cells} pool cells are still held by requests once the server is idle")
        if self.leaked_cells is None:
            found.append("the server's metrics did not report its pool cells")
        if not self.server_alive:
            found.append("the server process died")
        if self.health.get("503") or self.health.get("error"):
            found.append(f"/health was not ok during the run: {dict(self.health)}")
        return found


# --- the adapter root --------------------------------------------------------------------------
def write_root(model_dir: Path, root: Path, outside: Path, settings: Settings) -> list[str]:
    """Good adapters a00..; hostile ones beside them. Returns the good adapters' names."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    specs = [serve_bench.AdapterSpec(f"a{i:02d}", (4, 8)[i % 2], ("q,v", "all-linear")[i % 2])
             for i in range(settings.adapters)]
    serve_bench.write_adapters(model, root, specs, SimpleNamespace(seed=settings.seed, delta_scale=0.05))
    good = [spec.name for spec in specs]
    template = root / good[0]
    config = json.loads((template / "adapter_config.json").read_text())
    tensors = _read(template / "adapter_model.safetensors")

    def variant(name: str, new_tensors: dict | None = None, **config_changes) -> Path:
        folder = root / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({**config, **config_changes}))
        save_file(new_tensors if new_tensors is not None else tensors, str(folder / "adapter_model.safetensors"))
        return folder

    # Finite weights whose product overflows float32: the logits become inf / NaN at sampling.
    variant("huge", {k: torch.full_like(v, 1e30 if "lora_B" in k else 1e10) for k, v in tensors.items()})
    variant("nan", {k: torch.full_like(v, float("nan")) for k, v in tensors.items()})
    truncated = variant("truncated")
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    # A valid adapter (the key matches no module, so a00's rank applies) that hangs a backtracking engine.
    variant("redos", rank_pattern={CATASTROPHIC_PATTERN: 2})
    fifo = root / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "adapter_config.json")
    # Out of the root: a real adapter the server must never read through a link.
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(outside / "adapter_model.safetensors"))
    linked = root / "linked-file"
    linked.mkdir()
    (linked / "adapter_config.json").write_text(json.dumps(config))
    (linked / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    (root / "linked-folder").symlink_to(outside, target_is_directory=True)
    return good + ["redos"]


def _read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


HOSTILE_ADAPTERS = ("huge", "nan", "truncated", "fifo", "linked-file", "linked-folder")


# --- the server --------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model_dir: Path, root: Path, port: int, settings: Settings, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "lorakit", "serve", "--model", str(model_dir), "--adapters", str(root),
               "--host", "127.0.0.1", "--port", str(port), "--max-batch-size", "8", "--max-queue", "64",
               "--max-body-bytes", str(settings.max_body_bytes), "--body-timeout", "5", "--shutdown-timeout", "10",
               # float32: a row's answer is independent of its batch-mates only there (in bf16 the rounding
               # of a row depends on the batch's shape, so greedy answers may differ from the one alone)
               "--dtype", "float32"]
    env = {**os.environ, "OMP_NUM_THREADS": str(settings.threads), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO_ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- a minimal HTTP/1.1 client: hostile bytes need raw sockets ---------------------------------
async def http(port: int, method: str, path: str, body: bytes = b"", *, headers: dict | None = None,
               trickle: float | None = None, hang_up_after: int | None = None,
               timeout: float = HUNG_AFTER_S) -> tuple[int | str, bytes]:
    """Status and body (chunked transfer decoded). `trickle`: send 8 bytes of the body, one per that
    many seconds, then stall; `hang_up_after`: close the connection after that many body bytes."""
    try:
        return await asyncio.wait_for(_exchange(port, method, path, body, headers or {}, trickle, hang_up_after), timeout)
    except asyncio.TimeoutError:
        return "hung", b""
    except (ConnectionError, OSError):
        return "connection-error", b""


async def _exchange(port, method, path, body, headers, trickle, hang_up_after):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json", "Content-Length": str(len(body)),
                "Connection": "close", **headers}
        writer.write(f"{method} {path} HTTP/1.1\r\n".encode() + "".join(f"{k}: {v}\r\n" for k, v in head.items()
                                                                        if v is not None).encode() + b"\r\n")
        if trickle is None:
            writer.write(body)
        else:
            for byte in body[:8]:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(trickle)
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            return "connection-error", b""
        status = int(status_line.split()[1])
        response_headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            response_headers[key.strip().lower()] = value.strip()
        if response_headers.get("transfer-encoding") == "chunked":
            data = b""
            while True:
                size = int((await reader.readline()).strip() or b"0", 16)
                if size == 0:
                    break
                data += await reader.readexactly(size)
                await reader.readline()
                if hang_up_after is not None and len(data) >= hang_up_after:
                    return "disconnected", data
            return status, data
        if "content-length" in response_headers:
            return status, await reader.readexactly(int(response_headers["content-length"]))
        return status, await reader.read()
    finally:
        writer.close()


def check_answer(status: int | str, data: bytes, streamed: bool) -> tuple[bool, str | None, str]:
    """(well formed, generated text or None, what is wrong)."""
    if status in ("disconnected",):
        return True, None, ""
    if not isinstance(status, int):
        return False, None, f"no HTTP answer ({status})"
    if streamed and status == 200:
        events = [line[6:] for line in data.decode("utf-8", "replace").split("\n") if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return False, None, "stream does not end with data: [DONE]"
        text, error = "", None
        for event in events[:-1]:
            try:
                chunk = json.loads(event)
            except ValueError:
                return False, None, f"stream event is not JSON: {event[:80]!r}"
            if "error" in chunk:
                error = chunk["error"]
                if not isinstance(error.get("message"), str):
                    return False, None, "stream error event without a message"
                continue
            for choice in chunk.get("choices", []):
                text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
        return True, (None if error else text), ""
    try:
        body = json.loads(data)
    except ValueError:
        return False, None, f"status {status} body is not JSON: {data[:80]!r}"
    if status == 200:
        if not isinstance(body, dict):
            return False, None, "200 body is not an object"
        if "choices" in body:
            choice = body["choices"][0]
            return True, choice.get("text", (choice.get("message") or {}).get("content")), ""
        return True, None, ""  # another route's JSON (models, health)
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str) or error.get("code") != status:
        return False, None, f"status {status} without an OpenAI error body: {data[:120]!r}"
    return True, None, ""


# --- the request mix ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Good:
    route: str  # "completions" | "chat"
    model: str
    prompt: str
    streamed: bool

    def body(self, max_tokens: int) -> dict:
        common = {"model": self.model, "max_tokens": max_tokens, "temperature": 0, "stream": self.streamed}
        if self.route == "chat":
            return {**common, "messages": [{"role": "user", "content": self.prompt}]}
        return {**common, "prompt": self.prompt}

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.route == "chat" else "/v1/completions"


def good_templates(adapters: list[str], base: str) -> list[Good]:
    templates = []
    for i, model in enumerate([base] + adapters):
        for j in range(2):
            prompt = PROMPTS[(i + j) % len(PROMPTS)]
            templates.append(Good("chat" if (i + j) % 2 else "completions", model, prompt, streamed=bool(j)))
    return templates


def _json(body) -> bytes:
    return json.dumps(body).encode()


def hostile_requests(settings: Settings, base: str) -> dict[str, tuple[str, bytes, dict]]:
    """kind -> (path, body bytes, extra options). Each must get a well-formed answer, alone."""
    plain = {"model": base, "prompt": "Hello", "max_tokens": 2}
    cases = {
        "seed-huge": _json({**plain, "temperature": 0.7, "seed": 2**70}),
        "seed-negative": _json({**plain, "temperature": 0.7, "seed": -(2**65)}),
        "temperature-underflow": _json({**plain, "temperature": 1e-45}),
        "top-p-underflow": _json({**plain, "temperature": 1.0, "top_p": 1e-45}),
        "temperature-nan": b'{"model": "%s", "prompt": "x", "temperature": NaN}' % base.encode(),
        "max-tokens-string": _json({**plain, "max_tokens": "many"}),
        "max-tokens-huge": _json({**plain, "max_tokens": 10**12}),
        "lone-surrogate": b'{"model": "%s", "prompt": "bad \\ud800 text", "max_tokens": 2}' % base.encode(),
        "invalid-utf8": b'{"model": "' + base.encode() + b'", "prompt": "\xff\xfe\xfa", "max_tokens": 2}',
        "malformed-json": b'{"model": "x", "prompt": ',
        "token-ids-out-of-vocab": _json({**plain, "prompt": [-1, 10**9]}),
        "unknown-adapter": _json({**plain, "model": "no-such-adapter"}),
        "prompt-too-long": _json({**plain, "prompt": "word " * 200_000}),
        "body-too-large": _json({**plain, "prompt": "x" * (settings.max_body_bytes + 10)}),
        "messages-garbage": _json({"model": base, "messages": [{"role": 5, "content": {"a": 1}}]}),
        "stop-garbage": _json({**plain, "stop": [None, 5]}),
    }
    out = {kind: ("/v1/completions" if kind != "messages-garbage" else "/v1/chat/completions", body, {})
           for kind, body in cases.items()}
    out["load-traversal"] = ("/v1/load_lora_adapter", _json({"lora_name": "evil", "lora_path": "../../../../etc"}), {})
    out["load-absolute"] = ("/v1/load_lora_adapter", _json({"lora_name": "evil2", "lora_path": "/etc"}), {})
    out["load-name-newline"] = ("/v1/load_lora_adapter", _json({"lora_name": "a00\n", "lora_path": "a00"}), {})
    out["chunked-body-too-large"] = ("/v1/completions", _json({**plain, "prompt": "y" * (settings.max_body_bytes + 10)}),
                                     {"headers": {"Content-Length": None, "Transfer-Encoding": "chunked"}})
    for adapter in HOSTILE_ADAPTERS:
        out[f"adapter-{adapter}"] = ("/v1/completions", _json({**plain, "model": adapter}), {})
    return out


def _chunked(body: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 65536]), body[i:i + 65536]) for i in range(0, len(body), 65536)) + b"0\r\n\r\n"


class Soak:
    def __init__(self, port: int, settings: Settings, base: str, adapters: list[str]):
        self.port, self.settings, self.base, self.adapters = port, settings, base, adapters
        self.templates = good_templates(adapters, base)
        self.hostile = hostile_requests(settings, base)
        self.references: dict[Good, str] = {}
        self.report = Report(settings)
        self.in_flight = 0

    async def send(self, method: str, path: str, body: bytes = b"", **options):
        self.report.sent += 1
        self.in_flight += 1
        self.report.max_in_flight = max(self.report.max_in_flight, self.in_flight)
        try:
            if (options.get("headers") or {}).get("Transfer-Encoding") == "chunked":
                body = _chunked(body)
            return await http(self.port, method, path, body, **options)
        finally:
            self.in_flight -= 1

    async def good(self, template: Good, kind: str = "good", expected_from: Good | None = None) -> Outcome:
        status, data = await self.send("POST", template.path, _json(template.body(self.settings.max_tokens)))
        well_formed, text, problem = check_answer(status, data, template.streamed)
        expected = self.references.get(expected_from or template)
        if status != 200:
            well_formed, problem = False, f"good request answered {status}: {data[:200]!r}"
        return Outcome(kind, status, well_formed, text, expected, problem)

    async def references_alone(self) -> None:
        for template in self.templates:
            status, data = await http(self.port, "POST", template.path, _json(template.body(self.settings.max_tokens)))
            ok, text, problem = check_answer(status, data, template.streamed)
            if status != 200 or not ok or text is None:
                raise RuntimeError(f"reference request {template} failed: {status} {problem} {data[:300]!r}")
            self.references[template] = text

    async def churn(self, worker: int, rng: random.Random) -> list[Outcome]:
        """load -> request -> unload under this worker's name, from a randomly chosen good folder."""
        name, folder = f"churn-{worker}", rng.choice(self.adapters)
        outcomes = []
        status, data = await self.send("POST", "/v1/load_lora_adapter", _json({"lora_name": name, "lora_path": folder}))
        ok, _, problem = check_answer(status, data if status != 200 else b"{}", False)
        outcomes.append(Outcome("churn-load", status, ok and status == 200, problem=problem or
                                ("" if status == 200 else f"load answered {status}: {data[:200]!r}")))
        if status == 200:
            reference = next(t for t in self.templates if t.model == folder and not t.streamed)
            outcomes.append(await self.good(Good(reference.route, name, reference.prompt, False), "churn-request", reference))
        status, data = await self.send("POST", "/v1/unload_lora_adapter", _json({"lora_name": name}))
        ok, _, problem = check_answer(status, data if status != 200 else b"{}", False)
        outcomes.append(Outcome("churn-unload", status, ok and status in (200, 404), problem=problem))
        return outcomes

    async def hostile_one(self, kind: str) -> Outcome:
        path, body, options = self.hostile[kind]
        status, data = await self.send("POST", path, body, **options)
        well_formed, _, problem = check_answer(status, data, False)
        if isinstance(status, int) and status >= 500:
            well_formed, problem = False, f"answered {status}: {data[:200]!r}"
        if status == 200 and kind not in ("seed-huge", "seed-negative", "temperature-underflow", "top-p-underflow"):
            well_formed, problem = False, f"a hostile request was served: {data[:200]!r}"
        return Outcome(kind, status, well_formed, problem=problem)

    async def disconnect(self, template: Good) -> Outcome:
        streamed = Good(template.route, template.model, template.prompt, True)
        status, _ = await self.send("POST", streamed.path, _json(streamed.body(64)), hang_up_after=1)
        return Outcome("disconnect-mid-stream", status, status in ("disconnected", 200), problem=str(status))

    async def trickle(self) -> Outcome:
        body = _json({"model": self.base, "prompt": "Hello", "max_tokens": 2})
        status, data = await self.send("POST", "/v1/completions", body, trickle=0.5, timeout=HUNG_AFTER_S)
        ok = status in ("connection-error",) or (isinstance(status, int) and check_answer(status, data, False)[0])
        return Outcome("slow-body", status, ok and status != 200, problem=f"{status} {data[:120]!r}")

    def classes(self) -> list[str]:
        return ["good", "churn", "disconnect", "slow-body"] + sorted(self.hostile)

    async def one(self, kind: str, index: int, rng: random.Random) -> list[Outcome]:
        if kind == "good":
            return [await self.good(rng.choice(self.templates))]
        if kind == "churn":
            return await self.churn(index, rng)
        if kind == "disconnect":
            return [await self.disconnect(rng.choice(self.templates))]
        if kind == "slow-body":
            return [await self.trickle()]
        return [await self.hostile_one(kind)]

    async def worker(self, index: int, deadline: float) -> None:
        """Every class once across the workers first (so each run covers them all), then a seeded mix."""
        rng = random.Random(self.settings.seed * 1000 + index)
        first = self.classes()[index::self.settings.clients]
        while time.monotonic() < deadline and self.report.sent < self.settings.max_requests:
            if first:
                kind = first.pop(0)
            else:
                roll = rng.random()
                kind = ("good" if roll < 0.45 else "churn" if roll < 0.55 else "disconnect" if roll < 0.62
                        else "slow-body" if roll < 0.63 else rng.choice(sorted(self.hostile)))
            self.report.outcomes.extend(await self.one(kind, index, rng))

    async def watch_health(self, pid: int, start: float, deadline: float) -> None:
        """/health twice a second, and the server's RSS (so growth can be told from a plateau)."""
        while time.monotonic() < deadline:
            status, _ = await http(self.port, "GET", "/health", timeout=10)
            self.report.health[str(status) if isinstance(status, int) else "error"] += 1
            self.report.rss_samples.append((time.monotonic() - start, rss_mib(pid)))
            await asyncio.sleep(0.5)

    async def pool_state(self) -> tuple[int | None, int | None, int, int]:
        """(cells held by requests, total cells, running, waiting) from /metrics."""
        status, data = await http(self.port, "GET", "/metrics", timeout=10)
        values = {}
        for line in data.decode().splitlines():
            match = re.match(r"^(lorakit_[a-z_]+) ([0-9.e+-]+)$", line)
            if match:
                values[match.group(1)] = float(match.group(2))
        held = values.get("lorakit_pool_request_cells")
        total = values.get("lorakit_pool_cells")
        return (None if held is None else int(held), None if total is None else int(total),
                int(values.get("lorakit_running_requests", 0)), int(values.get("lorakit_queue_length", 0)))

    async def run(self, pid: int) -> Report:
        await self.references_alone()
        self.report.rss_start_mib = rss_mib(pid)
        start = time.monotonic()
        deadline = start + self.settings.seconds
        await asyncio.gather(self.watch_health(pid, start, deadline),
                             *(self.worker(i, deadline) for i in range(self.settings.clients)))
        self.report.seconds = time.monotonic() - start
        for _ in range(120):  # disconnected requests are cancelled at the next step; wait for idle
            held, total, running, waiting = await self.pool_state()
            if running == 0 and waiting == 0 and held == 0:
                break
            await asyncio.sleep(0.5)
        self.report.leaked_cells, self.report.pool_cells = held, total
        self.report.rss_end_mib = rss_mib(pid)
        return self.report


# --- running it ---------------------------------------------------------------------------------
def tiny_model(folder: Path) -> Path:
    """A tiny random Llama with the embedded model's real tokenizer (what the test suite uses)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit.models

    _, tokenizer = lorakit.models.load(lorakit.models.DEFAULT_MODEL)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def default_model(folder: Path) -> Path:
    """The embedded default model as an HF folder (its converted safetensors cache)."""
    import lorakit.models

    model, tokenizer = lorakit.models.load(lorakit.models.DEFAULT_MODEL)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def wait_ready(port: int, server: subprocess.Popen, log: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"lorakit serve exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        status, _ = asyncio.run(http(port, "GET", "/health", timeout=5))
        if status == 200:
            return
        time.sleep(0.5)
    raise RuntimeError(f"lorakit serve did not become healthy in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def run(settings: Settings, work: Path) -> Report:
    model_dir = Path(settings.model) if settings.model else (tiny_model if settings.quick else default_model)(work / "model")
    root = work / "adapters"
    root.mkdir()
    good = write_root(model_dir, root, work / "outside", settings)
    port, log = free_port(), work / "server.log"
    server = start_server(model_dir, root, port, settings, log)
    try:
        wait_ready(port, server, log)
        soak = Soak(port, settings, str(model_dir), good)
        report = asyncio.run(soak.run(server.pid))
        report.server_alive = server.poll() is None
        return report
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def rss_by_fifth(report: Report) -> str:
    """RSS (MiB) at the end of each fifth of the run: a plateau is allocator warm-up, a steady climb a leak."""
    samples = report.rss_samples
    if not samples:
        return "n/a"
    marks = [report.seconds * k / 5 for k in range(1, 6)]
    picked = [min(samples, key=lambda sample: abs(sample[0] - mark))[1] for mark in marks]
    return " / ".join(f"{mib:.0f}" for mib in picked)


def format_markdown(report: Report, env: dict[str, str], command: str) -> str:
    s = report.settings
    by_status = Counter(str(o.status) for o in report.outcomes)
    by_kind: dict[str, Counter] = {}
    for outcome in report.outcomes:
        by_kind.setdefault(outcome.kind, Counter())[str(outcome.status)] += 1
    good = [o for o in report.outcomes if o.expected is not None]
    lines = step_bench.results_head(f"# Soak test of `lorakit serve`{' (quick)' if s.quick else ''}", command)
    lines += [f"- {key}: {value}" for key, value in env.items()]
    lines += [f"- model: {s.model or ('tiny random Llama (quick)' if s.quick else 'embedded default model')}, "
              f"{s.adapters} good adapters + {len(HOSTILE_ADAPTERS)} hostile ones, max_tokens {s.max_tokens}",
              f"- {s.clients} clients for {report.seconds:.1f} s (cap {s.max_requests} requests), seed {s.seed}", "",
              "| measure | value |", "|---|---:|",
              f"| requests sent | {report.sent} |",
              f"| concurrency reached | {report.max_in_flight} |",
              f"| good answers compared with their single-request reference | {len(good)} |",
              f"| good answers that differ (must be 0) | {len(report.mismatches)} |",
              f"| malformed answers (must be 0) | {len(report.malformed)} |",
              f"| hung requests (must be 0) | {len(report.hung)} |",
              f"| pool cells held by requests once idle (must be 0) | {report.leaked_cells} of {report.pool_cells} |",
              f"| /health answers during the run | {dict(sorted(report.health.items()))} |",
              f"| server RSS start -> end | {report.rss_start_mib:.0f} -> {report.rss_end_mib:.0f} MiB |",
              f"| server RSS at each fifth of the run | {rss_by_fifth(report)} |",
              f"| server alive at the end | {report.server_alive} |", "",
              "Responses by status: " + ", ".join(f"{k}: {v}" for k, v in sorted(by_status.items())), "",
              "| request class | answers by status |", "|---|---|"]
    lines += [f"| {kind} | {', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))} |"
              for kind, counts in sorted(by_kind.items())]
    failures = report.failures()
    lines += ["", "Verdict: " + ("every invariant held." if not failures else "FAILED: " + "; ".join(failures))]
    if report.malformed:
        lines += ["", "First malformed answers:"] + [f"- {o.kind}: {o.problem}" for o in report.malformed[:5]]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random Llama, 16 clients, 20 s")
    defaults = Settings()
    for name in ("model", "clients", "seconds", "max_requests", "adapters", "max_tokens", "seed", "threads"):
        kind = type(getattr(defaults, name)) if getattr(defaults, name) is not None else str
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    parser.add_argument("--out", type=Path, help="results file (default: bench/results/soak_cpu[_quick].md)")
    args = parser.parse_args(argv)
    settings = Settings.quick_form() if args.quick else Settings()
    for name in ("model", "clients", "seconds", "max_requests", "adapters", "max_tokens", "seed", "threads"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    settings.out = args.out
    return settings


def main(argv: list[str] | None = None) -> Report:
    settings = parse_args(argv)
    command = "python bench/soak.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    with tempfile.TemporaryDirectory(prefix="lorakit-soak-") as work:
        report = run(settings, Path(work))
    env = step_bench.environment(SimpleNamespace(device="cpu", dtype="float32"))
    env["threads"] = f"{settings.threads} in the server (OMP_NUM_THREADS), clients in this process"
    text = format_markdown(report, env, command.strip())
    print(text)
    out = settings.out or REPO_ROOT / "bench" / "results" / f"soak_cpu{'_quick' if settings.quick else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return report


if __name__ == "__main__":
    sys.exit(1 if main().failures() else 0)
