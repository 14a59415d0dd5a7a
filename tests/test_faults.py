"""Bad input and faults: every case gives the right result or a one-line message, and no file is lost.

Each test is a case that was seen giving a wrong result with exit 0, a traceback, or a
destroyed file (issue 9). Interrupted and failing writes are made real: a child process
killed during a write, a writer that fails half-way, a read-only mount and a full tmpfs
(the last two where this machine lets root mount; otherwise a parent that is a file).
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import torch

from kdviz import TokenTable, analyze, load_pair
from kdviz.cli import main
from kdviz.data import load_data, read_data
from kdviz.files import KdvizWarning, write_with

RECORDS = [{"instruction": f"Echo {i}", "input": "the teacher", "output": "the student learns"} for i in range(6)]


def jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def analyze_args(model_dirs, data, out, *extra):
    return ["analyze", "--teacher", model_dirs["teacher"], "--student", model_dirs["student"], "--data", data,
            "--out", out, "--device", "cpu", *extra]


def mount(*args) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


# 1. The cache: atomic entries, broken entries moved aside, unwritable cache a warning ------------------------

def test_a_zero_byte_cache_entry_is_reported_moved_aside_and_recomputed(pair, tmp_path):
    first = analyze(pair, RECORDS, cache_dir=tmp_path, progress=False)
    (entry,) = (tmp_path / "analyze").glob("*.parquet")
    entry.write_bytes(b"")  # what an interrupted in-place write left
    with pytest.warns(KdvizWarning, match=f"Could not read {entry}.*moved it to"):
        again = analyze(pair, RECORDS, cache_dir=tmp_path, progress=False)
    assert again.df.equals(first.df)
    assert len(list((tmp_path / "analyze").glob("*.corrupt-*"))) == 1
    assert TokenTable.load(entry).df.equals(first.df)  # the entry was written again, whole


def test_a_valid_but_empty_cache_entry_is_not_taken_for_a_result(pair, tmp_path):
    first = analyze(pair, RECORDS, cache_dir=tmp_path, progress=False)
    (entry,) = (tmp_path / "analyze").glob("*.parquet")
    first.df.head(0).write_parquet(entry)  # a 0-row parquet, as once seen after a kill
    with pytest.warns(KdvizWarning, match="checksum does not match"):
        again = analyze(pair, RECORDS, cache_dir=tmp_path, progress=False)
    assert again.df.equals(first.df) and len(again) > 0


SLOW_WRITER = """
import sys, time
from kdviz.files import write_with
def slow(temp):
    with open(temp, "wb") as f:
        f.write(b"half of a table")
        f.flush()
        time.sleep(60)
write_with(sys.argv[1], slow)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_a_process_killed_while_writing_leaves_the_old_file(tmp_path, sig):
    target = tmp_path / "table.parquet"
    target.write_bytes(b"the good table")
    # (a background job of a non-interactive shell starts with SIGINT ignored, and a child inherits that: give the
    # child the default disposition, so Python installs its Ctrl-C handler as in a terminal)
    child = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(target)],
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while not list(tmp_path.glob("table.parquet.kdviz-tmp-*")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob("table.parquet.kdviz-tmp-*")), "the child never started writing: no fault was injected"
    child.send_signal(sig)
    child.wait(timeout=60)
    assert target.read_bytes() == b"the good table"


def test_a_writer_failing_half_way_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "table.parquet"
    target.write_bytes(b"the good table")

    def disk_full(temp):
        temp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ValueError, match=f"Could not write the token table {target}: No space left on device. The "
                                         "file already there is unchanged"):
        write_with(target, disk_full, what="token table")
    assert target.read_bytes() == b"the good table" and sorted(p.name for p in tmp_path.iterdir()) == [target.name]


READER = """
import sys
from kdviz import TokenTable
for _ in range(200):
    assert len(TokenTable.load(sys.argv[1])) == int(sys.argv[2])
print("ok")
"""


def test_a_second_process_reading_while_the_table_is_rewritten_never_sees_half_of_it(table_and_path):
    table, path = table_and_path
    reader = subprocess.Popen([sys.executable, "-c", READER, str(path), str(len(table))], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    while reader.poll() is None:
        table.save(path)
    out, err = reader.communicate()
    assert reader.returncode == 0 and out.strip() == "ok", err


@pytest.fixture
def table_and_path(pair, tmp_path):
    table = analyze(pair, RECORDS * 4, cache=False, progress=False)
    return table, table.save(tmp_path / "t.parquet")


def test_an_unwritable_cache_folder_is_a_warning_and_the_table_is_still_written(model_dirs, tmp_path, capsys,
                                                                              monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("KDVIZ_CACHE_DIR", str(blocker / "cache"))
    data, out = jsonl(tmp_path / "d.jsonl", RECORDS), tmp_path / "t.parquet"
    code, stdout, err = run_cli(analyze_args(model_dirs, data, out), capsys)
    assert code == 0 and "kdviz: warning: Cannot write the cache folder" in err
    assert len(TokenTable.load(out)) > 0 and "target tokens" in stdout


def test_a_full_cache_disk_sends_the_table_to_out_with_a_warning(pair, tmp_path, monkeypatch):
    sink = pl.LazyFrame.sink_parquet

    def cache_disk_full(self, path, **kwargs):
        if Path(path).parent.name == "analyze":  # the cache entry, not the parts
            Path(path).write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return sink(self, path, **kwargs)

    monkeypatch.setattr(pl.LazyFrame, "sink_parquet", cache_disk_full)
    out = tmp_path / "out.parquet"
    with pytest.warns(KdvizWarning, match="No space left on device.*written to .*out.parquet only"):
        table = analyze(pair, RECORDS, cache_dir=tmp_path / "cache", out=out, progress=False)
    assert TokenTable.load(out).df.equals(table.df)


@pytest.fixture
def small_mount(tmp_path):
    """A 256 KiB tmpfs (a disk that fills up), or skip where this machine does not let us mount."""
    point = tmp_path / "small"
    point.mkdir()
    if not mount("-t", "tmpfs", "-o", "size=256k", "tmpfs", str(point)):
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    stat = os.statvfs(point)
    (point / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 16 * 1024))  # 16 KiB left
    yield point
    subprocess.run(["umount", str(point)], check=True)


def test_a_really_full_disk_gives_a_message_and_keeps_the_old_table(pair, small_mount):
    out = small_mount / "t.parquet"
    out.write_bytes(b"the good table")
    big = RECORDS * 40  # the table of these is larger than the 16 KiB left on the disk
    with pytest.raises(ValueError, match="No space left on device.*run the same command again to continue"), \
            pytest.warns(KdvizWarning, match="parts go to .*t.parquet.kdviz-tmp-parts"):  # beside --out: full too
        analyze(pair, big, cache_dir=small_mount / "cache", out=out, progress=False, top_k=5)
    assert out.read_bytes() == b"the good table"


def test_a_read_only_output_folder_is_refused_before_any_model_loads(model_dirs, tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    if not mount("-o", "bind,ro", str(folder), str(folder)):
        pytest.skip("cannot bind-mount a read-only folder here (needs root with CAP_SYS_ADMIN)")
    try:
        code, _, err = run_cli(analyze_args(model_dirs, "zoo:docstrings", folder / "t.parquet"), capsys)
    finally:
        subprocess.run(["umount", str(folder)], check=True)
    assert code == 2 and "Cannot write the --out file" in err and "Read-only file system" in err


def test_an_output_below_a_file_is_refused_before_any_model_loads(model_dirs, tmp_path, capsys):
    blocked = tmp_path / "file"
    blocked.write_text("x")
    code, _, err = run_cli(analyze_args(model_dirs, "zoo:docstrings", blocked / "t.parquet"), capsys)
    assert code == 2 and "Cannot write the --out file" in err


# 2. Data paths ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["data/nonexistent.txt", "data/nonexistent", "no_such_folder/", "missing"])
def test_a_data_path_that_does_not_exist_is_an_error_not_text(model_dirs, tmp_path, capsys, path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(analyze_args(model_dirs, path, tmp_path / "t.parquet"), capsys)
    assert code == 2 and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "t.parquet").exists()
    with pytest.raises(ValueError, match="does not exist.*list of texts"):
        read_data(path)


def test_tilde_is_expanded_in_python(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "notes.txt").write_text("the teacher knows more than the student\n" * 3)
    data = load_data("~/notes.txt", tokenizer, max_length=64)
    assert data[0].source.startswith(str(tmp_path / "notes.txt"))


def test_binary_and_table_files_are_refused_with_their_name(model_dirs, tokenizer, tmp_path, table_and_path):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="weights.bin is not a text file"):
        read_data(binary)
    _, table_path = table_and_path
    with pytest.raises(ValueError, match="t.parquet is a kdviz token table"):
        read_data(table_path)
    renamed = tmp_path / "table.txt"
    shutil.copyfile(table_path, renamed)
    with pytest.raises(ValueError, match="table.txt is not a text file .*parquet"):
        read_data(renamed)


def test_a_parquet_of_records_is_read_as_records(tokenizer, tmp_path):
    path = tmp_path / "train.parquet"
    pl.DataFrame(RECORDS).write_parquet(path)
    assert load_data(path, tokenizer, max_length=64)[0].input_ids == load_data(RECORDS, tokenizer, max_length=64)[0].input_ids


def test_a_folder_of_jsonl_files_reads_all_of_them(tokenizer, tmp_path):
    jsonl(tmp_path / "a.jsonl", RECORDS[:2])
    jsonl(tmp_path / "b.jsonl", RECORDS[2:5])
    assert len(load_data(tmp_path, tokenizer, max_length=64)) == 5
    (tmp_path / "notes.txt").write_text("a stray text file")
    with pytest.raises(ValueError, match="holds both record files .* and text files"):
        read_data(tmp_path)


def test_non_utf8_data_names_the_file_and_line(tmp_path, capsys, model_dirs):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(RECORDS[0]).encode() + b"\n" + '{"prompt": "caf\xe9", "response": "x"}\n'.encode("latin1"))
    code, _, err = run_cli(analyze_args(model_dirs, path, tmp_path / "t.parquet"), capsys)
    assert code == 2 and "latin1.jsonl:2: not UTF-8 (byte 0xe9" in err and "iconv" in err
    text = tmp_path / "notes.txt"
    text.write_bytes(b"line one\nline two \xff\n")
    with pytest.raises(ValueError, match="notes.txt:2: not UTF-8"):
        read_data(text)


# 3. The cache key is honest --------------------------------------------------------------------------------

def test_changing_a_few_weights_and_saving_over_the_folder_changes_the_result(model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    teacher = tmp_path / "teacher"
    shutil.copytree(model_dirs["teacher"], teacher)
    first = analyze(load_pair(teacher, model_dirs["student"], device="cpu"), RECORDS, cache_dir=tmp_path, progress=False)
    model = AutoModelForCausalLM.from_pretrained(teacher)
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding.view(-1)[1::97][:300] += 3.0  # a few hundred values, missed by a strided sample
    model.save_pretrained(teacher)
    second = analyze(load_pair(teacher, model_dirs["student"], device="cpu"), RECORDS, cache_dir=tmp_path,
                     progress=False)
    assert second.meta["fingerprint"] != first.meta["fingerprint"]
    assert second.df["kl"].mean() != pytest.approx(first.df["kl"].mean(), rel=1e-6)
    assert len(list((tmp_path / "analyze").glob("*.parquet"))) == 2


def test_moving_a_model_folder_keeps_the_cache(model_dirs, pair, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(model_dirs["teacher"], moved)
    assert load_pair(moved, model_dirs["student"], device="cpu").fingerprint == pair.fingerprint


# 4. Data errors that were silent ---------------------------------------------------------------------------

def test_a_null_response_is_an_error_not_the_text_none(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [RECORDS[0], {"instruction": "x", "input": "", "output": None}])
    with pytest.raises(ValueError, match=r"d.jsonl:2: field 'output' is null, not a string"):
        read_data(path)
    with pytest.raises(ValueError, match=r"field 'output' is of type int \(5\), not a string"):
        read_data([{"instruction": "x", "output": 5}])


def test_a_misspelt_context_field_is_an_error(tmp_path, capsys, model_dirs):
    data = jsonl(tmp_path / "d.jsonl", RECORDS)
    code, _, err = run_cli(analyze_args(model_dirs, data, tmp_path / "t.parquet", "--context-field", "inpt"), capsys)
    assert code == 2 and "No record has the context field 'inpt'" in err


def test_naming_the_fields_keeps_the_input_field_and_the_format(tokenizer):
    detected = load_data(RECORDS, tokenizer, max_length=64)
    named = load_data(RECORDS, tokenizer, max_length=64, prompt_field="instruction", response_field="output")
    assert [ex.input_ids for ex in named] == [ex.input_ids for ex in detected]
    assert "### Input:\nthe teacher" in tokenizer.decode(named[0].input_ids)


# 5. Work destroyed ----------------------------------------------------------------------------------------

def test_out_equal_to_the_data_file_is_refused_and_the_data_kept(model_dirs, tmp_path, capsys):
    data = jsonl(tmp_path / "d.jsonl", RECORDS)
    before = data.read_bytes()
    code, _, err = run_cli(analyze_args(model_dirs, data, data), capsys)
    assert code == 2 and data.read_bytes() == before
    code, _, err = run_cli(analyze_args(model_dirs, tmp_path / "d.jsonl", tmp_path / "t.parquet", "--report",
                                        tmp_path / "t.parquet"), capsys)
    assert code == 2 and "--out and --report are the same file" in err


def test_out_equal_to_the_data_file_is_refused_by_distill(model_dirs, tmp_path, capsys):
    code, _, err = run_cli(["distill", "--teacher", model_dirs["teacher"], "--student", model_dirs["student"],
                            "--data", tmp_path, "--out", tmp_path], capsys)
    assert code == 2 and "--data and --out are the same file" in err


KILL_DURING_ANALYZE_PARTS = 1024  # tokens per part: many parts, so the kill lands between two


def test_analyze_killed_mid_run_keeps_the_old_out_and_resumes_to_the_same_table(tmp_path, monkeypatch):
    monkeypatch.setenv("KDVIZ_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "t.parquet"
    out.write_bytes(b"the good table")
    command = [sys.executable, "-m", "kdviz", "analyze", "--teacher", "zoo:teacher-l", "--student", "zoo:student",
               "--data", "zoo:code", "--limit", "24", "--out", str(out), "--device", "cpu",
               "--part-tokens", str(KILL_DURING_ANALYZE_PARTS)]
    child = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((tmp_path / "cache").glob("analyze/*.parts/part-*.parquet")) and time.time() < deadline:
        time.sleep(0.05)
    assert child.poll() is None, "the analysis finished before it could be killed: no fault was injected"
    assert list((tmp_path / "cache").glob("analyze/*.parts/part-*.parquet")), "no part was written before the kill"
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert out.read_bytes() == b"the good table"
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert re_search(r"reusing [1-9]\d* of \d+ finished parts", resumed.stderr)
    after_resume = TokenTable.load(out).df
    fresh = subprocess.run(command + ["--no-cache"], capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    assert TokenTable.load(out).df.equals(after_resume)


# 7. Tracebacks that became messages -----------------------------------------------------------------------

@pytest.mark.parametrize("extra,message", [
    (["--top-k", "-1"], "top_k must be an integer >= 0, got -1"),
    (["--device", "cuda"], "no CUDA GPU"),
    (["--device", "gpu"], "Unknown device 'gpu'"),
    (["--temperature", "1e-39"], r"temperature must be a number in \[0.001, 1000\], got 1e-39"),
    (["--batch-size", "0"], "batch_size must be an integer >= 1, got 0"),
    (["--k", "0"], "k is the fraction of hard tokens"),
    (["--limit", "0"], "limit must be an integer >= 1, got 0"),
])
def test_bad_analyze_options_get_a_message(model_dirs, tmp_path, capsys, extra, message):
    code, _, err = run_cli(analyze_args(model_dirs, "zoo:docstrings", tmp_path / "t.parquet", *extra), capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert re_search(message, err)


def re_search(pattern, text):
    import re

    return re.search(pattern, text, re.DOTALL) is not None


def test_model_paths_that_are_not_models_get_a_message(model_dirs, tmp_path, capsys, monkeypatch):
    half = tmp_path / "half"
    shutil.copytree(model_dirs["teacher"], half)
    weights = half / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("not a model")
    monkeypatch.chdir(tmp_path)
    cases = [(half, "Could not load model .*half.*copied or downloaded only in part"),
             (notes, r"notes is not a model: it has no config.json \(it holds \['readme.txt'\]\)"),
             ("models/teacher", "not a local folder .*not in the local cache")]
    def no_download(*args, **kwargs):  # a hub download would retry for about 50 s before failing
        raise AssertionError("a hub download was tried for a path that does not exist")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_download)
    monkeypatch.setattr("huggingface_hub.file_download.hf_hub_download", no_download)
    for teacher, message in cases:
        code, _, err = run_cli(["analyze", "--teacher", teacher, "--student", model_dirs["student"], "--data",
                                "zoo:docstrings", "--out", tmp_path / "t.parquet", "--device", "cpu"], capsys)
        assert code == 2 and re_search(message, err), err


DISTILL_CASES = [
    (["--batch-size", "0"], "batch_size must be an integer >= 1, got 0"),
    (["--limit", "1"], "needs at least 2 examples .* the data gave 1"),
    (["--eval-size", "50"], "eval_size=50 leaves nothing to train on: the data has 24 examples"),
    (["--param", "lam=abc"], r"lam='abc' is not allowed; use a number in \[0, 1\] \(got a str\)"),
    (["--steps", "0"], "steps must be an integer >= 1"),
    (["--template", "chat"], "template='chat' needs a tokenizer with a chat template"),
]


@pytest.mark.parametrize("extra,message", DISTILL_CASES)
def test_bad_distill_options_get_a_message(model_dirs, tmp_path, capsys, extra, message):
    data = jsonl(tmp_path / "d.jsonl", RECORDS * 4)
    code, _, err = run_cli(["distill", "--teacher", model_dirs["teacher"], "--student", model_dirs["student"],
                            "--data", data, "--out", tmp_path / "run", "--device", "cpu", "--steps", "1", *extra],
                           capsys)
    assert code == 2 and re_search(message, err), err


def test_errors_on_the_command_line_have_no_traceback(model_dirs, tmp_path):
    done = subprocess.run([sys.executable, "-m", "kdviz", "distill", "--teacher", str(model_dirs["teacher"]),
                           "--student", str(model_dirs["student"]), "--data", "zoo:docstrings", "--out",
                           str(tmp_path / "r"), "--param", "lam=abc"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "lam='abc'" in done.stderr


# 8. distill takes the data options and --limit stops reading ------------------------------------------------

def test_distill_takes_the_data_options_and_limit_stops_reading(model_dirs, tmp_path, capsys):
    records = [{"question": f"Q{i}", "answer": "the student learns " * 30} for i in range(10)]
    data = jsonl(tmp_path / "d.jsonl", records)
    with data.open("a") as handle:
        handle.write("{not json: this line is past the limit\n")
    out = tmp_path / "run"
    code, stdout, err = run_cli(["distill", "--teacher", model_dirs["teacher"], "--student", model_dirs["student"],
                                 "--data", data, "--out", out, "--device", "cpu", "--steps", "2", "--limit", "10",
                                 "--prompt-field", "question", "--response-field", "answer", "--truncate",
                                 "--template", "plain", "--batch-size", "4"], capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["train_examples"] + metrics["settings"]["eval_examples"] == 10
    assert metrics["settings"]["template"] == "plain"
    assert not [p for p in out.iterdir() if p.name.startswith(".kdviz-tmp")]


def test_a_report_that_fails_half_way_leaves_the_old_report(table_and_path, tmp_path, monkeypatch):
    from kdviz import report

    table, _ = table_and_path
    target = tmp_path / "report.html"
    target.write_text("the good report")

    def disk_full(self, data, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(ValueError, match="Could not write the report .*No space left on device.*unchanged"):
        report.write_report(table, target)
    monkeypatch.undo()
    assert target.read_text() == "the good report"


# 9. A second audit: the same failures, reached another way ------------------------------------------------

def test_a_cache_entry_damaged_inside_is_moved_aside_and_never_copied_to_out(pair, tmp_path):
    out = tmp_path / "t.parquet"
    first = analyze(pair, RECORDS * 4, cache_dir=tmp_path / "cache", out=out, progress=False)
    (entry,) = (tmp_path / "cache" / "analyze").glob("*.parquet")
    damaged = bytearray(entry.read_bytes())
    for i in range(200, len(damaged) // 2, 7):  # the footer (what a lazy open reads) stays intact
        damaged[i] ^= 0xFF
    entry.write_bytes(bytes(damaged))
    out.unlink()
    with pytest.warns(KdvizWarning, match=f"Could not read {entry} .*checksum does not match"):
        again = analyze(pair, RECORDS * 4, cache_dir=tmp_path / "cache", out=out, progress=False, lazy=True)
    assert again.df.equals(first.df) and TokenTable.load(out).df.equals(first.df)
    assert len(list(entry.parent.glob("*.corrupt-*"))) == 1


def test_a_signal_arriving_while_an_interrupt_is_reported_still_exits_130_with_the_message(monkeypatch, capsys):
    import kdviz.cli as cli

    class StderrHitByASecondSignal:
        """The first write is cut by a pending Ctrl-C, as polars once delivered one twice."""

        def __init__(self):
            self.hit, self.text = False, ""

        def write(self, text):
            if not self.hit:
                self.hit = True
                raise KeyboardInterrupt
            self.text += text

        def flush(self):
            pass

    stderr = StderrHitByASecondSignal()

    def interrupted_analysis(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.HANDLERS, "analyze", interrupted_analysis)
    monkeypatch.setattr(sys, "stderr", stderr)
    before = signal.getsignal(signal.SIGINT)  # (Python's handler; SIG_IGN in a background job of a script)
    code = main(["analyze", "--teacher", "t", "--student", "s", "--data", "d", "--out", "t.parquet"])
    assert code == 130 and "kdviz analyze: interrupted" in stderr.text and "finished parts are kept" in stderr.text
    assert signal.getsignal(signal.SIGINT) is before  # handlers are put back


def test_a_full_cache_disk_while_parts_are_written_sends_them_beside_out(pair, tmp_path, monkeypatch):
    reference = analyze(pair, RECORDS * 4, cache=False, progress=False, part_tokens=64)
    write = pl.DataFrame.write_parquet

    def cache_disk_full(self, path, *args, **kwargs):
        if ".parts" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, path, *args, **kwargs)

    monkeypatch.setattr(pl.DataFrame, "write_parquet", cache_disk_full)
    out = tmp_path / "out" / "t.parquet"
    with pytest.warns(KdvizWarning, match="No space left on device.*parts go to .*t.parquet.kdviz-tmp-parts"):
        table = analyze(pair, RECORDS * 4, cache_dir=tmp_path / "cache", out=out, progress=False, part_tokens=64)
    assert table.df.equals(reference.df) and TokenTable.load(out).df.equals(reference.df)
    assert sorted(p.name for p in out.parent.iterdir()) == ["t.parquet"]  # the spare parts were removed


HOLD_LOCK = """
import fcntl, sys
handle = open(sys.argv[1], "a")
fcntl.flock(handle, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


@pytest.mark.parametrize("no_cache", [False, True])
def test_a_second_run_of_the_same_analysis_waits_for_the_first_and_reuses_its_result(model_dirs, tmp_path,
                                                                                  monkeypatch, no_cache):
    """With --no-cache too: two identical runs share one parts folder, so the second waits (it used to delete the
    first one's parts under it)."""
    monkeypatch.setenv("KDVIZ_CACHE_DIR", str(tmp_path / "cache"))
    data = jsonl(tmp_path / "d.jsonl", RECORDS * 4)
    def command(out):
        return [sys.executable, "-m", "kdviz", *map(str, analyze_args(model_dirs, data, out)), "--part-tokens", "64",
                *(["--no-cache"] if no_cache and out.name == "b.parquet" else [])]

    subprocess.run(command(tmp_path / "a.parquet"), check=True, capture_output=True, timeout=300)  # entry + lock
    (lock,) = (tmp_path / "cache" / "analyze").glob("*.lock")
    entry = lock.with_suffix(".parquet")
    finished = entry.stat().st_mtime_ns
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # "the first run", still computing
    assert holder.stdout.readline().strip() == "held"
    second = subprocess.Popen(command(tmp_path / "b.parquet"), stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    line, deadline = "", time.time() + 120
    while "another run is computing this same table" not in line and time.time() < deadline:
        line = second.stderr.readline()
    assert "another run is computing this same table" in line, "the second run did not meet the held lock"
    assert second.poll() is None  # it waits
    holder.stdin.close()
    holder.wait(timeout=30)
    _, err = second.communicate(timeout=300)
    assert second.returncode == 0, err
    assert entry.stat().st_mtime_ns == finished  # reused, or (--no-cache) computed into --out: the entry untouched
    assert TokenTable.load(tmp_path / "b.parquet").df.equals(TokenTable.load(tmp_path / "a.parquet").df)


def test_a_full_disk_under_out_leaves_a_good_cache_entry_alone(pair, tmp_path, monkeypatch):
    analyze_module = sys.modules["kdviz.analysis.store"]  # (where the table is copied to --out)
    analyze(pair, RECORDS, cache_dir=tmp_path, progress=False)

    def out_disk_full(source, target):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(analyze_module.shutil, "copyfile", out_disk_full)
    with pytest.raises(ValueError, match="Could not write the token table .*t.parquet: No space left on device"):
        analyze(pair, RECORDS, cache_dir=tmp_path, out=tmp_path / "t.parquet", progress=False)
    assert len(list((tmp_path / "analyze").glob("*.parquet"))) == 1
    assert not list((tmp_path / "analyze").glob("*.corrupt-*"))


def test_analyze_refuses_out_equal_to_its_data_from_python_too(pair, tmp_path):
    data = jsonl(tmp_path / "d.jsonl", RECORDS)
    before = data.read_bytes()
    with pytest.raises(ValueError, match="data and out are the same file"):
        analyze(pair, str(data), out=data, cache=False, progress=False)
    assert data.read_bytes() == before


def test_distill_never_saves_over_a_model_a_cache_or_a_finished_run(model_dirs, tmp_path, capsys):
    student = tmp_path / "student"
    shutil.copytree(model_dirs["student"], student)
    weights = (student / "model.safetensors").read_bytes()
    base = ["distill", "--teacher", model_dirs["teacher"], "--data", jsonl(tmp_path / "d.jsonl", RECORDS * 4),
            "--device", "cpu", "--steps", "1", "--batch-size", "4", "--eval-size", "4"]
    code, _, err = run_cli([*base, "--student", student, "--out", student], capsys)
    assert code == 2 and "already holds a model (config.json" in err
    code, _, err = run_cli([*base, "--student", student, "--out", model_dirs["teacher"]], capsys)
    assert code == 2 and "already holds a model" in err
    assert (student / "model.safetensors").read_bytes() == weights
    done = tmp_path / "done"
    assert run_cli([*base, "--student", student, "--out", done], capsys)[0] == 0
    saved = (done / "metrics.json").read_bytes()
    code, _, err = run_cli([*base, "--student", student, "--out", done], capsys)
    assert code == 2 and "already holds a finished run (" in err
    assert (done / "metrics.json").read_bytes() == saved


def test_resuming_a_finished_run_changes_nothing(model_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["distill", "--teacher", model_dirs["teacher"], "--student", model_dirs["student"], "--data",
            jsonl(tmp_path / "d.jsonl", RECORDS * 4), "--device", "cpu", "--steps", "2", "--save-steps", "1",
            "--batch-size", "4", "--eval-size", "4", "--out", out]
    assert run_cli(args, capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    code, _, err = run_cli([*args, "--resume"], capsys)
    assert code == 2 and "already finished its 2 steps: its student and metrics.json are there; there is nothing to " \
                         "resume" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_resume_refuses_other_inputs_and_a_damaged_checkpoint(model_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    data = jsonl(tmp_path / "d.jsonl", RECORDS * 4)
    base = ["distill", "--teacher", model_dirs["teacher"], "--student", model_dirs["student"], "--device", "cpu",
            "--steps", "3", "--save-steps", "1", "--batch-size", "4", "--out", out]
    assert run_cli([*base, "--data", data, "--eval-size", "4"], capsys)[0] == 0
    shutil.rmtree(out / "checkpoint-3")  # as if it had been interrupted after step 2
    shutil.rmtree(out / "checkpoint-2")
    kept = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    other = jsonl(tmp_path / "other.jsonl", [{**r, "output": "the teacher"} for r in RECORDS * 4])
    for changed, says in ((["--data", other, "--eval-size", "4"], "training examples: .*d.jsonl .*there, .*other.jsonl .*here"),
                          (["--data", data, "--eval-size", "5"], "held-out examples: "),
                          (["--data", data, "--eval-size", "4", "--limit", "20"], "training examples: "),
                          (["--data", data, "--eval-size", "4", "--template", "plain"], "training examples: ")):
        code, _, err = run_cli([*base, *changed, "--resume"], capsys)
        assert code == 2 and re_search("written by a run made from other inputs .*" + says, err), (changed, err)
        assert "Traceback" not in err
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == kept  # the refusals changed nothing
    weights = out / "checkpoint-1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # half-copied
    code, _, err = run_cli([*base, "--data", data, "--eval-size", "4", "--resume"], capsys)
    assert code == 2 and "checkpoint-1 is damaged: model.safetensors has changed since it was written" in err, err
    weights.write_bytes(b"")
    mark = out / "checkpoint-1" / "kdviz_checkpoint.json"
    edited = json.loads(mark.read_text())
    mark.write_text(json.dumps({**edited, "files": {}}))  # an edited mark that no longer lists the damaged file
    code, _, err = run_cli([*base, "--data", data, "--eval-size", "4", "--resume"], capsys)
    assert code == 2 and "damaged: kdviz_checkpoint.json has changed since it was written" in err, err
    mark.write_text(mark.read_text()[:40])
    code, _, err = run_cli([*base, "--data", data, "--eval-size", "4", "--resume"], capsys)
    assert code == 2 and f"The checkpoint mark {mark} cannot be read" in err and "Traceback" not in err, err


def test_a_model_folder_without_a_tokenizer_gets_a_message(model_dirs, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(model_dirs["student"] / name, bare / name)
    code, _, err = run_cli(analyze_args({"teacher": model_dirs["teacher"], "student": bare}, "zoo:docstrings",
                                        tmp_path / "t.parquet"), capsys)
    assert code == 2 and "has no tokenizer" in err and "tokenizer.save_pretrained" in err


def test_demo_and_notebooks_check_their_out_folder_first(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before --out was checked")

    monkeypatch.setattr("kdviz.cli.demo.load_pair", no_model)
    code, _, err = run_cli(["demo", "--out", blocker / "demo"], capsys)
    assert code == 2 and "Cannot write the --out folder" in err
    code, _, err = run_cli(["notebooks", "--out", blocker], capsys)
    assert code == 2 and "is a file, not a folder" in err


def test_data_mistakes_that_were_silent_are_errors(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="empty string"):
        read_data("")
    with pytest.raises(ValueError, match="fields must differ.*prompt 'output'.*response 'output'"):
        read_data(RECORDS, prompt_field="output", response_field="output")
    with pytest.raises(ValueError, match="fields must differ.*prompt 'instruction'.*response 'instruction'"):
        read_data(RECORDS, response_field="instruction")  # the detected prompt field, named as the response
    notes = tmp_path / "notes.txt"
    notes.write_text("the teacher knows more than the student\n")
    with pytest.raises(ValueError, match="prompt_field='q' names a record field, but .* is plain text"):
        read_data(notes, prompt_field="q")
    with pytest.raises(ValueError, match="template='alpaca' formats prompt/response records, but .* is plain text"):
        load_data(notes, tokenizer, max_length=64, template="alpaca")


def test_a_context_too_short_for_every_zoo_pair_says_so(tokenizer):
    with pytest.raises(ValueError, match="None of the .* docstring pairs of zoo:docstrings fits a context of 4 tokens"):
        load_data("zoo:docstrings", tokenizer, max_length=4)


def test_a_byte_order_mark_is_not_read_as_text(tokenizer, tmp_path):
    plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
    plain.write_text("the teacher knows more than the student\n")
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert load_data(marked, tokenizer, max_length=64)[0].input_ids == load_data(plain, tokenizer, max_length=64)[0].input_ids
    records = jsonl(tmp_path / "plain.jsonl", RECORDS)
    (tmp_path / "marked.jsonl").write_bytes(b"\xef\xbb\xbf" + records.read_bytes())
    texts = lambda path: [(r.prompt, r.context, r.response) for r in read_data(path).records]  # noqa: E731
    assert texts(tmp_path / "marked.jsonl") == texts(records)


def test_loss_parameters_and_names_of_other_types(tmp_path):
    import numpy as np

    from kdviz.losses import get_loss

    assert get_loss("atkd", lam=np.float32(0.25)).params["lam"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="Unknown loss \\['fkl'\\]"):
        get_loss(["fkl"])
    with pytest.raises(ValueError, match="fused must be True or False, got 'yes'"):
        get_loss("fkl", fused="yes")


@pytest.mark.parametrize("extra,message", [
    (["--lr", "-1"], r"learning rate must be a finite number > 0, got -1.0. \(CLI: --lr\)"),
    (["--seed", "-1"], r"seed must be an integer in \[0, 2\*\*32\), got -1"),
    (["--loss", "okd", "--param", "lam=0.5"], "loss='okd' distils with okd_base='fkl', so its parameters are that "
                                              "loss's: Loss 'fkl' has no parameter"),
])
def test_more_bad_distill_options_get_a_message_before_any_model_loads(tmp_path, capsys, extra, message):
    code, _, err = run_cli(["distill", "--teacher", "no/such-model", "--student", "no/such-model", "--data",
                            "zoo:docstrings", "--out", tmp_path / "run", *extra], capsys)
    assert code == 2 and re_search(message, err), err


def test_output_paths_through_a_link_and_with_two_suffixes(table_and_path, tmp_path, capsys):
    table, _ = table_and_path
    target = tmp_path / "results" / "t.parquet"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "latest.parquet"
    link.symlink_to(target)
    table.save(link)
    assert link.is_symlink() and TokenTable.load(target).df.equals(table.df)
    code, _, err = run_cli(["analyze", "--teacher", "t", "--student", "s", "--data", "zoo:code", "--out",
                            tmp_path / "t.parquet", "--report", tmp_path / "r.html.gz"], capsys)
    assert code == 2 and f"--report {tmp_path / 'r.html'}." in err


def test_a_cache_inside_the_data_folder_is_refused_both_ways(model_dirs, tmp_path, capsys, pair):
    from kdviz.cache import build

    data = tmp_path / "data"
    data.mkdir()
    jsonl(data / "train.jsonl", RECORDS)
    code, _, err = run_cli(["teacher-cache", "--teacher", model_dirs["teacher"], "--data", data, "--out",
                            data / "cache", "--device", "cpu"], capsys)
    assert code == 2 and "is inside the --data folder" in err and not (data / "cache").exists()
    build(pair.teacher, pair.tokenizer, load_data(data, pair.tokenizer, max_length=64), data / "cache", top_k=4,
          progress=False)  # (made from Python, where no --data folder is known)
    with pytest.raises(ValueError, match=r"holds a kdviz teacher cache \(.*cache\), which is not data"):
        read_data(data)


def test_loaders_say_what_they_expected(pair, tmp_path):
    from kdviz.cache import TeacherCache, build

    records = tmp_path / "records.parquet"
    pl.DataFrame(RECORDS).write_parquet(records)
    with pytest.raises(ValueError, match="is a parquet file but not a kdviz token table: it lacks the columns"):
        TokenTable.load(records)
    cache = build(pair.teacher, pair.tokenizer, load_data(RECORDS, pair.tokenizer, max_length=64), tmp_path / "c",
                  top_k=4, progress=False)
    meta = json.loads((cache.folder / "meta.json").read_text())
    (cache.folder / "meta.json").write_text(json.dumps({**meta, "temperature": 2.0}, indent=2))  # an edited meta.json
    with pytest.raises(ValueError, match="damaged: meta.json has changed since it was written"):
        TeacherCache.open(cache.folder)
    with pytest.raises(ValueError, match="is not a teacher cache \\(no meta.json\\)"):
        TeacherCache.open(tmp_path)


def test_api_arguments_are_range_checked_where_they_are_read(pair):
    from kdviz.cache import build

    data = load_data(RECORDS, pair.tokenizer, max_length=64)
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype .* got 'bf16'"):
        load_pair("zoo:teacher-s", "zoo:student", dtype="bf16")
    with pytest.raises(ValueError, match="batch_tokens must be an integer >= 1, got 0"):
        build(pair.teacher, pair.tokenizer, data, "/nonexistent/never-made", batch_tokens=0)
