"""The paper's teaching-mode ablations as a study: runs from a teacher cache, a table, a conclusion computed from
the numbers (it follows them whichever way they go)."""

import polars as pl

from kdviz.studies import study_conclusion, study_table, teaching_mode_study

RECORDS = [{"prompt": f"def f{i}(a, b):\n", "response": f"    return a + {i} * b\n"} for i in range(12)]


def test_the_study_runs_each_loss_and_seed_from_one_cache(model_dirs, tmp_path):
    runs = teaching_mode_study(str(model_dirs["teacher"]), str(model_dirs["student"]), RECORDS,
                               losses=("kd-on-hard", "kd-on-easy"), seeds=(0, 1), steps=2, cache_dir=tmp_path,
                               top_k=16, batch_size=4, eval_size=3, device="cpu", progress=False,
                               eval_generate_examples=0, max_length=64)
    assert runs.select("loss", "seed").rows() == [("kd-on-hard", 0), ("kd-on-easy", 0), ("kd-on-hard", 1),
                                                   ("kd-on-easy", 1)]
    assert runs["kl_change_hard"].is_finite().all() and (runs["probe_seconds"] > 0).all()
    assert len(list(tmp_path.iterdir())) == 1  # the teacher ran once: one cache
    table = study_table(runs)
    assert table["seeds"].to_list() == [2, 2] and table["eval_loss"].is_finite().all()


def test_the_conclusion_follows_the_numbers():
    def runs(hard, easy):
        return pl.DataFrame({"loss": ["kd-on-hard", "kd-on-easy"] * 3, "seed": [0, 0, 1, 1, 2, 2],
                             "eval_loss": [hard, easy, hard + 0.01, easy, hard, easy - 0.01],
                             "kl_change_hard": [-0.1] * 6, "kl_change_easy": [-0.2] * 6})
    assert "kd-on-hard gives the lower held-out loss by 0.493 nats on average (kd-on-hard lower in 3 of 3 seeds)" \
        in study_conclusion(runs(4.0, 4.5))
    assert "kd-on-easy gives the lower held-out loss" in study_conclusion(runs(4.5, 4.0))
    assert "in 0 of 3 seeds" in study_conclusion(runs(4.5, 4.0))
