import json

import polars as pl
import pytest
import torch

from conftest import TEXTS
from kdviz import TokenTable, analyze
from kdviz.maths.decomposition import SCALAR_FIELDS

RECORDS = [
    {"prompt": f"Q{i}:\n", "response": TEXTS[i % len(TEXTS)]} for i in range(7)
]


@pytest.fixture(scope="module")
def table(pair):
    return analyze(pair, RECORDS, batch_size=3, cache=False, progress=False)


def test_one_row_per_predicted_token(table, pair):
    lengths = [len(pair.tokenizer(r["prompt"])["input_ids"]) + len(pair.tokenizer(r["response"])["input_ids"]) + 1
               for r in RECORDS]
    assert table.df.height == sum(n - 1 for n in lengths)
    assert table.df["is_response"].sum() == sum(len(pair.tokenizer(r["response"])["input_ids"]) + 1 for r in RECORDS)
    first = table.df.filter(pl.col("doc_id") == 0).sort("position")
    assert first["position"].to_list() == list(range(1, lengths[0]))


def test_rows_match_decompose_on_a_single_forward(table, pair):
    from kdviz import decompose
    from kdviz.data import load_data

    ex = load_data(RECORDS, pair.tokenizer, max_length=64)[4]
    ids = torch.tensor([ex.input_ids])
    teacher, student = pair.logits(ids, torch.ones_like(ids))
    stats = decompose(teacher[:, :-1], student[:, :-1], ids[:, 1:])
    rows = table.df.filter(pl.col("doc_id") == 4).sort("position")
    for name in SCALAR_FIELDS:
        torch.testing.assert_close(torch.tensor(rows[name].to_list()), getattr(stats, name)[0], rtol=1e-5, atol=1e-6)
    assert rows["token_id"].to_list() == ex.input_ids[1:]


@pytest.mark.parametrize("batch_size,padding_side", [(1, "right"), (7, "left"), (2, "left")])
def test_results_do_not_depend_on_batch_size_or_padding(table, pair, batch_size, padding_side):
    other = analyze(pair, RECORDS, batch_size=batch_size, padding_side=padding_side, cache=False, progress=False)
    assert other.df["token_id"].to_list() == table.df["token_id"].to_list()
    assert other.df["position"].to_list() == table.df["position"].to_list()
    for name in SCALAR_FIELDS:
        torch.testing.assert_close(other.df[name].to_torch(), table.df[name].to_torch(), rtol=1e-4, atol=1e-5)
    assert other.df["hard"].to_list() == table.df["hard"].to_list()


@pytest.mark.parametrize("split", ["sequence", "dataset", "batch"])
def test_hard_split_matches_torch_quantile(pair, split):
    k = 0.3
    t = analyze(pair, RECORDS, k=k, split=split, batch_size=2, cache=False, progress=False)
    targets = t.targets
    group = {"sequence": targets["doc_id"], "dataset": targets["doc_id"] * 0, "batch": targets["doc_id"] // 2}[split]
    for g in group.unique().to_list():
        rows = targets.filter(group == g)
        unc = rows["unc"].to_torch()
        threshold = torch.quantile(unc.double(), 1 - k).item()
        assert rows["hard"].to_list() == (unc.double() >= threshold).tolist()
    assert not t.df.filter(~pl.col("is_response"))["hard"].any()


def test_summary_numbers(table):
    summary = table.summary()
    targets = table.targets
    hard = targets.filter(pl.col("hard"))
    assert summary.row("hard")["tokens"] == hard.height
    assert summary.row("all")["tokens"] == targets.height
    assert summary.row("hard")["mean_kl"] == pytest.approx(hard["kl"].mean(), rel=1e-6)
    assert summary.row("hard")["kl_share"] + summary.row("easy")["kl_share"] == pytest.approx(1.0)
    weighted = (targets["unc"] * targets["dkd"]).sum() / targets["dkd"].sum()
    assert summary.row("all")["dkd_weight"] == pytest.approx(weighted, rel=1e-6)
    text = str(summary)
    assert f"{hard.height} hard" in text and "KL share" in text


def test_top_k_columns_and_token_text(table, pair):
    row = table.df.row(0, named=True)
    assert len(row["t_topk_ids"]) == 5 and len(row["s_topk_tokens"]) == 5
    assert sorted(row["t_topk_probs"], reverse=True) == row["t_topk_probs"]
    spaced = table.df.filter(pl.col("token").str.contains("·"))
    assert spaced.height > 0 and not table.df["token"].str.contains(" ").any()


def test_save_and_load_roundtrip(tmp_path, table):
    path = table.save(tmp_path / "t.parquet")
    loaded = TokenTable.load(path)
    assert loaded.df.equals(table.df)
    assert loaded.meta == json.loads(json.dumps(table.meta))
    assert str(loaded.summary()) == str(table.summary())


def test_cache_hit_skips_the_models(tmp_path, pair, monkeypatch):
    first = analyze(pair, RECORDS[:3], cache_dir=tmp_path, progress=False)
    assert len(list((tmp_path / "analyze").glob("*.parquet"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("the models ran although the result was cached")

    monkeypatch.setattr(type(pair.source), "decompose", fail)
    again = analyze(pair, RECORDS[:3], cache_dir=tmp_path, progress=False)
    assert again.df.equals(first.df)
    with pytest.raises(AssertionError, match="models ran"):
        analyze(pair, RECORDS[:3], k=0.25, cache_dir=tmp_path, progress=False)


def test_bad_options(pair):
    with pytest.raises(ValueError, match="split must be one of"):
        analyze(pair, RECORDS, split="document", cache=False)
    with pytest.raises(ValueError, match="k is the fraction of hard tokens"):
        analyze(pair, RECORDS, k=1.5, cache=False)
    with pytest.raises(ValueError, match="empty or hold only whitespace"):
        analyze(pair, [""], cache=False)


def test_missing_table_file(tmp_path):
    with pytest.raises(ValueError, match="No token table"):
        TokenTable.load(tmp_path / "none.parquet")
