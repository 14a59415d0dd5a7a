"""Analysis across tokenizers: one row per aligned group of each response; rows of one-to-one groups with the same
string equal u and the matched-vocabulary KL of a plain forward of each model; the table does not depend on the
batch size or padding; the summary counts what the rows hold."""

import polars as pl
import pytest
import torch

from conftest import TEXTS, tiny_gpt2
from kdviz import analyze, decompose, load_pair
from kdviz.align import align_text
from kdviz.analysis import GroupTable
from kdviz.analysis.grouptable import ONE_TO_ONE, TEXT_CLASSES, text_class
from kdviz.zoo.ladder import train_tokenizer

RECORDS = [{"prompt": f"Q{i}:\n", "response": TEXTS[i % 4].replace("10", str(1234 * i))} for i in range(5)]
STATS = ("unc", "tkd", "kl", "dkd", "t_unmatched", "s_unmatched", "uld", "t_logp", "s_logp")


@pytest.fixture(scope="module")
def cross_pair(tmp_path_factory, model_dirs):
    """The tiny teacher (300 tokens) and a tiny student whose tokenizer has fewer merges (290 tokens): most groups
    are one token each side, some are merged on the student's side."""
    folder = tmp_path_factory.mktemp("cross") / "student"
    other = train_tokenizer(TEXTS, vocab_size=290)
    tiny_gpt2(other, seed=3).save_pretrained(folder)
    other.save_pretrained(folder)
    return load_pair(model_dirs["teacher"], folder, device="cpu")


@pytest.fixture(scope="module")
def table(cross_pair):
    return analyze(cross_pair, RECORDS, batch_size=3, progress=False)


def test_one_row_per_aligned_group_of_each_response_and_its_end_token(table, cross_pair):
    assert isinstance(table, GroupTable) and table.df["doc_id"].unique().sort().to_list() == list(range(len(RECORDS)))
    for doc_id, record in enumerate(RECORDS):
        rows = table.df.filter(pl.col("doc_id") == doc_id)
        groups = align_text(cross_pair.teacher_tokenizer, cross_pair.tokenizer, record["response"]).groups
        assert rows["byte_start"].to_list() == [g.byte_start for g in groups] + [len(record["response"].encode())]
        assert rows["kind"].to_list()[:-1] == [g.kind for g in groups]
        assert rows["text"].str.join("").item() == record["response"]
        end = rows.row(-1, named=True)  # both sides' EOS, zero-width at the end
        assert (end["teacher_ids"], end["student_ids"], end["kind"]) == ([cross_pair.teacher_tokenizer.eos_token_id],
                                                                         [cross_pair.tokenizer.eos_token_id], "same")
    kinds = set(table.df["kind"])
    assert {"same", "merged-one-side"} <= kinds
    assert table.df.filter(~pl.col("kind").is_in(ONE_TO_ONE))["kl"].is_null().all()
    assert table.df.filter(pl.col("kind") == "same")["kl"].is_not_null().all()


def plain_forward(model, tokenizer, record) -> tuple[torch.Tensor, list[int], int]:
    """(logits [T, V], ids, index of the response's first token) of prompt + response + EOS, as the plain template
    reads them, from one forward of one model."""
    prompt = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
    ids = prompt + tokenizer(record["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :, : len(tokenizer)]
    return logits, ids, len(prompt)


def test_rows_of_same_groups_equal_u_and_kl_from_a_plain_forward(table, cross_pair):
    student_of_teacher = cross_pair.vocabulary.student_of_teacher
    matched = (student_of_teacher >= 0).nonzero().squeeze(1)
    for doc_id in (1, 3):
        t_logits, t_ids, t_start = plain_forward(cross_pair.teacher, cross_pair.teacher_tokenizer, RECORDS[doc_id])
        s_logits, _, s_start = plain_forward(cross_pair.student, cross_pair.tokenizer, RECORDS[doc_id])
        u = decompose(t_logits[None, :-1], t_logits[None, :-1], torch.tensor([t_ids[1:]])).unc[0]
        rows = table.df.filter((pl.col("doc_id") == doc_id) & (pl.col("kind") == "same"))
        assert rows.height >= 5
        for row in rows.iter_rows(named=True):
            t_row = t_start + sum(len(ids) for ids in table.df.filter(
                (pl.col("doc_id") == doc_id) & (pl.col("group") < row["group"]))["teacher_ids"]) - 1
            s_row = s_start + sum(len(ids) for ids in table.df.filter(
                (pl.col("doc_id") == doc_id) & (pl.col("group") < row["group"]))["student_ids"]) - 1
            assert t_ids[t_row + 1] == row["teacher_ids"][0]
            p = t_logits[t_row, matched].softmax(-1)  # the matched vocabulary, renormalised
            q = s_logits[s_row, student_of_teacher[matched]].softmax(-1)
            assert row["unc"] == pytest.approx(float(u[t_row]), rel=1e-4, abs=1e-6)
            assert row["kl"] == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-4, abs=1e-6)
            assert row["t_unmatched"] == pytest.approx(1 - float(t_logits[t_row].softmax(-1)[matched].sum()), abs=1e-5)


@pytest.mark.parametrize("batch_size,padding_side", [(1, "right"), (3, "left")])
def test_the_table_does_not_depend_on_batch_size_or_padding(table, cross_pair, batch_size, padding_side):
    other = analyze(cross_pair, RECORDS, batch_size=batch_size, padding_side=padding_side, progress=False)
    for name in ("doc_id", "group", "byte_start", "byte_end", "kind", "teacher_ids", "student_ids", "hard"):
        assert other.df[name].to_list() == table.df[name].to_list()
    for name in STATS:
        torch.testing.assert_close(other.df[name].fill_null(float("nan")).to_torch(),
                                   table.df[name].fill_null(float("nan")).to_torch(), rtol=1e-4, atol=1e-5,
                                   equal_nan=True)


def test_hard_groups_are_the_top_of_each_sequences_u(table):
    for doc_id in range(len(RECORDS)):
        rows = table.df.filter(pl.col("doc_id") == doc_id)
        threshold = torch.quantile(rows["unc"].to_torch().double(), 0.5)
        assert rows["hard"].to_list() == (rows["unc"].to_torch().double() >= threshold).tolist()


def test_the_summary_counts_the_rows(table, cross_pair):
    summary, df = table.summary(), table.df
    assert summary.groups == df.height
    assert summary.one_to_one == pytest.approx(df["kind"].is_in(ONE_TO_ONE).mean())
    assert int(summary.breaks["groups"].sum()) == df.filter(~pl.col("kind").is_in(ONE_TO_ONE)).height
    assert set(summary.breaks["text_class"]) <= set(TEXT_CLASSES)
    same = summary.kinds.filter(pl.col("kind") == "same").row(0, named=True)
    assert same["mean_kl"] == pytest.approx(df.filter(pl.col("kind") == "same")["kl"].mean())
    assert summary.matched_mass == pytest.approx(1 - df.filter(pl.col("kind").is_in(ONE_TO_ONE))["t_unmatched"].mean())
    assert summary.vocabulary_share == cross_pair.vocabulary.share
    text = str(summary)
    assert f"{summary.one_to_one:.1%} one-to-one" in text and "Where alignment breaks" in text
    assert summary.to_dict()["groups"] == df.height


def test_text_classes():
    assert [text_class(t) for t in ("", "東京", " 1234", "\n    ", "  ", "):", " self")] == [
        "end token", "non-ASCII", "digits", "whitespace", "whitespace", "punctuation", "other"]


def test_plain_text_is_cut_into_windows_that_fit_both_contexts(cross_pair):
    text = " ".join(TEXTS[:4])
    table = analyze(cross_pair, [text, TEXTS[0]], max_length=24, progress=False)
    windows = table.df["source"].unique(maintain_order=True).to_list()
    assert len(windows) > 3 and windows[0] == "text[0]#window0"
    for source in windows:
        rows = table.df.filter(pl.col("source") == source)
        assert rows["teacher_ids"].list.len().sum() < 24 and rows["student_ids"].list.len().sum() < 24
    first = table.df.filter(pl.col("doc_id") == 0)
    assert first["byte_start"][0] > 0  # a window's first group is context only
    for before, after in zip(windows, windows[1:]):  # the windows follow each other, one group apart
        if before.startswith("text[0]") and after.startswith("text[0]"):
            end = table.df.filter(pl.col("source") == before)["byte_end"][-1]
            assert table.df.filter(pl.col("source") == after)["byte_start"][0] > end


def test_save_load_and_bad_input(tmp_path, table, cross_pair):
    path = table.save(tmp_path / "groups.parquet")
    loaded = GroupTable.load(path)
    assert loaded.df.equals(table.df) and loaded.meta["vocabulary_share"] == cross_pair.vocabulary.share
    with pytest.raises(ValueError, match="not a kdviz group table"):
        pl.DataFrame({"doc_id": [0]}).write_parquet(tmp_path / "other.parquet")
        GroupTable.load(tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="not available for a pair with different tokenizers"):
        analyze(cross_pair, RECORDS, generate="student", progress=False)
    with pytest.raises(ValueError, match="longer than their contexts"):
        analyze(cross_pair, [{"prompt": "Q", "response": " ".join(TEXTS)}], progress=False)
    cut = analyze(cross_pair, [{"prompt": "Q", "response": " ".join(TEXTS)}], truncate=True, progress=False)
    assert cut.df["text_class"][-1] != "end token" and cut.df["teacher_ids"].list.len().sum() < 64
