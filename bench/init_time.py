"""Initialisation time of PiSSA, EVA and LoRA-GA on the default model, lorakit against PEFT, one run.

For each initialiser (the `METHODS` table: one entry per method), the same base model is copied
(untimed) and initialised by lorakit (`lorakit.inject(model, LoraConfig(init=...), data=batches)`)
and by PEFT (`get_peft_model` plus PEFT's own data step), alternately for `rounds` rounds (the order
swaps every round, so background load falls on both alike). Timed: everything from the untouched
copy to a model ready to train, i.e. adapter creation plus the initialiser (SVDs, forward or
backward passes over the batches). Reported: the median times and lorakit / PEFT; the issue's
target is <= 0.5 at equal quality.

Quality, each method's spec check, computed on both frameworks' models on a sample of layers
(every target of the first, middle and last decoder block):

- PiSSA (and PiSSA with randomized SVD, 4 subspace iterations): W_res + s B A == W (max abs
  error relative to max|W|) and the principal part s B A against the exact rank-r truncation
  of W (relative Frobenius error; 0 for an exact SVD, small for the randomized one);
- EVA: A's rows against the top principal directions of each layer's input activations on the
  same batches (prompt and padding tokens masked, as EVA does): the share of the best possible
  explained variance that A's row space captures (1.0 = the top-k subspace), plus B == 0 and
  W untouched;
- LoRA-GA: W_res + s B A == W, and agreement of the two frameworks' factors: mean squared cosine
  of the principal angles between lorakit's and PEFT's row spaces of A and column spaces of B
  (1.0 = the same subspaces).

Data (EVA, LoRA-GA): the first `batches` batches of `batch_size` GSM8K train examples, as
`bench/convergence.py` builds them (same folder, `--data`).

    .venv/bin/python bench/init_time.py            # r = 16, 3 rounds, 8 batches of 8
    .venv/bin/python bench/init_time.py --quick    # 1 round, 2 batches of 2; PiSSA and LoRA-GA only
    .venv/bin/python bench/init_time.py --only eva --rounds 1   # EVA on the full data (about 15 minutes on 2 cores)
    .venv/bin/python bench/init_time.py --only pissa
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convergence  # noqa: E402  (GSM8K batches)
import train_step as step_bench  # noqa: E402  (the environment block)

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Settings:
    r: int = 16
    alpha: float = 32.0
    rounds: int = 3
    batches: int = 8
    batch_size: int = 8
    max_length: int = 512
    device: str = "cpu"
    eva_tau: float = 0.99  # EVA's convergence threshold, both frameworks (PEFT's EvaConfig default)


QUICK = dict(rounds=1, batches=2, batch_size=2, max_length=256)
# EVA is not timed in the quick form: on 2 batches of 2 examples its components need not converge
# at tau = 0.99 (near-equal singular values keep rotating between passes), and PEFT, which has no
# pass cap, would then never return. Time it on the full data: --only eva (about 15 minutes on 2 cores).
NOT_QUICK = {"eva": "its components need not converge on the quick data; time it with --only eva"}


# --- the two frameworks' initialisations -------------------------------------------------------
def lorakit_init(init: str, **fields) -> Callable:
    def build(model: nn.Module, batches, s: Settings) -> nn.Module:
        import lorakit
        from lorakit.core.registry import data_initialiser

        options = dict(fields)
        if init == "eva":
            options["init_options"] = {"tau": s.eva_tau, **fields.get("init_options", {})}
        config = lorakit.LoraConfig(r=s.r, alpha=s.alpha, init=init, **options)
        data = batches if data_initialiser(init) is not None else None
        return lorakit.inject(model, config, data=data, progress=False)

    return build


def peft_pissa(init_lora_weights: str) -> Callable:
    def build(model: nn.Module, batches, s: Settings) -> nn.Module:
        import peft

        config = peft.LoraConfig(r=s.r, lora_alpha=s.alpha, target_modules=TARGETS, init_lora_weights=init_lora_weights)
        return peft.get_peft_model(model, config)

    return build


def peft_eva(**eva_config) -> Callable:
    def build(model: nn.Module, batches, s: Settings) -> nn.Module:
        import peft
        from peft.tuners.lora.eva import initialize_lora_eva_weights

        config = peft.LoraConfig(r=s.r, lora_alpha=s.alpha, target_modules=TARGETS, init_lora_weights="eva",
                                 eva_config=peft.EvaConfig(**{"tau": s.eva_tau, **eva_config}))
        peft_model = peft.get_peft_model(model, config, low_cpu_mem_usage=True)
        initialize_lora_eva_weights(peft_model, dataloader=batches, show_progress_bar=False)
        return peft_model

    return build


def peft_lora_ga(model: nn.Module, batches, s: Settings) -> nn.Module:
    import peft

    config = peft.LoraConfig(r=s.r, lora_alpha=s.alpha, target_modules=TARGETS, init_lora_weights="lora_ga",
                             lora_ga_config=peft.LoraGAConfig())

    def train_step():
        for batch in batches:
            model(**batch).loss.backward()

    peft.preprocess_loraga(model, config, train_step)
    return peft.get_peft_model(model, config)


# --- factors of both frameworks ----------------------------------------------------------------
@dataclass
class Factors:
    W: torch.Tensor  # the layer's (possibly rewritten) base weight, (out, in), float64
    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    s: float


def factors(model: nn.Module, framework: str, paths: list[str]) -> dict[str, Factors | None]:
    """path -> the adapter's factors at that layer (None where the initialiser removed the adapter)."""
    out: dict[str, Factors | None] = {}
    if framework == "lorakit":
        from lorakit.core.inject import adapted_layers

        layers = dict(adapted_layers(model))
        for path in paths:
            layer = layers.get(path)
            adapter = layer.adapters["default"] if layer is not None and "default" in layer.adapters else None
            out[path] = None if adapter is None else Factors(
                layer.weight_out_in().detach().double(), adapter.lora_A.weight.detach().double(),
                adapter.lora_B.weight.detach().double(), float(adapter.scaling))
        return out
    modules = dict(model.named_modules())
    for path in paths:
        module = modules.get("base_model.model." + path)
        if module is None or not hasattr(module, "lora_A") or "default" not in module.lora_A:
            out[path] = None
            continue
        out[path] = Factors(module.base_layer.weight.detach().double(), module.lora_A["default"].weight.detach().double(),
                            module.lora_B["default"].weight.detach().double(), float(module.scaling["default"]))
    return out


def sample_paths(model: nn.Module) -> list[str]:
    blocks = model.model.layers
    chosen = sorted({0, len(blocks) // 2, len(blocks) - 1})
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.split(".")[-1] in TARGETS
            and any(name.startswith(f"model.layers.{i}.") for i in chosen)]


def _reconstruction(f: Factors, W0: torch.Tensor) -> float:
    return float((f.W + f.s * f.B @ f.A - W0).abs().max() / W0.abs().max())


def _row_basis(M: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (k, n) of M's row space."""
    Q, _ = torch.linalg.qr(M.T)
    return Q.T


def _subspace_agreement(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the row spaces of X and Y (1 = equal)."""
    P, Q = _row_basis(X), _row_basis(Y)
    cosines = torch.linalg.svdvals(P @ Q.T)
    return float((cosines**2).sum() / max(P.shape[0], Q.shape[0]))


def pissa_quality(originals, model, framework, batches, covariances) -> dict[str, float]:
    recon, principal = [], []
    for path, f in factors(model, framework, list(originals)).items():
        W0 = originals[path]
        recon.append(_reconstruction(f, W0))
        U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
        r = f.A.shape[0]
        best = (U[:, :r] * S[:r]) @ Vh[:r]
        principal.append(float(torch.linalg.norm(f.s * f.B @ f.A - best) / torch.linalg.norm(best)))
    return {"max |W_res + sBA - W| / max|W|": max(recon), "max ||sBA - W_r||_F / ||W_r||_F": max(principal)}


def eva_quality(originals, model, framework, batches, covariances) -> dict[str, float]:
    shares, b_max, w_change, removed = [], 0.0, 0.0, 0
    for path, f in factors(model, framework, list(originals)).items():
        if f is None:
            removed += 1
            continue
        C = covariances[path]
        P = _row_basis(f.A)
        k = P.shape[0]
        best = torch.linalg.eigvalsh(C).flip(0)[:k].sum()
        shares.append(float(torch.trace(P @ C @ P.T) / best))
        b_max = max(b_max, float(f.B.abs().max()))
        w_change = max(w_change, float((f.W - originals[path]).abs().max()))
    return {"mean explained-variance share of the best": statistics.fmean(shares) if shares else float("nan"),
            "min share": min(shares) if shares else float("nan"), "max |B|": b_max, "max |W - W0|": w_change,
            "layers removed (rank 0)": removed}


def lora_ga_quality(originals, model, framework, batches, covariances) -> dict[str, float]:
    recon = [_reconstruction(f, originals[p]) for p, f in factors(model, framework, list(originals)).items()]
    return {"max |W_res + sBA - W| / max|W|": max(recon)}


def lora_ga_agreement(originals, models) -> dict[str, float]:
    mine = factors(models["lorakit"], "lorakit", list(originals))
    theirs = factors(models["peft"], "peft", list(originals))
    a = [_subspace_agreement(mine[p].A, theirs[p].A) for p in originals]
    b = [_subspace_agreement(mine[p].B.T, theirs[p].B.T) for p in originals]
    return {"A row-space agreement lorakit vs PEFT (mean cos^2)": statistics.fmean(a),
            "B column-space agreement (mean cos^2)": statistics.fmean(b)}


@dataclass(frozen=True)
class InitMethod:
    key: str
    label: str
    init: str  # lorakit's init name (the registry says whether it has landed)
    lorakit: Callable
    peft: Callable
    quality: Callable  # (originals, model, framework, batches, covariances) -> {check: value}
    agreement: Callable | None = None  # (originals, {framework: model}) -> {check: value}
    needs_data: bool = False


METHODS: list[InitMethod] = [
    InitMethod("pissa", "PiSSA (exact SVD)", "pissa", lorakit_init("pissa"), peft_pissa("pissa"), pissa_quality),
    InitMethod("pissa_niter_4", "PiSSA (randomized SVD, 4 iterations)", "pissa", lorakit_init("pissa", pissa_niter_k=4),
               peft_pissa("pissa_niter_4"), pissa_quality),
    InitMethod("eva", "EVA", "eva", lorakit_init("eva"), peft_eva(), eva_quality, needs_data=True),
    InitMethod("lora-ga", "LoRA-GA", "lora-ga", lorakit_init("lora-ga"), peft_lora_ga, lora_ga_quality,
               lora_ga_agreement, needs_data=True),
]


def available(method: InitMethod) -> bool:
    from lorakit.core import registry

    return bool(registry.data_initialiser(method.init) or registry.weight_initialiser(method.init))


# --- measurement -------------------------------------------------------------------------------
@dataclass
class Result:
    method: InitMethod
    times: dict[str, list[float]] = field(default_factory=lambda: {"lorakit": [], "peft": []})
    quality: dict[str, dict[str, float]] = field(default_factory=dict)
    agreement: dict[str, float] = field(default_factory=dict)

    def median(self, framework: str) -> float:
        return statistics.median(self.times[framework])

    @property
    def ratio(self) -> float:
        return self.median("lorakit") / self.median("peft")


@torch.no_grad()
def input_covariances(model: nn.Module, paths: list[str], batches) -> dict[str, torch.Tensor]:
    """Centred covariance of each layer's inputs over the batches' answer tokens (labels != -100)."""
    sums: dict[str, list] = {}
    handles, mask_box = [], {}

    def hook(path):
        def fn(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).double()[mask_box["mask"]]
            s = sums.setdefault(path, [0, torch.zeros(x.shape[1], dtype=torch.float64),
                                       torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)])
            s[0] += x.shape[0]
            s[1] += x.sum(0)
            s[2] += x.T @ x
        return fn

    modules = dict(model.named_modules())
    handles = [modules[p].register_forward_hook(hook(p)) for p in paths]
    try:
        for batch in batches:
            mask_box["mask"] = ((batch["labels"] != -100) & (batch["attention_mask"] == 1)).reshape(-1)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    out = {}
    for path, (n, total, outer) in sums.items():
        mean = total / n
        out[path] = (outer - n * torch.outer(mean, mean)) / max(n - 1, 1)
    return out


def measure(base: nn.Module, batches, methods: list[InitMethod], settings: Settings,
            log: Callable[[str], None] = lambda line: None) -> list[Result]:
    paths = sample_paths(base)
    modules = dict(base.named_modules())
    originals = {p: modules[p].weight.detach().double().clone() for p in paths}
    covariances = input_covariances(base, paths, batches) if any(m.needs_data for m in methods) else {}
    results = []
    for method in methods:
        result = Result(method)
        models = {}
        for round_index in range(settings.rounds):
            order = ("lorakit", "peft") if round_index % 2 == 0 else ("peft", "lorakit")
            for framework in order:
                model = copy.deepcopy(base)
                build = method.lorakit if framework == "lorakit" else method.peft
                if settings.device != "cpu":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                models[framework] = build(model, batches if method.needs_data else None, settings)
                if settings.device != "cpu":
                    torch.cuda.synchronize()
                result.times[framework].append(time.perf_counter() - started)
                log(f"  {method.label} {framework}: {result.times[framework][-1]:.2f} s")
        for framework, model in models.items():
            result.quality[framework] = method.quality(originals, model, framework, batches, covariances)
        if method.agreement is not None:
            result.agreement = method.agreement(originals, models)
        models.clear()
        results.append(result)
    return results


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def format_markdown(results: list[Result], settings: Settings, env: dict[str, str], command: str,
                    missing: list[str], n_layers: int, skipped: list[str] = ()) -> str:
    s = settings
    lines = [
        *step_bench.results_head(
            "# Initialisation time: lorakit against PEFT (target: lorakit / PEFT <= 0.5 at equal quality)", command),
        f"Default model, LoRA r={s.r}, alpha={s.alpha:g} on q,k,v,o,gate,up,down of every block; median of "
        f"{s.rounds} round(s), frameworks alternating. Data-driven inits get {s.batches} GSM8K train batches of "
        f"{s.batch_size} (max length {s.max_length}); EVA tau {s.eva_tau:g} in both. Quality on {n_layers} layers "
        "(first, middle and last block).",
        "",
        *[f"- {key}: {value}" for key, value in env.items()],
        "",
        "| initialiser | lorakit (s) | PEFT (s) | lorakit / PEFT | ≤ 0.5? |",
        "|---|---:|---:|---:|---|",
        *[f"| {r.method.label} | {r.median('lorakit'):.2f} | {r.median('peft'):.2f} | {r.ratio:.3f} | "
          f"{'yes' if r.ratio <= 0.5 else 'no'} |" for r in results],
        "",
        "Quality (each spec's check, on both frameworks' results):",
        "",
    ]
    for r in results:
        lines.append(f"- {r.method.label}:")
        for framework, checks in r.quality.items():
            lines.append(f"  - {framework}: " + "; ".join(f"{k} = {_fmt(v)}" for k, v in checks.items()))
        if r.agreement:
            lines.append("  - " + "; ".join(f"{k} = {_fmt(v)}" for k, v in r.agreement.items()))
    if missing:
        lines += ["", "Not measured (not in lorakit yet): " + ", ".join(missing) + "."]
    if skipped:
        lines += ["", "Not measured in the quick form: " + "; ".join(skipped) + "."]
    return "\n".join(lines + [""])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=convergence.DEFAULT_DATA, help="GSM8K folder")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--only", default=None, help="comma-separated keys: " + ", ".join(m.key for m in METHODS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--eva-tau", type=float, default=None,
                        help="EVA's convergence threshold for both frameworks [0.99]; the quick run's 2 tiny batches "
                             "may never reach 0.99")
    parser.add_argument("--quick", action="store_true", help="reduced run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--out", type=Path, default=None, help="markdown (default bench/results/init_time_<device>[_quick].md)")
    return parser.parse_args(argv)


def select(only: str | None, quick: bool = False) -> tuple[list[InitMethod], list[str]]:
    chosen = [m for m in METHODS if not (quick and m.key in NOT_QUICK)]
    if only:
        keys = [k.strip() for k in only.split(",") if k.strip()]
        unknown = set(keys) - {m.key for m in METHODS}
        if unknown:
            raise SystemExit(f"--only names unknown initialisers {sorted(unknown)}; known: {[m.key for m in METHODS]}")
        chosen = [m for m in METHODS if m.key in keys]
    return [m for m in chosen if available(m)], [m.label for m in chosen if not available(m)]


def gsm8k_batches(folder: Path, tokenizer, settings: Settings, device: str) -> list[dict[str, torch.Tensor]]:
    conv = convergence.Settings(steps=settings.batches, batch_size=settings.batch_size, max_length=settings.max_length,
                                seeds=(0,), eval_examples=1)
    data = convergence.load_data(folder, tokenizer, conv)
    return [{k: v.to(device) for k, v in b.items()} for b in convergence.batches_for_seed(data, tokenizer, conv, 0)]


def main(argv: list[str] | None = None) -> list[Result]:
    import lorakit.models

    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    chosen = dict(QUICK) if args.quick else {}
    if args.rounds is not None:
        chosen["rounds"] = args.rounds
    if args.eva_tau is not None:
        chosen["eva_tau"] = args.eva_tau
    settings = Settings(device=device, **chosen)
    methods, missing = select(args.only, args.quick)
    skipped = [f"{m.label} ({NOT_QUICK[m.key]})" for m in METHODS if args.quick and not args.only and m.key in NOT_QUICK]
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "bench/init_time.py", *given])
    env = step_bench.environment(step_bench.Settings(device=device))
    print("initialisation time, lorakit vs PEFT")
    for key, value in env.items():
        print(f"  {key}: {value}")
    if missing:
        print("  not in lorakit yet: " + ", ".join(missing))
    for line in skipped:
        print(f"  not in --quick: {line}")
    base, tokenizer = lorakit.models.load()
    base = base.to(device)
    batches = gsm8k_batches(args.data, tokenizer, settings, device)
    results = measure(base, batches, methods, settings, log=lambda line: print(line, flush=True))
    text = format_markdown(results, settings, env, command, missing, len(sample_paths(base)), skipped)
    out = args.out or REPO_ROOT / "bench" / "results" / f"init_time_{torch.device(device).type}{'_quick' if args.quick else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print()
    print(text)
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
