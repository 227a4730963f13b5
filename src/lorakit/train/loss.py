"""The causal-LM loss of a training step, fused with the output head so the full logits never exist.

transformers computes a causal LM's loss as ``cross_entropy(lm_head(h).float(), labels)``: for the
default model (49,152-token vocabulary, batch 8 x 128) that materialises 50M logits in the compute
dtype, again in float32, their log-softmax, its gradient and a zero-filled buffer for it -- about a
quarter of a bf16 step on a CPU, spent moving memory. `causal_lm_loss` gives the same value
(sum of per-token cross-entropy over the tokens whose shifted label is not -100, divided by their
count or by `num_items_in_batch`) from the final hidden states, in chunks of rows:

    logits_c = h_c W^T                       (compute dtype, like lm_head)
    loss    += sum_c [logsumexp(logits_c) - logits_c[y]]       (float32)
    dL/dh_c  = (softmax(logits_c) - onehot(y)) W / denominator  (computed now, kept for backward)

so each chunk's logits live only while that chunk is processed, the loss is float32 as in
transformers, and rows whose label is ignored (prompt tokens under response-only training) are
dropped before the head. The gradient for h is formed in the forward pass, which is the one
moment the softmax exists; it costs the same head product backward would (the head is frozen,
so there is no weight gradient). The approach is that of Liger Kernel's fused linear
cross-entropy (Hsu et al., arXiv 2410.10989), in plain torch.

Where the fused form would not be exact it is not used (`fused_loss_supported`): a head that
trains or carries an adapter, a bias, logit scaling or soft-capping (only plain decoder families
are admitted), or a model wrapped for distributed training (DDP synchronises gradients through
the wrapper's own forward).
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.data import IGNORE_INDEX

# Model families whose forward computes logits as lm_head(final hidden states), unscaled and uncapped.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3"})
# Rows per chunk: 256 x 49,152 float32 logits are 48 MiB, large enough for an efficient product.
CHUNK_ROWS = 256


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (lorakit adapts the model in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def fused_loss_supported(model: nn.Module) -> bool:
    """Whether `causal_lm_loss` gives `model`'s own loss: a plain decoder family whose head is a
    frozen, bias-free `nn.Linear` and which is not wrapped for distributed training."""
    model = _causal_lm(model)
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES or not hasattr(model, "get_decoder"):
        return False
    if any(getattr(config, name, None) not in (None, 1.0) for name in ("final_logit_softcapping", "logit_scale",
                                                                        "logits_scaling")):
        return False
    head = model.get_output_embeddings()
    return type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad


class _HeadCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(h W^T, y) / denominator, with dL/dh formed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, denominator: float,
                chunk: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)
        h_all = hidden.to(weight.dtype)
        for start in range(0, hidden.shape[0], chunk):
            h, y = h_all[start:start + chunk], labels[start:start + chunk]
            logits = (h @ weight.T).float()  # the head in the compute dtype, the loss in float32
            rows = torch.arange(y.shape[0], device=y.device)
            target = logits[rows, y]
            peak = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(peak).exp_()  # in place: one pass each, where logsumexp takes several
            norm = probs.sum(dim=-1, keepdim=True)
            total += (peak.squeeze(1) + norm.log().squeeze(1) - target).sum()  # logsumexp - target logit
            probs.div_(norm.mul_(denominator))  # softmax / denominator
            probs[rows, y] -= 1.0 / denominator
            grad[start:start + chunk] = (probs.to(weight.dtype) @ weight).to(grad.dtype)
        ctx.save_for_backward(grad)
        return total / denominator

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None


def causal_lm_loss(model: nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: int | torch.Tensor | None = None,
                   chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """transformers' causal-LM training loss of `model` on `inputs` (model inputs with `labels`),
    without materialising the logits; call only where `fused_loss_supported(model)`.

    The value equals ``model(**inputs).loss`` (mean next-token cross-entropy over labels that
    are not -100, or their sum / `num_items_in_batch` when that is given, as Trainer does under
    gradient accumulation), in float32, up to the rounding of a different summation order.
    """
    causal = _causal_lm(model)
    labels = inputs["labels"]
    model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
    hidden = causal.get_decoder()(**model_inputs, use_cache=False).last_hidden_state
    shifted = labels[:, 1:].reshape(-1)
    keep = (shifted != IGNORE_INDEX).nonzero().squeeze(1)
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, keep)
    if num_items_in_batch is None:
        denominator = float(max(keep.numel(), 1))
    else:
        denominator = float(num_items_in_batch.item() if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
    weight = causal.get_output_embeddings().weight
    return _HeadCrossEntropy.apply(rows, weight, shifted.index_select(0, keep), denominator, chunk)
