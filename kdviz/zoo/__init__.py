"""The model zoo: small models shipped with kdviz, and one real pretrained model it can fetch.

`zoo:student` and three teachers (`zoo:teacher-s`, `-m`, `-l`) are GPT-2 models kdviz trained on
the standard library's source with one byte-level BPE tokenizer (8,192 tokens);
`zoo:smollm2-student` is a small Llama kdviz trained with SmolLM2's tokenizer; `zoo:smollm2-135m`
(SmolLM2-135M-Instruct) is fetched with `kdviz zoo fetch`. This package's top level only finds
them (`kdviz.zoo.registry`); `kdviz.zoo.ladder` and `kdviz.zoo.smollm2` rebuild them and
`kdviz.zoo.fetching` fetches.
"""

from kdviz.zoo.registry import (FETCHABLE, PREFIX, fetched_dir, load, load_tokenizer, manifest, model_dir, names,
                                tokenizer_folder, zoo_dir)

__all__ = ["FETCHABLE", "PREFIX", "fetched_dir", "load", "load_tokenizer", "manifest", "model_dir", "names",
           "tokenizer_folder", "zoo_dir"]
