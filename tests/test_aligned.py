"""Distillation across tokenizers (kdviz.train.aligned): the trainer's loss equals TRL's ULDLoss on the same
models and texts, the result does not depend on how the global batch is cut, and what does not fit is refused.
The pair: zoo:smollm2-student (SmolLM2's 49,152 tokens) teaching the zoo GPT-2 student (8,192 tokens)."""

import copy
import os

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.gold.gold_config import GOLDConfig  # noqa: E402
from trl.experimental.gold.gold_trainer import ULDLoss  # noqa: E402

from kdviz.analysis.crosstok import aligned_examples  # noqa: E402
from kdviz.data import IGNORE_INDEX, pad_id, read_data  # noqa: E402
from kdviz.pair import load_pair  # noqa: E402
from kdviz.train import DistillConfig, DistillTrainer, distill  # noqa: E402
from kdviz.train.aligned import AlignedTeacher, aligned_dataset  # noqa: E402
from kdviz.train.trainer import batch_dict  # noqa: E402

OPTIONS = dict(template="auto", max_length=96, truncate=True)


@pytest.fixture(scope="module")
def pair():
    return load_pair("zoo:smollm2-student", "zoo:student", device="cpu")


@pytest.fixture(scope="module")
def source():
    return read_data("zoo:docstrings", limit=8)


def trainer_for(pair, dataset, student=None, *, loss="uld", batch=2, accumulation=1, steps=1, optim="adamw_torch",
                lr=1e-3):
    args = DistillConfig(output_dir="/tmp/kdviz-test-aligned", loss=loss, max_steps=steps, learning_rate=lr, optim=optim,
                         per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                         lr_scheduler_type="constant", disable_tqdm=True, use_cpu=True, seed=0)
    student = (student or copy.deepcopy(pair.student)).float().requires_grad_(True)
    return DistillTrainer(model=student, source=AlignedTeacher(pair.teacher, vocabulary=pair.vocabulary), args=args,
                          train_dataset=dataset, processing_class=pair.tokenizer)


def trl_inputs(model, ids, before, tokens):
    """TRL's inputs for one side of one text: logits [1, L, V], labels (the response's tokens, then its end token,
    which TRL skips), ids, byte offsets."""
    ids = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, before:] = ids[0, before:]
    offsets = torch.zeros(1, ids.shape[1], 2, dtype=torch.long)
    offsets[0, before:] = torch.tensor(tokens.offsets)
    return logits, labels, ids, offsets


@pytest.mark.parametrize("objective", ["uld", "gold"])
def test_trainer_loss_equals_trls_uld_loss(pair, source, objective):
    whole = dict(template="auto", max_length=256, truncate=False)  # TRL skips the last token, which must be the end
    texts = aligned_examples(pair, source, limit=3, **whole)
    dataset = aligned_dataset(pair, source, limit=3, **whole)
    trainer = trainer_for(pair, dataset, loss=objective)
    with torch.no_grad():
        ours = trainer.compute_loss(trainer.model, batch_dict(list(dataset), pad_id(pair.tokenizer)))

    config = GOLDConfig(output_dir="unused", use_uld_loss=True, uld_use_hybrid_loss=objective == "gold",
                        report_to=[], bf16=False)
    trl_loss = ULDLoss(config, student_tokenizer=pair.tokenizer, teacher_tokenizer=pair.teacher_tokenizer)
    per_text = []
    for text in texts:  # TRL averages a text's groups: one text at a time, weighted by its groups below
        s_logits, s_labels, s_ids, s_offsets = trl_inputs(trainer.model, text.inputs("student"),
                                                          len(text.student_before), text.alignment.student)
        t_logits, t_labels, t_ids, t_offsets = trl_inputs(pair.teacher, text.inputs("teacher"),
                                                          len(text.teacher_before), text.alignment.teacher)
        per_text.append(trl_loss(s_logits, t_logits, s_labels, t_labels, s_ids, t_ids, student_byte_offsets=s_offsets,
                                 teacher_byte_offsets=t_offsets))
    groups = torch.tensor([len(ex.groups) for ex in dataset], dtype=torch.float32)
    torch.testing.assert_close(ours, (torch.stack(per_text) * groups).sum() / groups.sum(), rtol=1e-5, atol=1e-6)


def reference_cross_atkd(pair, dataset, student, lam=0.2, k=0.5):
    """ATKD on the analysis's group quantities (`group_stats`: u, TKD, DKD over the matched vocabulary), one
    plain forward per text and model, split over all the texts' groups."""
    from kdviz.losses import TokenSplit
    from kdviz.maths.groups import group_stats
    from kdviz.maths.split import atkd_weights

    def rows(model, ids):  # row i predicts token i (row 0 unused)
        ids = torch.tensor([ids])
        log_probs = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float().log_softmax(-1)
        return torch.cat([log_probs[:1], log_probs[:-1]]), ids[0]

    stats = []
    for ex in dataset:
        with torch.no_grad():
            t_rows, t_ids = rows(pair.teacher, ex.teacher_ids)
        s_rows, s_ids = rows(student, ex.input_ids)
        stats.append(group_stats(t_rows[:, : pair.vocabulary.teacher_size], t_ids,
                                 s_rows[:, : pair.vocabulary.student_size], s_ids, ex.groups,
                                 pair.vocabulary.student_of_teacher))
    unc = torch.cat([st.unc for st in stats])
    weights = atkd_weights(unc, {"lam": lam, "k": k}, split=TokenSplit.over(unc, k))
    tkd, dkd = torch.cat([st.tkd for st in stats]), torch.cat([st.dkd_matched for st in stats]).nan_to_num(0.0)
    return (weights[:, 0] * tkd + weights[:, 1] * dkd).sum(), unc


def test_cross_atkd_is_atkd_on_the_analysis_group_quantities_values_and_gradients(pair, source):
    dataset = aligned_dataset(pair, source, limit=4, **OPTIONS)
    trainer = trainer_for(pair, dataset, loss="cross-atkd")
    ours = trainer.compute_loss(trainer.model, batch_dict(list(dataset), pad_id(pair.tokenizer)))
    theirs, unc = reference_cross_atkd(pair, dataset, trainer.model)
    params = [p for p in trainer.model.parameters()]
    ours_grad = torch.autograd.grad(ours, params)
    theirs_grad = torch.autograd.grad(theirs, params)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    for a, b in zip(ours_grad, theirs_grad):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    side = trainer.source.prepare(trainer.kd, batch_dict(list(dataset), pad_id(pair.tokenizer)), linear=False)
    torch.testing.assert_close(side.unc, unc, rtol=1e-5, atol=1e-7)
    assert 0 < int(side.groups.single.sum()) < len(unc)  # both kinds: groups with DKD and groups with TKD only


@pytest.mark.parametrize("objective", ["uld", "cross-atkd"])
def test_layout_does_not_change_the_student(pair, source, objective):
    """With SGD: ULD's sort makes its gradient jump where two tail probabilities tie, so rounding (other padding)
    can swap a pair's ranks; the gradient moves by about those tiny probabilities, which Adam would scale up to a
    full step for rows that only the tail reaches. The learning rate is large so that the update (about 0.3) is far
    above float32's rounding of the weights themselves (a norm of about 3e-8 here, 1e-5 of an update at 1e-3)."""
    dataset = aligned_dataset(pair, source, limit=8, **OPTIONS)
    start = [p.detach().clone() for p in pair.student.parameters()]
    students = []
    for batch, accumulation in ((4, 1), (2, 2)):
        trainer = trainer_for(pair, dataset, loss=objective, batch=batch, accumulation=accumulation, steps=3,
                              optim="sgd", lr=0.1)
        trainer.train()
        students.append([p.detach() for p in trainer.model.parameters()])
    update = torch.cat([(a - w).flatten() for a, w in zip(students[0], start)]).norm()
    difference = torch.cat([(a - b).flatten() for a, b in zip(*students)]).norm()
    assert update > 0
    assert difference / update < 1e-5, f"layouts differ by {float(difference / update):.2e} of the update"


def test_the_data_must_be_built_for_both_tokenizers(pair, source):
    from kdviz.data import tokenize

    student_only = tokenize(source, pair.tokenizer, max_length=96, limit=4, truncate=True)
    with pytest.raises(ValueError, match="built for both tokenizers"):
        trainer_for(pair, student_only)


def test_losses_that_do_not_fit_the_pair_are_refused(tmp_path):
    options = dict(data="zoo:docstrings", limit=8, steps=1, device="cpu", progress=False)
    with pytest.raises(ValueError, match="different tokenizers.*--loss uld, gold or cross-atkd"):
        distill("zoo:smollm2-student", "zoo:student", loss="fkl", **options)
    with pytest.raises(ValueError, match="share one tokenizer.*token-level objectives"):
        distill("zoo:teacher-s", "zoo:student", loss="uld", **options)
    with pytest.raises(ValueError, match="top-k teacher cache holds the teacher's rows on the student's tokens"):
        distill(None, "zoo:student", loss="gold", teacher_cache=tmp_path, **options)
    with pytest.raises(ValueError, match="generated responses"):
        DistillConfig(output_dir=str(tmp_path), loss="uld", on_policy=0.5)
    with pytest.raises(ValueError, match=r"Unknown parameter\(s\) \['k'\] for loss 'gold'; allowed: merge, beta"):
        DistillConfig(output_dir=str(tmp_path), loss="gold", loss_params={"k": 0.5})
    with pytest.raises(ValueError, match=r"\['merge'\] for loss 'cross-atkd'; allowed: teacher_temperature, "
                                         r"student_temperature, lam, k"):
        DistillConfig(output_dir=str(tmp_path), loss="cross-atkd", loss_params={"merge": "bayesian"})
    with pytest.raises(ValueError, match="k \\(the fraction of hard groups\\) must be a number in"):
        DistillConfig(output_dir=str(tmp_path), loss="cross-atkd", loss_params={"k": 0})
    with pytest.raises(ValueError, match="uld, gold or cross-atkd.*cross-atkd is ATKD on those groups"):
        distill("zoo:smollm2-student", "zoo:student", loss="atkd", **options)
    with pytest.raises(ValueError, match="share one tokenizer"):
        distill("zoo:teacher-s", "zoo:student", loss="cross-atkd", **options)


def test_cli_distils_across_tokenizers(tmp_path, capsys):
    from kdviz.cli import main

    out = tmp_path / "run"
    assert main(["distill", "--teacher", "zoo:smollm2-student", "--student", "zoo:student", "--data", "zoo:docstrings",
                 "--limit", "12", "--loss", "gold", "--steps", "2", "--batch-size", "2", "--max-length", "96",
                 "--truncate", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "n/a" in printed and "not comparable id by id" in printed
    assert (out / "metrics.json").is_file() and (out / "model.safetensors").is_file()


def test_a_teacher_with_the_smaller_vocabulary_distils_and_is_evaluated(tmp_path):
    """zoo:teacher-s (8,192 tokens) teaching zoo:smollm2-student (49,152): evaluation builds its pair across
    tokenizers too (it once checked the teacher's 8,192 rows against the student's 49,152 tokens)."""
    result = distill("zoo:teacher-s", "zoo:smollm2-student", "zoo:docstrings", loss="cross-atkd", limit=12, steps=2,
                     batch_size=2, max_length=64, truncate=True, device="cpu", progress=False,
                     eval_generate_examples=0)
    assert result.after.agreement is None and result.after.loss == result.after.loss  # (not NaN)
    assert result.after.loss != result.before.loss  # (step 1 is the warm-up's, at learning rate 0)
