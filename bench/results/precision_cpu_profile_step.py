"""Where a training step's time goes: one profiled step of the default model (LoRA r=16 all-linear,
batch 8x128, AdamW), self CPU time grouped into categories."""
import os, sys, time, torch
sys.path.insert(0, "bench")
import train_step as tsb
from lorakit.core import precision
from torch.profiler import profile, ProfilerActivity
dtype_name, loss_kind = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "fused"
dtype = precision.DTYPES[dtype_name]
base = tsb.default_model_factory(); precision.prepare_model(base, dtype)
model = tsb.with_lorakit(base, tsb.Settings()); model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(0, 49152, (8, 128), generator=torch.Generator().manual_seed(0)); batch = {"input_ids": ids, "labels": ids}
for _ in range(3): tsb.train_step(model, opt, batch, dtype, loss_kind)
times = []
for _ in range(3):
    t = time.perf_counter(); tsb.train_step(model, opt, batch, dtype, loss_kind); times.append(time.perf_counter() - t)
with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
    tsb.train_step(model, opt, batch, dtype, loss_kind)
cats = {}
def cat(e):
    n, shapes = e.key, str(e.input_shapes)
    if "49152" in shapes: return "head + loss (49k vocab)"
    if "scaled_dot_product" in n or "softmax" in n: return "attention"
    if n in ("aten::mm", "aten::addmm", "aten::bmm"): return "other matmuls (projections, LoRA)"
    if n in ("aten::copy_", "aten::_to_copy", "aten::to"): return "casts / copies"
    if n.startswith("Optimizer") or n in ("aten::_foreach_add_", "aten::addcdiv_", "aten::sqrt", "aten::lerp_", "aten::_foreach_mul_") : return "optimizer"
    if n.startswith("aten::") and any(k in n for k in ("mul", "add", "sub", "silu", "pow", "rsqrt", "mean", "neg", "cat", "div", "exp", "sum", "fill", "zero", "embedding", "cos", "sin", "clone")): return "elementwise"
    return "other (dispatch, views, autograd bookkeeping)"
for e in prof.key_averages(group_by_input_shape=True):
    cats[cat(e)] = cats.get(cat(e), 0) + e.self_cpu_time_total
total = sum(cats.values())
print(f"{dtype_name} loss={loss_kind}: steps {[round(t, 3) for t in times]} s, load {os.getloadavg()[0]:.2f}; profiled step self CPU time {total/1e6:.2f} s (both threads' ops, main thread view)")
for k, v in sorted(cats.items(), key=lambda kv: -kv[1]):
    print(f"| {k} | {v/1e6:.3f} s | {100*v/total:.1f}% |")
