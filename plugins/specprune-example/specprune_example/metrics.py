"""A metric for ``specprune evaluate --metric``: next-token error rate of a causal LM.

A metric is a callable ``fn(model, batch, device) -> (sum, count)`` over one batch (already moved
to ``device``, the evaluation device); specprune sums both over the data and reports the mean,
sum/count, and the relative delta (mean − reference mean)/reference mean. Here the sum counts the
positions whose
arg-max prediction is not the next token, over positions the attention mask keeps (both the
position and its successor), so the mean is the top-1 error rate and its delta the relative increase.

Registered as ``next-token-error`` (entry-point group ``specprune.metrics``):
``specprune evaluate MODEL --data D --metric next-token-error``; without installing the package,
``--metric specprune_example.metrics:next_token_error`` names the same function.
"""

from __future__ import annotations

import torch
from torch import nn

from specprune.errors import InputError


def next_token_error(model: nn.Module, batch: dict[str, torch.Tensor] | torch.Tensor,
                     device: torch.device | str | None = None) -> tuple[float, int]:
    """(mispredicted next tokens, counted positions) of ``model`` on one batch of token ids.
    ``device``: where the batch is (specprune moves it there first; unused here)."""
    from specprune.evaluation import output_tensor

    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    ids = batch.get("input_ids")
    if ids is None:
        raise InputError("next-token-error needs token data (input_ids)")
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    with torch.inference_mode():
        logits = output_tensor(model(input_ids=ids, attention_mask=mask.long()))
    pred = logits[:, :-1].argmax(dim=-1)
    counted = mask[:, 1:] & mask[:, :-1]
    wrong = (pred != ids[:, 1:]) & counted
    return float(wrong.sum()), int(counted.sum())
