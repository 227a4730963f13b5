"""Which floating-point dtype lorakit computes in, and how bfloat16 is applied: one place.

Three questions, each answered here and nowhere else:

* Does this device run bfloat16 matrix products fast? (`bf16_support`) On a CPU that needs
  bf16 dot-product instructions -- AVX512-BF16 (Intel Cooper Lake and later, AMD Zen 4 and later)
  or AMX-BF16 (Intel Sapphire Rapids and later) -- and torch's oneDNN, which uses them; without
  them torch emulates bf16 and a bf16 product is *slower* than float32. On CUDA it is
  `torch.cuda.is_bf16_supported()` without emulation (Ampere and later).
* Which dtype does a run use? (`resolve_dtype`) `"float32"` and `"bfloat16"` are taken as given
  (bfloat16 on a device without fast bf16 is allowed, with a warning: it is slow, not wrong);
  `"auto"` is bfloat16 where `bf16_support` says fast, float32 elsewhere. The decision reads
  flags, not a timing, so the same machine always makes the same choice.
* How does training use bf16? (`prepare_model`, `autocast`, which on a CPU also flushes
  subnormals to zero in every dtype: `flush_denormals`) The recipe of mixed-precision
  training with master weights (Micikevicius et al., arXiv 1710.03740, with bf16 for fp16 so no
  loss scaling is needed): the frozen base weights are *stored* in bf16 (half the memory, and no
  cast per step), every matrix product runs under `torch.autocast(device, bfloat16)`, the adapter's
  parameters -- and so their gradients and the optimizer state -- stay float32, and the loss is
  computed in float32 (transformers' causal-LM loss upcasts the logits).

`matmul_gflops` measures a product's throughput in each dtype, so benchmark results from
different machines can be read side by side.
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorakit.core.errors import ConfigError, LorakitWarning

DTYPE_CHOICES = ("auto", "float32", "bfloat16")
"""Values of every `dtype` option (`TrainConfig.dtype`, `lorakit train|eval|generate|serve --dtype`)."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# A 256-token tile of a decoder projection of the default model (hidden 576, MLP 1536).
PROBE_SHAPE = (256, 576, 1536)


class SlowDtypeWarning(LorakitWarning):
    """bfloat16 was asked for on a device whose bf16 products are emulated (slower than float32)."""


@dataclass(frozen=True)
class Bf16Support:
    """Whether a device type runs bfloat16 matrix products fast, and what that was decided from."""

    device_type: str
    fast: bool
    evidence: str  # e.g. "CPU flags avx512_bf16 (no amx_bf16); torch CPU kernels AVX512, oneDNN on"


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux), empty where that file does not exist."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo), or what `platform` knows elsewhere."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _torch_cpu_check(name: str) -> bool | None:
    """torch's own CPUID check (`torch.cpu._is_avx512_bf16_supported` etc.), None where absent."""
    check = getattr(torch.cpu, name, None)
    try:
        return bool(check()) if callable(check) else None
    except Exception:  # a private API: never let it break loading a model
        return None


@functools.lru_cache(maxsize=None)
def bf16_support(device_type: str = "cpu") -> Bf16Support:
    """Whether bfloat16 matrix products are fast on `device_type` ("cpu", "cuda", ...); cached."""
    device_type = torch.device(device_type).type
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return Bf16Support("cuda", False, "no CUDA device")
        try:
            fast = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.3 has no including_emulation
            fast = torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name()
        capability = ".".join(map(str, torch.cuda.get_device_capability()))
        return Bf16Support("cuda", fast, f"{name} (compute capability {capability}): "
                                         f"torch.cuda.is_bf16_supported() {'True' if fast else 'False'}")
    if device_type != "cpu":
        return Bf16Support(device_type, False, f"no bf16 check for device type {device_type!r}")
    flags = cpu_flags()
    avx512_bf16 = "avx512_bf16" in flags or bool(_torch_cpu_check("_is_avx512_bf16_supported"))
    amx_bf16 = "amx_bf16" in flags or (not flags and bool(_torch_cpu_check("_is_amx_tile_supported")))
    onednn = torch.backends.mkldnn.is_available()
    found = [name for name, present in (("avx512_bf16", avx512_bf16), ("amx_bf16", amx_bf16)) if present]
    evidence = (f"CPU flags: {', '.join(found) if found else 'neither avx512_bf16 nor amx_bf16'}; "
                f"torch CPU kernels {torch.backends.cpu.get_cpu_capability()}, oneDNN {'on' if onednn else 'off'}")
    return Bf16Support("cpu", bool(found) and onednn, evidence)


def resolve_dtype(choice: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype a run on `device` computes in: `choice` itself, or for "auto" (and None) bfloat16
    where `bf16_support` says bf16 products are fast, float32 elsewhere.

    Raises:
        ConfigError: `choice` is not one of DTYPE_CHOICES.
    """
    if isinstance(choice, torch.dtype):
        choice = {v: k for k, v in DTYPES.items()}.get(choice, str(choice))
    choice = "auto" if choice is None else str(choice).strip().lower()
    device_type = torch.device(device).type
    if choice == "auto":
        return torch.bfloat16 if bf16_support(device_type).fast else torch.float32
    if choice not in DTYPES:
        raise ConfigError(f"dtype={choice!r} is invalid: expected one of {', '.join(DTYPE_CHOICES)} "
                          "('auto' is bfloat16 where the hardware runs it fast, float32 elsewhere)")
    if choice == "bfloat16" and not bf16_support(device_type).fast:
        warnings.warn(f"dtype=bfloat16 on a {device_type} without fast bf16 products "
                      f"({bf16_support(device_type).evidence}): it runs emulated, usually slower than float32; "
                      "use --dtype float32 (or auto)", SlowDtypeWarning, stacklevel=2)
    return DTYPES[choice]


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' / 'bfloat16' (the names the options take)."""
    return str(dtype).removeprefix("torch.")


def prepare_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store `model`'s floating-point weights in `dtype` (in place; returns `model`).

    Call it on the base model *before* adapters are injected: `lorakit.inject` gives adapters
    float32 parameters on a half-precision base, which is the master-weight half of the recipe.
    A model that already holds adapters keeps them in float32 (only non-adapter tensors move).
    """
    from lorakit.core.inject import adapter_parameters

    keep = {id(p) for p in adapter_parameters(model).values()} if dtype != torch.float32 else set()
    for module in model.modules():
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if tensor is None or not tensor.is_floating_point() or id(tensor) in keep or tensor.dtype == dtype:
                continue
            tensor.data = tensor.data.to(dtype)
    return model


# On a CPU, torch's bf16 flash-attention kernel is slower than the plain (math) one for short
# sequences; measured on an AMD EPYC (AVX512-BF16), forward + backward of 9 heads x 64, causal:
# seq 64: flash 23.0 ms, math 12.7 ms; 128: 26.2 vs 16.6; 256: 24.3 vs 29.9; 1024: 42.6 vs 142.4.
MATH_ATTENTION_MAX_LEN = 128


def autocast(dtype: torch.dtype, device: str | torch.device = "cpu", seq_len: int | None = None
             ) -> contextlib.AbstractContextManager:
    """The compute context of a training step in `dtype`: bf16 autocast for bfloat16, nothing
    more for float32; on a CPU in bf16, for sequences of at most MATH_ATTENTION_MAX_LEN tokens
    (`seq_len`), attention uses the math kernel. (The whole run flushes subnormals to zero:
    `denormals_flushed`, entered by `lorakit.train.train`; the softmax of a 49k-token vocabulary
    has subnormal entries.)"""
    device_type = torch.device(device).type
    if dtype == torch.float32:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    if device_type == "cpu":
        if seq_len is not None and seq_len <= MATH_ATTENTION_MAX_LEN:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    stack.enter_context(torch.autocast(device_type, dtype=dtype))
    return stack


def flushing_denormals() -> bool:
    """Whether the CPU flushes subnormal floats to zero now (torch has a setter, no getter)."""
    return (torch.tensor([1e-40]) * 1.0).item() == 0.0


def flush_denormals() -> bool:
    """Flush subnormal floats (|x| < 1.2e-38) to zero on the CPU, process-wide, from now on.

    Measured on an AMD EPYC with AVX512-BF16, default model, batch 8 x 128: a bf16 step now and
    then took 45.9 s instead of 4.4 s, and a float32 step through the fused loss
    (`lorakit.train.loss`, whose softmax has subnormal entries) 54 s instead of 4.3 s; a
    random-init copy at batch 1 x 16 took 7.6 s instead of 0.39 s in bf16. The time went to
    `aten::mm` and `aten::sqrt` (AdamW) on subnormal operands, which x86 cores handle in
    microcode. Values below 1.2e-38 carry nothing a training step can use (bf16 has float32's
    exponent range); flushing them is what TensorFlow and Intel's extension for PyTorch do by
    default. Returns whether the CPU supports it (`torch.set_flush_denormal`). Process-wide from
    now on: for a process lorakit owns (`lorakit serve`, a benchmark); a library call uses `denormals_flushed()`, which gives the previous state back."""
    return torch.set_flush_denormal(True)


@contextlib.contextmanager
def denormals_flushed(device: str | torch.device = "cpu"):
    """Subnormals flushed to zero on the CPU while the block runs (a training run: forward, backward
    and optimizer), then the caller's setting again, so user code after `train()` computes as before."""
    if torch.device(device).type != "cpu":
        yield
        return
    before = flushing_denormals()
    flush_denormals()
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


def matmul_gflops(dtype: torch.dtype, device: str | torch.device = "cpu", shape: tuple[int, int, int] = PROBE_SHAPE,
                  seconds: float = 0.3) -> float:
    """Measured throughput (GFLOP/s, 2mkn per product) of an (m, k) @ (k, n) product in `dtype`
    on `device`, with torch's current thread count: the best of five batches of products that each
    take about `seconds` / 5. The best, not the median, estimates the machine's peak."""
    device = torch.device(device)
    m, k, n = shape
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=generator).to(device, dtype)
    b = torch.randn(k, n, generator=generator).to(device, dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        a @ b
    sync()
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds / 10:
        a @ b
        count += 1
    sync()
    per_batch = max(1, int(count * 2))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(per_batch):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - start) / per_batch)
    return 2 * m * k * n / best / 1e9

