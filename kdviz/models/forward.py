"""Forward passes kdviz needs: final hidden states, logits, the LM head, whether the head is plain linear."""

from __future__ import annotations

import torch
from torch import Tensor

from kdviz.distributed import gathered


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted from each row's first real token, so left and right padding agree."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def final_hidden(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The hidden states the LM head reads [B, T, H], through the (possibly wrapped) model's own forward."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1]


def last_hidden(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Like `final_hidden` but through the base model only (no per-layer states kept); for inference."""
    base = model.base_model
    if base is not model:
        out = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
        if getattr(out, "last_hidden_state", None) is not None:
            return out.last_hidden_state
    return final_hidden(model, input_ids, attention_mask)


def model_logits(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The model's own logits [B, T, V] (whatever its head does)."""
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)).logits


def output_head(model, vocab: int) -> tuple[Tensor, Tensor | None]:
    """The LM head's weight [V, H] and bias [V] (or None), cut to the shared vocabulary.

    A head sharded by FSDP2 is gathered whole first (its gradient averaged back onto the
    shards): cutting the sharded tensor would leave the gradient in another layout.
    """
    head = model.get_output_embeddings()
    weight, bias = gathered(head.weight), gathered(getattr(head, "bias", None))
    return weight[:vocab], None if bias is None else bias[:vocab]


def head_is_linear(model, input_ids: Tensor, hidden=final_hidden) -> bool:
    """Whether logits == output_embeddings(hidden(...)) (no soft-capping or scaling)."""
    mask, was_training = torch.ones_like(input_ids), model.training
    model.eval()  # no dropout between the two passes
    with torch.no_grad():
        states = hidden(model, input_ids, mask)
        logits = model_logits(model, input_ids, mask)
    model.train(was_training)
    return torch.allclose(model.get_output_embeddings()(states).float(), logits.float(), rtol=1e-3, atol=1e-3)
