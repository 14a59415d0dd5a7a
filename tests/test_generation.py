"""Generated responses: greedy equals `model.generate(do_sample=False)`; sampling is reproducible on any batch size."""

import pytest
import torch

from kdviz import zoo
from kdviz.generation import Sampling, generate_responses

PROMPTS = [[5, 17, 3, 99, 42], [7, 8], [300, 12, 13, 14, 15, 16, 17, 18], [1, 2, 3]]


@pytest.fixture(scope="module")
def model():
    return zoo.load("zoo:student")


def test_greedy_equals_generate(model):
    model, tokenizer = model
    ours = generate_responses(model, PROMPTS, Sampling(max_new_tokens=12, temperature=0.0, batch_size=3),
                              stop_ids=[tokenizer.eos_token_id], pad_id=tokenizer.pad_token_id)
    for prompt, (response,) in zip(PROMPTS, ours):
        ids = torch.tensor([prompt])
        theirs = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        assert response == theirs[0, len(prompt):].tolist()


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampling_is_reproducible_on_any_batch_size(model, temperature, top_p):
    model, tokenizer = model
    runs = [generate_responses(model, PROMPTS, Sampling(max_new_tokens=10, temperature=temperature, top_p=top_p,
                                                        samples_per_prompt=3, seed=4, batch_size=size),
                               stop_ids=[tokenizer.eos_token_id], pad_id=tokenizer.pad_token_id)
            for size in (1, 5, 12)]
    assert runs[0] == runs[1] == runs[2]
    assert len({tuple(sample) for samples in runs[0] for sample in samples}) > len(PROMPTS)  # samples differ
    other = generate_responses(model, PROMPTS, Sampling(max_new_tokens=10, temperature=temperature, top_p=top_p,
                                                        samples_per_prompt=3, seed=5),
                               stop_ids=[tokenizer.eos_token_id], pad_id=tokenizer.pad_token_id)
    assert other != runs[0]


def test_sampling_settings_are_checked():
    for options, says in (({"top_p": 0}, "top_p must be"), ({"max_new_tokens": 0}, "max_new_tokens must be"),
                          ({"temperature": -1.0}, "sample temperature must be"),
                          ({"temperature": 0.0, "samples_per_prompt": 2}, "greedy decoding writes one")):
        with pytest.raises(ValueError, match=says):
            Sampling(**options)


@pytest.fixture(scope="module")
def pair():
    import kdviz

    return kdviz.load_pair("zoo:teacher-s", "zoo:student", device="cpu")


def test_analysis_of_generated_responses_scores_what_generate_wrote(pair, tmp_path):
    import polars as pl

    import kdviz
    from kdviz.data import load_data
    from kdviz.generation import prompt_of, with_responses

    sampling = Sampling(max_new_tokens=10, temperature=0.0)
    table = kdviz.analyze(pair, "zoo:docstrings", limit=3, generate="student", sampling=sampling, cache_dir=tmp_path,
                          progress=False).df
    assert table["response_from"].unique().sort().to_list() == ["data", "student"]
    data = load_data("zoo:docstrings", pair.tokenizer, max_length=pair.context(), limit=3)
    for doc, example in zip(table.filter(pl.col("response_from") == "student")["doc_id"].unique().sort(), data):
        prompt = torch.tensor([prompt_of(example)])
        written = pair.student.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                        max_new_tokens=10, eos_token_id=pair.tokenizer.eos_token_id,
                                        pad_token_id=pair.tokenizer.pad_token_id)[0, prompt.shape[1]:].tolist()
        rows = table.filter((pl.col("doc_id") == doc) & pl.col("is_response")).sort("position")
        assert rows["token_id"].to_list() == written
    # the generated rows are the analysis of those texts given as data
    responses = [[table.filter((pl.col("doc_id") == d) & pl.col("is_response")).sort("position")["token_id"].to_list()]
                 for d in table.filter(pl.col("response_from") == "student")["doc_id"].unique().sort()]
    plain = kdviz.analyze(pair, with_responses(data, responses, origin="student", keep_data=True), cache=False,
                          progress=False).df
    assert plain["response_from"].to_list() == table["response_from"].to_list()
    for column in ("token_id", "unc", "kl", "rkl", "tkd", "dkd", "hard"):
        assert plain[column].to_list() == table[column].to_list(), column


def test_generated_analysis_is_the_same_on_any_batch_size_and_kept(pair, tmp_path):
    import kdviz

    tables = [kdviz.analyze(pair, "zoo:docstrings", limit=4, generate="student", batch_size=size, cache=False,
                            cache_dir=tmp_path, progress=False,
                            sampling=Sampling(max_new_tokens=8, samples_per_prompt=2, seed=3, batch_size=size)).df
              for size in (1, 3)]
    for column in ("doc_id", "position", "token_id", "response_from", "sample", "source"):
        assert tables[0][column].to_list() == tables[1][column].to_list(), column  # the same responses
    for column in ("unc", "kl", "rkl", "dkd"):  # (batches of other shapes: float rounding only)
        assert (tables[0][column] - tables[1][column]).abs().max() < 1e-4, column
    kept = list((tmp_path / "generations").glob("*.json"))
    assert len(kept) == 1  # one set of generations, whatever the batch size (the key leaves it out)
    assert sorted(tables[0]["sample"].unique().to_list()) == [0, 1]


def test_generation_refuses_a_teacher_cache(pair, tmp_path):
    import kdviz
    from kdviz.cache import build
    from kdviz.data import load_data

    data = load_data("zoo:docstrings", pair.tokenizer, max_length=pair.context(), limit=2)
    build(pair.teacher, pair.tokenizer, data, tmp_path / "cache", top_k=8, max_length=pair.context(), progress=False)
    cached = kdviz.load_pair(None, "zoo:student", teacher_cache=tmp_path / "cache", device="cpu")
    with pytest.raises(ValueError, match="need the live teacher to score them"):
        kdviz.analyze(cached, "zoo:docstrings", limit=2, generate="student", progress=False)


def test_prompt_only_records_get_the_same_generated_rows_and_no_data_rows(pair, tmp_path):
    import polars as pl

    import kdviz
    from kdviz.analysis import exposure_bias

    full = [{"prompt": f"def f{i}(x):\n    \"\"\"Return x plus {i}.\"\"\"", "response": f"    return x + {i}\n"}
            for i in range(3)]
    prompts = [{"prompt": r["prompt"]} for r in full[:2]] + [{"prompt": full[2]["prompt"], "response": ""}]
    sampling = Sampling(max_new_tokens=6, samples_per_prompt=2, seed=1)
    with_data, alone = (kdviz.analyze(pair, records, generate="student", sampling=sampling, cache_dir=tmp_path,
                                      progress=False).df for records in (full, prompts))
    assert alone["response_from"].unique().to_list() == ["student"]  # no data rows: there was no data response
    generated = with_data.filter(pl.col("response_from") == "student")
    for column in ("token_id", "source", "sample", "hard"):
        assert generated[column].to_list() == alone[column].to_list(), column  # the same responses, split alike
    for column in ("unc", "kl", "rkl"):  # (batched with other examples: float rounding only)
        assert (generated[column] - alone[column]).abs().max() < 1e-5, column
    summary = exposure_bias(kdviz.TokenTable(alone))
    assert summary.prompts == 3 and summary.overall["response_from"].to_list() == ["student"]
    assert "no data responses to compare with" in str(summary)
    with pytest.raises(ValueError, match=r"list:1: cannot find prompt/response.*--generate"):
        kdviz.analyze(pair, prompts, progress=False)  # without generate, a record needs its response
    with pytest.raises(ValueError, match="response is empty.*--generate"):
        kdviz.analyze(pair, [full[0], prompts[2]], progress=False)


def test_generated_analysis_under_two_processes_equals_one_process(pair, tmp_path):
    """Under torchrun rank 0 writes the responses (sampled, 2 a prompt) and both ranks analyse their share
    (the module's pair: zoo:teacher-s -> zoo:student)."""
    import json
    import os
    import subprocess
    import sys

    import kdviz

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i} twice.", "response": f"{i} {i}"}) + "\n"
                            for i in range(5)))
    one = kdviz.analyze(pair, str(data), generate="student", cache=False, cache_dir=tmp_path / "one", progress=False,
                        sampling=Sampling(max_new_tokens=6, samples_per_prompt=2, seed=3)).df
    out = tmp_path / "two.parquet"
    env = {**os.environ, "KDVIZ_CACHE_DIR": str(tmp_path / "two"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "kdviz", "analyze", "--teacher", "zoo:teacher-s", "--student", "zoo:student",
                           "--data", str(data), "--out", str(out), "--device", "cpu",
                           "--generate", "student", "--max-new-tokens", "6", "--samples-per-prompt", "2", "--seed",
                           "3", "--part-tokens", "20"], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    two = kdviz.TokenTable.load(out).df
    assert (one["response_from"] == "student").sum() > 0
    for column in ("doc_id", "position", "token_id", "response_from", "sample", "hard"):
        assert one[column].to_list() == two[column].to_list(), column  # the same responses, rows and split
    for column in ("unc", "kl", "rkl", "tkd", "dkd"):
        assert (one[column] - two[column]).abs().max() < 1e-4, column
