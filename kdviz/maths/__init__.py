"""The maths of kdviz, as pure functions on tensors: the per-token decomposition of the KL, the KD
objectives, the hard/easy split, the top-k (cached) teacher, and the chunked paths that keep memory
O(chunk x V). Trainers, the CLI and widgets only call these."""
