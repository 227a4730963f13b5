#!/usr/bin/env bash
# One short check of lorakit on a lent CUDA GPU, in bf16: the train-step benchmark (lorakit vs
# PEFT, float32 and bfloat16) and the serving benchmark (lorakit engine vs PEFT mixed batches vs
# the no-adapter ceiling) on a random-init copy of the default model's architecture
# (bench/configs/smollm2-135m-instruct: the embedded GGUF stays behind), printing the ratios.
# Meant to finish in < 8 minutes on an H200; every step has its own time limit.
#
#   bash bench/gpu_check.sh --prepare    # HERE, once (no GPU needed): gather into .gpu_check/ what the
#                                        # device machine lacks: tokenizer files, GSM8K prompts, the
#                                        # google-re2 wheel (its image has torch, transformers, peft)
#   bash bench/gpu_check.sh              # ON THE DEVICE MACHINE, carrying .gpu_check:
#                                        #   run(command="bash bench/gpu_check.sh", carry=[".gpu_check"], timeout_s=540)
#                                        # results come back as $OUT/*.md (train_step_cuda_*.md, serve_cuda_bf16.md)
#   bash bench/gpu_check.sh --cpu-smoke  # HERE: the same commands on the CPU, seconds-long, to check they run
#
# Nothing in lorakit depends on a GPU; this script only measures where one is lent.
set -uo pipefail
cd "$(dirname "$0")/.."
PREP=.gpu_check
MODE=${1:-gpu}

if [[ "$MODE" == "--prepare" ]]; then
    PY=${PYTHON:-.venv/bin/python}
    rm -rf "$PREP" && mkdir -p "$PREP/model" "$PREP/gsm8k" "$PREP/wheels" || exit 1
    cp bench/configs/smollm2-135m-instruct/config.json "$PREP/model/" || exit 1
    # The default model's tokenizer (converted once from the embedded GGUF; a few MB).
    HF_HUB_OFFLINE=1 "$PY" - "$PREP/model" <<'PYEOF' || exit 1
import shutil, sys
from pathlib import Path
import lorakit.models
folder = lorakit.models.default_model_folder()
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
    if (folder / name).is_file():
        shutil.copy(folder / name, Path(sys.argv[1]) / name)
PYEOF
    cp ../shared/data/gsm8k/test.jsonl "$PREP/gsm8k/" || { echo "gpu_check: ../shared/data/gsm8k/test.jsonl is missing" >&2; exit 1; }
    # lorakit imports re2 (google-re2), which the device image lacks: its wheel for Python 3.12.
    RE2=$("$PY" -c "import importlib.metadata as m; print(m.version('google-re2'))")
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$PREP/wheels" "google-re2==$RE2" || exit 1
    grep -qxF ".gpu_check/" .gitignore 2>/dev/null || echo "note: add .gpu_check/ to .gitignore so that only carry sends it" >&2
    du -sh "$PREP"
    echo "prepared $PREP; now: run(command=\"bash bench/gpu_check.sh\", carry=[\".gpu_check\"], timeout_s=540)"
    exit 0
fi

[[ -f "$PREP/model/config.json" && -f "$PREP/model/tokenizer.json" && -f "$PREP/gsm8k/test.jsonl" ]] || {
    echo "gpu_check: $PREP/ is incomplete; run 'bash bench/gpu_check.sh --prepare' first (on a machine with the venv)" >&2
    exit 1
}
if [[ "$MODE" == "--cpu-smoke" ]]; then
    PY=${PYTHON:-.venv/bin/python}
    OUT=$(mktemp -d)
    DEVICE=cpu
    TRAIN_ARGS=(--quick)
    SERVE_ARGS=(--quick --adapters 2 --requests 4 --output-len 4,6 --prompt-len 8,16 --registered 0
                --systems lorakit,peft-mixed,base-engine)
    LIMIT_TRAIN=300 LIMIT_SERVE=300
elif [[ "$MODE" == "gpu" ]]; then
    PY=${PYTHON:-python3}
    OUT=${OUT:-$(mktemp -d)}
    DEVICE=cuda
    TRAIN_ARGS=()  # CUDA defaults of bench/train_step.py: 5 warm-up steps, 25 rounds x 2 steps, batch 8 x 128
    # 8 / 64 / 100 adapters (S-LoRA's claim is at 100), 64 requests each, 8-16 generated tokens. Left
    # out: PEFT one-at-a-time and merge-swap (batch 1, minutes on their own) and the 1,000-adapter
    # check. Loading 100 adapters into PEFT dominates (75 s for 64 on the 2-core CPU machine).
    SERVE_ARGS=(--quick --adapters 8,64,100 --requests 64 --registered 0 --rate 200
                --systems lorakit,peft-mixed,base-engine,base-hf)
    LIMIT_TRAIN=120 LIMIT_SERVE=330
    if ! "$PY" -c "import re2" 2>/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu_check_site \
            "$PREP"/wheels/*.whl || exit 1
        export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
    fi
else
    echo "usage: bash bench/gpu_check.sh [--prepare | --cpu-smoke]" >&2
    exit 2
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
MODEL="$PREP/model"
started=$SECONDS

echo "== machine"
"$PY" - "$DEVICE" <<'PYEOF' || exit 1
import sys, torch, transformers, peft
from lorakit.core import precision
device = sys.argv[1]
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, peft {peft.__version__}")
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device")
print("bf16:", precision.bf16_support(device))
for name, dtype in precision.DTYPES.items():
    print(f"matmul 256x576 @ 576x1536 {name}: {precision.matmul_gflops(dtype, device):.0f} GFLOP/s;",
          f"8192^3: {precision.matmul_gflops(dtype, device, (8192, 8192, 8192), 1.0):.0f} GFLOP/s" if device == "cuda" else "")
PYEOF

status=0
for dtype in bfloat16 float32; do
    echo "== train step, $dtype ($((SECONDS - started)) s so far)"
    timeout "$LIMIT_TRAIN" "$PY" bench/train_step.py --device "$DEVICE" --dtype "$dtype" --random-init-from "$MODEL" \
        "${TRAIN_ARGS[@]}" --out "$OUT/train_step_${DEVICE}_${dtype}.md" > "$OUT/train_step_${dtype}.log" 2>&1
    rc=$?; [[ $rc == 0 ]] || { echo "train_step $dtype failed (exit $rc):"; tail -20 "$OUT/train_step_${dtype}.log"; status=1; }
    grep -E "^  (lorakit|peft) |time ratio|memory ratio|dtypes lorakit|matmul peak|WARNING" "$OUT/train_step_${dtype}.log"
done

echo "== serving, bfloat16 ($((SECONDS - started)) s so far)"
timeout "$LIMIT_SERVE" "$PY" bench/serve.py --device "$DEVICE" --dtype bfloat16 --random-init-from "$MODEL" \
    --gsm8k "$PREP/gsm8k" "${SERVE_ARGS[@]}" --out "$OUT/serve_${DEVICE}_bf16.md" > "$OUT/serve_bf16.log" 2>&1
rc=$?; [[ $rc == 0 ]] || { echo "serve failed (exit $rc):"; tail -20 "$OUT/serve_bf16.log"; status=1; }
sed -n '/^system /,$p' "$OUT/serve_bf16.log"

echo "== summary ($((SECONDS - started)) s in all)"
"$PY" - "$OUT" "$DEVICE" <<'PYEOF'
import re, sys
from pathlib import Path
out, device = Path(sys.argv[1]), sys.argv[2]
median = {}
for dtype in ("float32", "bfloat16"):
    path = out / f"train_step_{device}_{dtype}.md"
    if path.exists():
        for row in re.findall(r"^\| (lorakit|peft) \| ([\d.]+) \|", path.read_text(), re.M):
            median[(row[0], dtype)] = float(row[1])
for name in ("lorakit", "peft"):
    if (name, "float32") in median and (name, "bfloat16") in median:
        print(f"train step {name}: fp32 {median[name, 'float32']:.1f} ms, bf16 {median[name, 'bfloat16']:.1f} ms, "
              f"bf16/fp32 {median[name, 'bfloat16'] / median[name, 'float32']:.3f}")
for dtype in ("float32", "bfloat16"):
    if ("lorakit", dtype) in median and ("peft", dtype) in median:
        print(f"train step {dtype}: lorakit/peft {median['lorakit', dtype] / median['peft', dtype]:.3f}")
serve = out / f"serve_{device}_bf16.md"
if serve.exists():
    for line in serve.read_text().splitlines():
        if line.startswith(("| lorakit engine |", "| PEFT mixed", "| no adapters, lorakit")) or "(target" in line:
            print("serve:", line)
print(f"results: {out}")
PYEOF
ls "$OUT"
exit $status
