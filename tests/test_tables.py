"""Every way kdviz makes a token table, held against the float64 reference computed from the full logits.

Live (fused from hidden states, or from the models' own logits), from a teacher cache whose k covers
the vocabulary, at temperature 1 and 2: the same numbers on every row, to float rounding.
"""

import pytest
import torch

from kdviz import analyze, load_pair
from kdviz.cache import build
from kdviz.data import IGNORE_INDEX, load_data
from kdviz.maths.decomposition import SCALAR_FIELDS
from reference import reference_stats

RECORDS = [{"instruction": f"Say {i}", "input": "", "output": "the student learns " * (1 + i % 3)} for i in range(6)]


@pytest.fixture(scope="module")
def data(pair):
    return load_data(RECORDS, pair.tokenizer, max_length=64)


@pytest.fixture(scope="module")
def references(pair, data):
    """{temperature: {(doc_id, position): float64 stats}} from one example per forward pass, no padding."""
    out = {}
    for temperature in (1.0, 2.0):
        rows = {}
        for doc, example in enumerate(data):
            ids = torch.tensor([example.input_ids])
            teacher, student = pair.logits(ids, torch.ones_like(ids))
            stats = reference_stats(teacher[:, :-1], student[:, :-1], ids[:, 1:], temperature)
            for position in range(1, len(example.input_ids)):
                rows[(doc, position)] = {name: float(value[0, position - 1]) for name, value in stats.items()}
        out[temperature] = rows
    return out


def live_fused(pair, data, tmp_path, temperature):
    return analyze(pair, data, temperature=temperature, cache=False, progress=False)


def live_logits(pair, data, tmp_path, temperature):
    fallback = load_pair(pair.teacher_name, pair.student_name, device="cpu")
    fallback.__dict__["linear_heads"] = False  # as for soft-capped heads: the models' own logits
    return analyze(fallback, data, temperature=temperature, cache=False, progress=False)


def cached_full_vocabulary(pair, data, tmp_path, temperature):
    folder = tmp_path / f"cache-{temperature}"
    build(pair.teacher, pair.tokenizer, data, folder, top_k=len(pair.tokenizer), temperature=temperature, encoding="exact",
          teacher_name="tiny", max_length=64, progress=False)
    cached = load_pair(None, pair.student_name, teacher_cache=folder, device="cpu")
    return analyze(cached, data, temperature=temperature, cache=False, progress=False)


WAYS = {"live, fused": live_fused, "live, logits": live_logits, "cache, k = V": cached_full_vocabulary}


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("way", list(WAYS))
def test_every_way_of_making_a_table_gives_the_reference_numbers(pair, data, references, tmp_path, way, temperature):
    table = WAYS[way](pair, data, tmp_path, temperature).df
    reference = references[temperature]
    if way.startswith("cache"):  # a cache holds the target tokens only
        assert table.height == sum(label != IGNORE_INDEX for ex in data for label in ex.labels[1:])
    else:
        assert table.height == len(reference)
    for name in SCALAR_FIELDS:
        ours = torch.tensor(table[name].to_list(), dtype=torch.float64)
        theirs = torch.tensor([reference[(d, p)][name] for d, p in zip(table["doc_id"], table["position"])],
                              dtype=torch.float64)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=2e-5, msg=lambda m: f"{way}, {name}: {m}")
