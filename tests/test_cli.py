import json
import re
import subprocess
import shlex
import sys

import polars as pl
import pytest

from kdviz import TokenTable
from kdviz.cli import main


def test_help_explains_models_and_data(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for expected in ("--teacher", "--student", "--data", "--out", "zoo:docstrings", "Dolly"):
        assert expected in text


def test_analyze_end_to_end(tmp_path, model_dirs, monkeypatch):
    monkeypatch.setenv("KDVIZ_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Echo {i}", "input": "", "output": "the teacher"}) + "\n"
                            for i in range(5)))
    out = tmp_path / "t.parquet"
    command = [sys.executable, "-m", "kdviz.cli", "analyze", "--teacher", str(model_dirs["teacher"]),
               "--student", str(model_dirs["student"]), "--data", str(data), "--out", str(out),
               "--k", "0.4", "--report", str(tmp_path / "r.html")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "hard" in result.stdout and str(out) in result.stdout
    table = TokenTable.load(out)
    assert table.meta["k"] == 0.4 and table.df.filter(pl.col("is_response")).height > 0
    report = (tmp_path / "r.html").read_text()
    assert not re.search(r"<script[^>]*src=", report), "the report must not load scripts from a CDN"
    assert len(report) > 1_000_000 and "Plotly.newPlot" in report  # plotly.js is inlined


def test_bad_input_exits_with_message(tmp_path, model_dirs, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    code = main(["analyze", "--teacher", str(model_dirs["teacher"]), "--student", str(model_dirs["student"]),
                 "--data", str(bad), "--out", str(tmp_path / "x.parquet"), "--no-cache"])
    assert code == 2
    assert "bad.jsonl:1: not valid JSON" in capsys.readouterr().err


def test_data_from_standard_input(tmp_path, model_dirs, monkeypatch):
    """`--data /dev/stdin` reads a pipe once (it cannot be read twice) and gives the table the same text gives."""
    monkeypatch.setenv("KDVIZ_CACHE_DIR", str(tmp_path / "cache"))
    text = "def add(a, b):\n    return a + b\n"
    (tmp_path / "same.txt").write_text(text)
    base = [sys.executable, "-m", "kdviz.cli", "analyze", "--teacher", str(model_dirs["teacher"]),
            "--student", str(model_dirs["student"]), "--no-cache"]
    piped = subprocess.run([*base, "--data", "/dev/stdin", "--out", str(tmp_path / "piped.parquet")], input=text,
                           capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0, piped.stderr
    assert main(["analyze", *base[4:], "--data", str(tmp_path / "same.txt"), "--out", str(tmp_path / "file.parquet")]) == 0
    columns = ["token_id", "unc", "kl", "tkd", "dkd"]
    piped_df, file_df = (pl.read_parquet(tmp_path / f"{name}.parquet").select(columns) for name in ("piped", "file"))
    assert piped_df.height > 5 and piped_df.equals(file_df)


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "analyze" in capsys.readouterr().out


def test_notebooks_are_copied_where_the_user_is(tmp_path, capsys):
    out = tmp_path / "mine"
    assert main(["notebooks", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.ipynb"))[0] == "01_token_inspector.ipynb"
    assert str(out.resolve()) in capsys.readouterr().out
    assert main(["notebooks", "--out", str(out)]) == 2  # never over the user's notebooks
    assert "not empty" in capsys.readouterr().err


def test_demo_hint_leads_to_a_notebook_that_exists_from_any_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--teacher", "zoo:teacher-s", "--student", "zoo:student", "--limit", "2", "--device",
                 "cpu"]) == 0
    hint = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Explore:")][0]
    copy, open_it = hint.removeprefix("Explore:").split("(")[0].strip().split(" && ")
    assert main(shlex.split(copy)[1:]) == 0  # `kdviz notebooks --out DIR`, as the hint says
    path = open_it.split("jupyter lab ")[1].split()[0]
    assert path.endswith("01_token_inspector.ipynb") and (tmp_path / path).is_file()


def test_analyze_generate_prints_the_exposure_bias_and_refuses_a_cache(tmp_path, model_dirs, capsys, monkeypatch):
    monkeypatch.setenv("KDVIZ_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Echo {i}", "input": "", "output": "the teacher"}) + "\n"
                            for i in range(3)))
    base = ["analyze", "--teacher", str(model_dirs["teacher"]), "--student", str(model_dirs["student"]),
            "--data", str(data), "--generate", "student", "--max-new-tokens", "5", "--samples-per-prompt", "2"]
    assert main([*base, "--out", str(tmp_path / "g.parquet")]) == 0
    out = capsys.readouterr().out
    assert "Exposure bias over 3 prompts" in out and "student" in out
    table = TokenTable.load(tmp_path / "g.parquet")
    assert table.meta["generated_by"] == "student" and table.meta["sampling"]["samples_per_prompt"] == 2
    assert table.df.filter(pl.col("response_from") == "student")["sample"].unique().sort().to_list() == [0, 1]
    for extra, says in ((["--teacher-cache", str(tmp_path)], "--generate needs the live teacher"),
                        (["--samples-per-prompt", "2", "--sample-temperature", "0"], "greedy decoding writes one")):
        args = [a for a in base if a not in ("--teacher", str(model_dirs["teacher"]))] if "--teacher-cache" in extra \
            else base
        assert main([*args, *extra, "--out", str(tmp_path / "x.parquet")]) == 2
        assert says in capsys.readouterr().err


def test_analyze_generate_reads_prompt_only_records(tmp_path, model_dirs, capsys, monkeypatch):
    monkeypatch.setenv("KDVIZ_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Echo {i}"}) + "\n" for i in range(3)))
    base = ["analyze", "--teacher", str(model_dirs["teacher"]), "--student", str(model_dirs["student"]),
            "--data", str(data)]
    assert main([*base, "--generate", "teacher", "--max-new-tokens", "4", "--out", str(tmp_path / "g.parquet")]) == 0
    said = capsys.readouterr().out
    assert "Exposure bias over 3 prompts (no data responses" in said
    table = TokenTable.load(tmp_path / "g.parquet")
    assert table.df["response_from"].unique().to_list() == ["teacher"] and "3 prompts from" in table.meta["data"]
    assert main([*base, "--out", str(tmp_path / "x.parquet")]) == 2  # no model to write the responses
    err = capsys.readouterr().err
    assert "cannot find prompt/response fields among ['prompt']" in err and "--generate" in err
    assert "Traceback" not in err and not (tmp_path / "x.parquet").exists()


def test_distill_reads_prompt_only_records_when_every_step_generates(tmp_path, model_dirs, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Echo {i}"}) + "\n" for i in range(6)))
    base = ["distill", "--teacher", str(model_dirs["teacher"]), "--student", str(model_dirs["student"]),
            "--data", str(data), "--loss", "rkl", "--steps", "1", "--batch-size", "2", "--max-new-tokens", "4",
            "--device", "cpu"]
    assert main([*base, "--on-policy", "0.5", "--out", str(tmp_path / "half")]) == 2  # some steps read the data
    err = capsys.readouterr().err
    assert "no response" in err and "--on-policy 1, --seq-kd" in err and "Traceback" not in err
    assert not (tmp_path / "half").exists()
    assert main([*base, "--on-policy", "1", "--out", str(tmp_path / "run")]) == 0
    assert "held-out: 1 of 1 prompts had no response" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["settings"]["eval_references_by_teacher"] == 1 and metrics["before"]["tokens"] > 0


def test_analyze_across_tokenizers_writes_the_group_table_and_report(tmp_path, capsys):
    """zoo:smollm2-student (SmolLM2's 49,152-token tokenizer, chat template) teaches zoo:student (8,192 tokens, plain)."""
    from kdviz.analysis import GroupTable

    out, report = tmp_path / "t.parquet", tmp_path / "r.html"
    base = ["analyze", "--teacher", "zoo:smollm2-student", "--student", "zoo:student", "--data", "zoo:docstrings",
            "--limit", "3", "--device", "cpu"]
    assert main([*base, "--out", str(out), "--report", str(report)]) == 0
    said = capsys.readouterr()
    assert "different tokenizers" in said.err and "one-to-one" in said.out and "Where alignment breaks" in said.out
    table = GroupTable.load(out)
    assert table.meta["examples"] == 3 and table.df["doc_id"].n_unique() == 3
    assert f"{table.summary().one_to_one:.1%} one-to-one" in said.out
    page = report.read_text()
    assert "Groups with the largest TKD" in page and "merged-one-side" in page
    assert main([*base, "--template", "chat", "--out", str(tmp_path / "x.parquet")]) == 2  # zoo:student has none
    assert "needs a tokenizer with a chat template" in capsys.readouterr().err
    assert main([*base, "--generate", "student", "--out", str(tmp_path / "x.parquet")]) == 2
    assert "not available for a pair with different tokenizers" in capsys.readouterr().err
    assert not (tmp_path / "x.parquet").exists()
