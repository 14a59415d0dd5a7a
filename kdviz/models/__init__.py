"""Models: load them (zoo names, folders, .gguf files, hub ids), fingerprint them, run their forward passes."""

from kdviz.models.devices import default_device, default_dtype, resolve_device
from kdviz.models.hashing import fingerprint, tokenizer_fingerprint
from kdviz.models.forward import final_hidden, head_is_linear, last_hidden, model_logits, output_head, position_ids
from kdviz.models.sources import context_length, load_model, load_tokenizer, model_context

__all__ = ["context_length", "default_device", "default_dtype", "final_hidden", "fingerprint", "head_is_linear",
           "last_hidden", "load_model", "load_tokenizer", "model_context", "model_logits", "output_head",
           "position_ids", "resolve_device", "tokenizer_fingerprint"]
