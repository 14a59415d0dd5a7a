"""Every notebook runs headlessly under papermill (small parameters) and writes what it promises."""

import json
from pathlib import Path

import nbformat
import polars as pl
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "kdviz" / "notebooks"
SMALL = {
    "01_token_inspector": {"limit": 4},
    "02_teaching_modes": {"teachers": ["zoo:teacher-s", "zoo:teacher-l"], "limit": 4},
    "03_distill": {"teachers": ["zoo:teacher-s"], "steps": 3, "limit": 24},
    "04_teacher_size": {"teachers": ["zoo:teacher-s", "zoo:teacher-m"], "steps": 2, "limit": 24,
                        "cache_dir": "{out_dir}/caches"},
    "05_workshop": {"student_target": 0.2},
    "06_ablations": {"teacher": "zoo:teacher-s", "steps": 2, "limit": 24, "losses": ["kd-on-hard", "kd-on-easy"]},
    "07_rollouts": {"teacher": "zoo:teacher-s", "student": "zoo:student", "limit": 3, "max_new_tokens": 8},
    "08_cross_tokenizer": {"limit": 3},
}


def run(name, tmp_path):
    import papermill

    out_dir = tmp_path / name
    papermill.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(tmp_path / f"{name}.out.ipynb"),
                               parameters={**{k: v.format(out_dir=out_dir) if isinstance(v, str) else v
                                              for k, v in SMALL[name].items()}, "out_dir": str(out_dir)},
                               kernel_name="python3",
                               cwd=str(tmp_path), progress_bar=False)
    return out_dir, nbformat.read(tmp_path / f"{name}.out.ipynb", as_version=4)


def static_html_outputs(nb) -> list[str]:
    return [o["data"]["text/html"] for cell in nb.cells for o in cell.get("outputs", [])
            if "text/html" in o.get("data", {})]


@pytest.mark.parametrize("name", list(SMALL))
def test_notebook_is_committed_clean_with_a_parameters_cell(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert nb.metadata["kernelspec"]["name"] == "python3"


def test_token_inspector_notebook(tmp_path):
    out, nb = run("01_token_inspector", tmp_path)
    tokens = pl.read_parquet(out / "tokens.parquet")
    summary = json.loads((out / "summary.json").read_text())
    assert tokens["doc_id"].n_unique() == 4
    assert summary["all"]["tokens"] == int(tokens["is_response"].sum())
    html = "\n".join(static_html_outputs(nb))
    assert "<span" in html and "Plotly.newPlot" in html  # the strip and the figures, as static HTML
    assert "plotly.js v" in html and 'src="https://cdn' not in html  # plotly.js inlined: works offline


def test_teaching_modes_notebook(tmp_path):
    out, _ = run("02_teaching_modes", tmp_path)
    pairs = pl.read_parquet(out / "pairs.parquet")
    assert set(pairs["teacher"]) == {"zoo:teacher-s", "zoo:teacher-l", "zoo:smollm2-135m"}
    assert set(pairs["group"]) == {"hard", "easy", "all"}
    assert pairs.filter(pl.col("group") == "all")["dkd_weight"].is_between(0, 1).all()
    every = pairs.filter(pl.col("group") == "all")
    assert every.filter(pl.col("teacher") == "zoo:smollm2-135m")["template"][0] == "chat"
    tokens = pl.read_parquet(out / "tokens.parquet")
    assert tokens.group_by("pair").len()["len"].sort().to_list() == every["tokens"].sort().to_list()


def test_distill_notebook(tmp_path):
    out, nb = run("03_distill", tmp_path)
    runs = pl.read_parquet(out / "runs.parquet")
    assert runs["loss"].to_list() == ["fkl", "atkd"] and (runs["steps"] == 3).all()
    assert runs["eval_loss"].is_finite().all()
    assert "Worst regressions: 2_atkd" in (out / "tokens_report.html").read_text()  # the runs, token by token
    assert any("change in KL under 1_fkl" in html for html in static_html_outputs(nb))


def test_ablations_notebook(tmp_path):
    out, nb = run("06_ablations", tmp_path)
    runs = pl.read_parquet(out / "runs.parquet")
    assert runs["loss"].to_list() == ["kd-on-hard", "kd-on-easy"] and runs["kl_change_hard"].is_finite().all()
    printed = "".join(o.get("text", "") for cell in nb.cells for o in cell.get("outputs", []))
    winner = runs.sort("eval_loss")["loss"][0]
    assert f"{winner} gives the lower held-out loss" in printed  # the conclusion follows this run's numbers


def test_teacher_size_notebook(tmp_path):
    out, _ = run("04_teacher_size", tmp_path)
    runs = pl.read_parquet(out / "runs.parquet")
    assert len(runs) == 4 and set(runs["loss"]) == {"fkl", "atkd"}
    assert set(runs["teacher_from"]) == {"cache"} and len(list((out / "caches").glob("*/meta.json"))) == 2
    conclusion = (out / "conclusion.txt").read_text()
    best_fkl = runs.filter(pl.col("loss") == "fkl").sort("eval_loss")["teacher"][0]
    assert conclusion.startswith("With fkl:") and best_fkl in conclusion.splitlines()[0]


def test_workshop_notebook(tmp_path):
    out, nb = run("05_workshop", tmp_path)
    sweep = pl.read_parquet(out / "sweep.parquet")
    assert sweep["weighted_dkd"].to_list()[-1] < sweep["weighted_dkd"].to_list()[0]
    assert ((sweep["tkd"] + sweep["weighted_dkd"] - sweep["kl"]).abs() < 1e-6).all()


def test_rollouts_notebook(tmp_path):
    out, nb = run("07_rollouts", tmp_path)
    table = pl.read_parquet(out / "rollouts.parquet")
    assert set(table["response_from"]) == {"data", "student"} and set(table["sample"]) == {0, 1}
    bias = pl.read_csv(out / "exposure_bias.csv")
    student = bias.filter(pl.col("response_from") == "student").row(0, named=True)
    printed = "".join(o.get("text", "") for cell in nb.cells for o in cell.get("outputs", []))
    assert f"reverse KL {student['rkl']:.3f} on the student's responses" in printed  # computed from the numbers
    assert any("student sample 1" in html for html in static_html_outputs(nb))


def test_cross_tokenizer_notebook(tmp_path):
    from kdviz.analysis import GroupTable

    out, nb = run("08_cross_tokenizer", tmp_path)
    table = GroupTable.load(out / "groups.parquet")
    summary = json.loads((out / "summary.json").read_text())
    assert table.df["doc_id"].n_unique() == 3 and summary["groups"] == len(table)
    printed = "".join(o.get("text", "") for cell in nb.cells for o in cell.get("outputs", []))
    assert f"{summary['one_to_one']:.1%} of {summary['groups']} groups are one-to-one" in printed
    html = "\n".join(static_html_outputs(nb))
    assert "¦" in html and "merged-one-side" in html  # a merged group drawn as one box with its parts
