"""The teacher top-k cache: what it stores, what is exact from it, and what it refuses."""

import json
import re

import polars as pl
import pytest
import torch

from kdviz import analyze, load_pair, zoo
from kdviz.cli import main
from kdviz.data import load_data
from kdviz.maths.decomposition import SCALAR_FIELDS
from kdviz.losses import TopKRows, bucketed
from kdviz.cache import TeacherCache, build

RECORDS = [{"instruction": f"Say {i}", "input": "", "output": "the student learns " * (1 + i % 3)}
           for i in range(8)]


@pytest.fixture(scope="module")
def data(pair):
    return load_data(RECORDS, pair.tokenizer, max_length=64)


@pytest.fixture(scope="module")
def caches(pair, data, tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    return {k: build(pair.teacher, pair.tokenizer, data, root / f"k{k}", top_k=k, teacher_name="tiny",
                     max_length=64, encoding="exact", progress=False) for k in (len(pair.tokenizer), 16, 4)}


def test_the_cache_stores_each_target_tokens_top_k_and_target_log_prob(pair, data, caches):
    cache = caches[16]
    example = data[3]
    ids = torch.tensor([example.input_ids])
    log_p = torch.log_softmax(pair.logits(ids, torch.ones_like(ids))[0][0].double(), -1)  # (L, V)
    positions = [p for p in range(len(ids[0]) - 1) if example.labels[p + 1] != -100]
    rows = cache.rows([3])
    top = log_p[positions].topk(16, dim=1)
    assert torch.equal(rows.ids, top.indices)
    torch.testing.assert_close(rows.logprobs.double(), top.values, rtol=1e-5, atol=1e-5)
    targets = torch.tensor([example.input_ids[p + 1] for p in positions])
    torch.testing.assert_close(rows.target_logp.double(), log_p[positions, targets], rtol=1e-5, atol=1e-5)
    assert cache.meta["tokens"] == data.n_targets and cache.meta["template"] == data.template
    rest = torch.ones_like(log_p[positions], dtype=torch.bool).scatter_(1, top.indices, False)
    rest[torch.arange(len(targets)), targets] = False
    tail = torch.logsumexp(log_p[positions].masked_fill(~rest, float("-inf")), 1)
    torch.testing.assert_close(rows.tail_logp.double(), tail, rtol=1e-5, atol=1e-5)


def test_bytes_per_token_at_k_64_exact_392_compact_under_160(pair, data, tmp_path):
    exact = build(pair.teacher, pair.tokenizer, data, tmp_path / "k64", top_k=64, encoding="exact", progress=False)
    assert exact.bytes_per_token == 2 * 64 + 4 * 64 + 4 + 4 == 392
    compact = build(pair.teacher, pair.tokenizer, data, tmp_path / "c64", top_k=64, progress=False)
    assert compact.encoding == "compact" and compact.bytes_per_token == 159 == compact.meta["bytes_per_token"]


def live_targets(pair, data):
    return analyze(pair, data, cache=False, progress=False).df.filter(pl.col("is_response"))


def test_with_k_equal_to_the_vocabulary_every_quantity_is_exact(pair, data, caches):
    cached = analyze(load_pair(None, pair.student_name, teacher_cache=caches[len(pair.tokenizer)].folder, device="cpu"), data,
                     cache=False, progress=False).df
    live = live_targets(pair, data)
    assert cached["token_id"].to_list() == live["token_id"].to_list()
    for name in SCALAR_FIELDS:
        torch.testing.assert_close(cached[name].to_torch(), live[name].to_torch(), rtol=1e-4, atol=1e-5)
    assert cached["hard"].to_list() == live["hard"].to_list()


@pytest.mark.parametrize("k", [16, 4])
def test_u_and_tkd_are_exact_and_kl_dkd_are_lower_bounds_at_any_k(pair, data, caches, k):
    cached = analyze(load_pair(None, pair.student_name, teacher_cache=caches[k].folder, device="cpu"), data, cache=False,
                     progress=False, top_k=min(5, k)).df
    live = live_targets(pair, data)
    for name in ("unc", "tkd", "t_logp", "s_logp", "s_entropy"):
        torch.testing.assert_close(cached[name].to_torch(), live[name].to_torch(), rtol=1e-4, atol=1e-5)
    for name in ("kl", "dkd", "rkl"):
        assert (cached[name] <= live[name] + 1e-4).all(), name
    assert (cached["kl"] < live["kl"] - 1e-3).any()  # a small k does lose something
    outside = cached.filter(pl.col("t_rank").is_null())
    assert (live.filter(pl.col("t_rank") > k)["t_rank"].len() == outside.height)  # ranks past the top-k are unknown


def test_bucketed_distributions_sum_to_one_and_keep_gradients_finite():
    torch.manual_seed(0)
    logits = torch.randn(5, 30, requires_grad=True)
    log_p = torch.log_softmax(torch.randn(5, 30) * 2, -1)
    y = torch.tensor([0, 5, 9, 29, 3])
    for k in (1, 7, 30):
        log_q = torch.log_softmax(logits, -1)
        p_b, q_b = bucketed(log_q, TopKRows.from_log_probs(log_p, y, k), y)
        torch.testing.assert_close(p_b.exp().sum(1), torch.ones(5), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(q_b.exp().sum(1), torch.ones(5), rtol=1e-5, atol=1e-5)
        kl = torch.where(p_b > float("-inf"), p_b.exp() * (p_b - q_b), 0.0).sum()
        (grad,) = torch.autograd.grad(kl, logits)
        assert torch.isfinite(grad).all()


def test_a_cache_that_does_not_match_is_refused_with_the_reason(pair, data, caches, tokenizer, tmp_path):
    cached = load_pair(None, pair.student_name, teacher_cache=caches[16].folder, device="cpu")
    whole = analyze(cached, RECORDS, cache=False, progress=False).df
    part = analyze(cached, RECORDS[2:5], cache=False, progress=False).df  # a subset of the cached examples is found
    same = whole.filter(pl.col("doc_id").is_between(2, 4))
    assert part["token_id"].equals(same["token_id"]) and part["t_topk_ids"].equals(same["t_topk_ids"])
    for column in SCALAR_FIELDS:  # the same rows, to float rounding (other batches)
        torch.testing.assert_close(part[column].to_torch(), same[column].to_torch(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="holds other data: 8 examples .* this data is 1 examples"):
        analyze(cached, [{"prompt": "Not in the cache", "response": " at all."}], cache=False, progress=False)
    with pytest.raises(ValueError, match="holds other data: .*with template 'alpaca' \\(this data: 'plain'\\)"):
        analyze(cached, RECORDS, template="plain", cache=False, progress=False)
    with pytest.raises(ValueError, match="at temperature 1.0, not 2.0"):
        analyze(cached, RECORDS, temperature=2.0, cache=False, progress=False)
    other = tokenizer.__class__.from_pretrained(pair.student_name)
    other.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="another tokenizer"):
        caches[16].check(data, other)
    (tmp_path / "meta.json").write_text(json.dumps(caches[16].meta))
    with pytest.raises(ValueError, match="damaged"):
        TeacherCache.open(tmp_path)


def test_an_analysis_from_a_cache_is_reused_and_resumes_from_its_parts(pair, caches, tmp_path, recwarn, monkeypatch,
                                                                       capsys):
    analyze_module = __import__("sys").modules["kdviz.analysis.store"]  # (where parts are merged)
    cached = load_pair(None, pair.student_name, teacher_cache=caches[16].folder, device="cpu")
    options = dict(cache_dir=tmp_path, progress=False, part_tokens=32, top_k=4)
    first = analyze(cached, RECORDS, **options)
    (entry,) = (tmp_path / "analyze").glob("*.parquet")
    again = analyze(cached, RECORDS, **options)
    assert again.df.equals(first.df) and entry.is_file()  # a hit: its rows are the target tokens only
    entry.unlink()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # after every part was written, before the merge

    monkeypatch.setattr(analyze_module, "merge_parts", interrupted)
    with pytest.raises(KeyboardInterrupt):
        analyze(cached, RECORDS, **options)
    monkeypatch.undo()
    resumed = analyze(cached, RECORDS, **options)
    assert resumed.df.equals(first.df)
    assert re.search(r"reusing (\d+) of \1 finished parts", capsys.readouterr().err)
    assert not list((tmp_path / "analyze").glob("*.corrupt-*"))
    assert not [w for w in recwarn if "Could not read" in str(w.message)]


def test_a_cache_whose_arrays_were_swapped_or_damaged_is_refused(caches, tmp_path):
    import shutil

    import numpy as np

    part = caches[16].parts[0].prefix  # the part folder holding the rows ("part-0000000000-0000000008/")
    for name, change, message in [
        ("logprobs", lambda folder: np.load(folder / "ids.npy"), "logprobs.npy holds uint16 values, not float32"),
        ("logprobs", lambda folder: -np.load(folder / "logprobs.npy"), "not log-probabilities"),
        ("logprobs", lambda folder: np.load(folder / "logprobs.npy")[:, ::-1].copy(), "not the top-k in order"),
        ("ids", lambda folder: np.load(folder / "ids.npy")[:-1], "ids.npy has shape"),
    ]:
        folder = tmp_path / f"{name}-{message[:8]}"
        shutil.copytree(caches[16].folder, folder)
        np.save(folder / part / f"{name}.npy", change(folder / part))
        with pytest.raises(ValueError, match=f"is damaged: {part}{name}.npy has changed since the cache was made"):
            TeacherCache.open(folder)
        meta = json.loads((folder / "meta.json").read_text())
        del meta["checksums"]  # as a cache made before kdviz recorded them (and sealed meta.json): the sampled
        (folder / "meta.json").write_text(json.dumps(meta))  # checks still catch it
        (folder / "meta.json.xxh3").unlink()
        with pytest.raises(ValueError, match=f"is damaged: .*{message}"):
            TeacherCache.open(folder)
    flipped = tmp_path / "one-ulp"  # one value nudged by one ulp in place: still a log-probability,
    # so only the checksum can tell
    shutil.copytree(caches[16].folder, flipped)
    target = np.load(flipped / part / "target_logp.npy", mmap_mode="r+")
    target[1] = np.nextafter(target[1], np.float32(0), dtype=np.float32)
    target.flush()
    del target
    with pytest.raises(ValueError, match=f"is damaged: {part}target_logp.npy has changed since the cache was made"):
        TeacherCache.open(flipped)
    assert TeacherCache.open(caches[16].folder).meta["checksums"].keys() == {"offsets.npy", "keys.npy"} | {
        f"{part}{n}.npy" for n in ("ids", "logprobs", "target_logp", "tail_logp")}
    broken = tmp_path / "meta"
    shutil.copytree(caches[16].folder, broken)
    (broken / "meta.json").write_text('{"format": 3, "top_k"')
    with pytest.raises(ValueError, match="damaged: meta.json has changed since it was written"):
        TeacherCache.open(broken)
    (broken / "meta.json.xxh3").unlink()  # (a cache made before meta.json was sealed)
    with pytest.raises(ValueError, match="meta.json cannot be read .*damaged"):
        TeacherCache.open(broken)


def test_the_cli_makes_a_cache_and_analyses_from_it(model_dirs, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    cache = tmp_path / "cache"
    assert main(["teacher-cache", "--teacher", str(model_dirs["teacher"]), "--student", str(model_dirs["student"]),
                 "--data", str(data), "--out", str(cache), "--top-k", "8", "--device", "cpu"]) == 0
    assert "bytes per token" in capsys.readouterr().out
    assert main(["teacher-cache", "--teacher", str(model_dirs["teacher"]), "--data", str(data), "--out", str(cache),
                 "--device", "cpu"]) == 2  # never over an existing cache
    capsys.readouterr()
    other = ["teacher-cache", "--teacher", str(model_dirs["teacher"]), "--data", str(data), "--out", str(tmp_path / "c")]
    assert main([*other, "--max-length", "0"]) == 2  # not "no limit"
    assert "max_length must be an integer >= 2, got 0" in capsys.readouterr().err
    assert main([*other, "--student", str(tmp_path / "no-such-student")]) == 2
    err = capsys.readouterr().err
    assert "no-such-student does not exist" in err and "Traceback" not in err
    assert main([*other, "--student", "zoo:student"]) == 2  # another tokenizer: refused before the teacher runs
    err = capsys.readouterr().err
    assert "--student zoo:student has another tokenizer than --teacher" in err and "teacher cache" not in err
    assert not (tmp_path / "c").exists()
    out = tmp_path / "t.parquet"
    assert main(["analyze", "--teacher-cache", str(cache), "--student", str(model_dirs["student"]), "--data",
                 str(data), "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "top-8 cache: u and TKD are exact" in printed
    assert pl.read_parquet(out)["is_response"].all()
    assert main(["analyze", "--student", str(model_dirs["student"]), "--data", str(data), "--out", str(out)]) == 2
    assert "--teacher MODEL or --teacher-cache DIR" in capsys.readouterr().err


# Distilling from the cache -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,params", [("fkl", {}), ("atkd", {"lam": 0.3}), ("jsd", {"beta": 0.5}),
                                         ("atkd", {"base": "rkl"})])
def test_the_cached_loss_at_k_equal_to_v_is_the_live_loss_values_and_gradients(name, params):
    from kdviz.losses import TopKRows, get_loss

    torch.manual_seed(0)
    s_hidden, t_hidden = torch.randn(2, 6, 8, requires_grad=True), torch.randn(2, 6, 5)
    s_head, t_head = torch.randn(23, 8, requires_grad=True), torch.randn(23, 5) * 2
    labels = torch.randint(23, (2, 6))
    labels[0, :2] = -100
    loss_fn = get_loss(name, chunk_rows=4, **params)
    live = loss_fn.linear(s_hidden, s_head, t_hidden, t_head, labels, ce_weight=0.5)
    live_grads = torch.autograd.grad(live.loss, (s_hidden, s_head))
    log_p = torch.log_softmax(t_hidden @ t_head.T, -1)[labels != -100]  # the cache's rows, in order
    y = labels[labels != -100]
    cached = loss_fn.linear_cached(s_hidden, s_head, TopKRows.from_log_probs(log_p, y, 23), labels, ce_weight=0.5)
    cached_grads = torch.autograd.grad(cached.loss, (s_hidden, s_head))
    torch.testing.assert_close(cached.loss, live.loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(cached_grads, live_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cached.unc, live.unc)  # u exact
    lower = loss_fn.linear_cached(s_hidden, s_head, TopKRows.from_log_probs(log_p, y, 3), labels)
    if name == "fkl":
        assert float(lower.kd) < float(live.kd)  # a lower bound (log-sum inequality), here strictly


@pytest.mark.parametrize("name,params", [("rkl", {}), ("atkd", {"base": "rkl"}), ("fkl", {})])
def test_a_confident_teacher_keeps_its_tail_and_every_cached_loss_finite(name, params):
    """p_y rounds to 1 in float32: 1 - p_y - sum(top-k p) is 0 there, the tail's log-probability is not."""
    from kdviz.losses import TopKRows, get_loss

    torch.manual_seed(1)
    s_hidden, s_head = torch.randn(1, 5, 8, requires_grad=True), torch.randn(40, 8, requires_grad=True)
    labels = torch.randint(40, (1, 5))
    t_logits = torch.randn(5, 40)
    t_logits[torch.arange(5), labels[0]] = 40.0  # p_y = 1 - 1e-16
    log_p = torch.log_softmax(t_logits, -1)
    assert bool((log_p.gather(1, labels[0][:, None]) == 0).all())  # float32 says p_y = 1
    rows = TopKRows.from_log_probs(log_p, labels[0], 4)
    assert bool(torch.isfinite(rows.tail_logp).all()) and float(rows.tail_logp.max()) < -30
    loss_fn = get_loss(name, chunk_rows=2, **params)
    cached = loss_fn.linear_cached(s_hidden, s_head, rows, labels)
    (grad,) = torch.autograd.grad(cached.loss, s_hidden)
    assert torch.isfinite(cached.loss) and torch.isfinite(grad).all()
    full = loss_fn.linear_cached(s_hidden, s_head, TopKRows.from_log_probs(log_p, labels[0], 40), labels)
    assert float(cached.loss.detach()) <= float(full.loss.detach()) + 1e-5  # still a lower bound of the exact (k = V) loss


@pytest.fixture(scope="module")
def zoo_caches(tmp_path_factory):
    from kdviz import load_pair

    pair = load_pair("zoo:teacher-s", "zoo:student", device="cpu")
    data = load_data("zoo:docstrings", pair.tokenizer, max_length=256, limit=24)
    root = tmp_path_factory.mktemp("zoo-caches")
    return {k: build(pair.teacher, pair.tokenizer, data, root / f"k{k}", top_k=k, max_length=256, progress=False,
                     encoding="exact" if k == len(pair.tokenizer) else "compact")
            for k in (len(pair.tokenizer), 32)}


def trained_weights(out):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out).state_dict()


@pytest.mark.parametrize("loss", ["fkl", "atkd"])
def test_training_from_a_full_vocabulary_cache_equals_training_with_the_live_teacher(zoo_caches, tmp_path, loss):
    from kdviz.train import distill

    common = dict(loss=loss, steps=3, batch_size=4, eval_size=4, limit=24, device="cpu", progress=False,
                  learning_rate=0.5, optim="sgd", eval_generate_examples=0)
    live = distill("zoo:teacher-s", "zoo:student", "zoo:docstrings", out_dir=tmp_path / "live", **common)
    cached = distill(None, "zoo:student", "zoo:docstrings", teacher_cache=zoo_caches[8192].folder,
                     out_dir=tmp_path / "cached", **common)
    initial, a, b = (trained_weights(p) for p in (str(zoo.zoo_dir() / "student"), tmp_path / "live", tmp_path / "cached"))
    update = max(float((a[k] - initial[k].float()).abs().max()) for k in a)
    assert update > 1e-3 and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5 * update
    assert cached.before.agreement == pytest.approx(live.before.agreement)  # top-1 of the cache = the teacher's
    assert [h["kd"] for h in cached.curves()] == pytest.approx([h["kd"] for h in live.curves()], rel=1e-5)
    assert cached.settings["cache_top_k"] == 8192


def test_distill_refuses_what_a_cache_cannot_do(zoo_caches, tmp_path):
    from kdviz.train import distill

    common = dict(steps=1, batch_size=4, eval_size=4, device="cpu", progress=False)
    with pytest.raises(ValueError, match="OKD adapts the teacher's final hidden state"):
        distill(None, "zoo:student", "zoo:docstrings", teacher_cache=zoo_caches[32].folder, loss="okd", limit=24,
                **common)
    with pytest.raises(ValueError, match="holds other data"):  # (a subset of its examples is fine: limit=20)
        distill(None, "zoo:student", "zoo:docstrings", teacher_cache=zoo_caches[32].folder, loss="fkl", limit=24,
                template="alpaca", **common)
    with pytest.raises(ValueError, match="at temperature 1.0, not 2.0"):
        distill(None, "zoo:student", "zoo:docstrings", teacher_cache=zoo_caches[32].folder, loss="fkl", limit=24,
                loss_params={"temperature": 2.0}, **common)


def test_the_cli_distils_from_a_cache(zoo_caches, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", "--teacher-cache", str(zoo_caches[32].folder), "--student", "zoo:student", "--data",
                 "zoo:docstrings", "--limit", "24", "--loss", "atkd", "--steps", "2", "--batch-size", "4",
                 "--eval-size", "4", "--out", str(out), "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["cache_top_k"] == 32 and "top-32 cache" in metrics["teacher"]
