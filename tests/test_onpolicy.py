"""On-policy distillation: the loss on a generated batch equals TRL GKD's, the step's writer and its responses depend
on the seed and the step only (any layout, resume), and a teacher cache is refused."""

import json
import signal
from functools import partial

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from kdviz.cache import build
from kdviz.data import from_records
from kdviz.train import DistillConfig, DistillTrainer, distill
from kdviz.train.onpolicy import step_writer
from kdviz.train.trainer import batch_dict

RECORDS = [{"prompt": f"Write function number {i} of the module.", "response": f"def f{i}(a):\n    return a + {i}\n"}
           for i in range(12)]


def trl_jsd():
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    return gkd.GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_on_policy_loss_equals_trl_gkd_on_the_same_generated_batch(pair, tmp_path, beta):
    data = from_records(RECORDS, pair.tokenizer, max_length=64)
    args = DistillConfig(output_dir=str(tmp_path), loss="jsd", loss_params={"beta": beta}, on_policy=1.0,
                         rollout_max_new_tokens=8, rollout_temperature=1.0, max_steps=1, use_cpu=True,
                         per_device_train_batch_size=4, report_to="none")
    student = AutoModelForCausalLM.from_pretrained(pair.student.config._name_or_path)
    trainer = DistillTrainer(model=student, teacher=pair.teacher, args=args, train_dataset=data,
                             processing_class=pair.tokenizer, generation_context=64)
    batch = batch_dict(list(data)[:4], pair.tokenizer.pad_token_id)
    (generated,) = trainer.rollouts.rewrite([batch], step=3, seed=0, student=student, teacher=pair.teacher,
                                            collate=lambda ex: batch_dict(ex, pair.tokenizer.pad_token_id))
    assert not torch.equal(generated["labels"][generated["labels"] != -100], batch["labels"][batch["labels"] != -100])
    ours = trainer.compute_loss(student, generated)
    ours_grad = torch.autograd.grad(ours, student.lm_head.weight)[0]
    ids, mask = generated["input_ids"], generated["attention_mask"]
    student_logits = student(input_ids=ids, attention_mask=mask).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = pair.teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
    theirs = trl_jsd()(student_logits, teacher_logits, labels=generated["labels"][:, 1:], beta=beta)
    theirs_grad = torch.autograd.grad(theirs, student.lm_head.weight)[0]
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-4, atol=1e-7)


def test_the_step_writer_is_a_draw_from_the_seed_and_step():
    writers = [step_writer(0, step, 0.5, False) for step in range(400)]
    assert writers == [step_writer(0, step, 0.5, False) for step in range(400)]  # the same on every call (rank)
    assert 0.4 < writers.count("student") / 400 < 0.6 and set(writers) == {"student", "data"}
    assert {step_writer(0, s, 0.5, True) for s in range(400)} == {"student", "teacher"}
    assert {step_writer(1, s, 1.0, False) for s in range(50)} == {"student"}
    assert {step_writer(1, s, 0.0, False) for s in range(50)} == {"data"}
    assert writers != [step_writer(1, step, 0.5, False) for step in range(400)]


class InterruptAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            signal.raise_signal(signal.SIGINT)


def weights(folder):
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def test_on_policy_runs_do_not_depend_on_the_layout_and_resume_exactly(model_dirs, tmp_path):
    run = partial(distill, model_dirs["teacher"], model_dirs["student"], RECORDS, loss="jsd", steps=4, eval_size=4,
                  learning_rate=1e-2, device="cpu", progress=False, eval_generate_examples=0, on_policy=0.5,
                  seq_kd=True, rollout_max_new_tokens=6)
    whole = run(out_dir=tmp_path / "whole", batch_size=4)
    writers = whole.settings["steps_by_writer"]
    assert writers["student"] > 0 and writers["teacher"] > 0 and writers["data"] == 0  # both kinds of step ran
    assert whole.settings["mean_response_tokens"] > 0 and whole.settings["generation_seconds"] > 0
    accumulated = run(out_dir=tmp_path / "accumulated", batch_size=2, gradient_accumulation_steps=2)
    cut = run(out_dir=tmp_path / "cut", batch_size=4, callbacks=[InterruptAt(2)])
    assert cut.interrupted and cut.steps_done == 2
    resumed = run(out_dir=tmp_path / "cut", batch_size=4, resume_from_checkpoint=True)
    assert resumed.steps_done == 4
    reference, initial = weights(tmp_path / "whole"), weights(model_dirs["student"])
    update = max(float((reference[k] - initial[k]).abs().max()) for k in reference)
    for other in ("accumulated", "cut"):
        theirs = weights(tmp_path / other)
        assert max(float((theirs[k] - reference[k]).abs().max()) for k in reference) <= 1e-5 * update, other
    metrics = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert metrics["settings"]["on_policy"] == 0.5 and metrics["settings"]["rollout"]["max_new_tokens"] == 6
    with pytest.raises(ValueError, match="other settings"):
        run(out_dir=tmp_path / "cut", batch_size=4, resume_from_checkpoint=True, on_policy=1.0)


def test_on_policy_refuses_a_teacher_cache_and_bad_settings(pair, model_dirs, tmp_path):
    data = from_records(RECORDS, pair.tokenizer, max_length=64)
    build(pair.teacher, pair.tokenizer, data, tmp_path / "cache", top_k=8, max_length=64, progress=False)
    with pytest.raises(ValueError, match="only the live teacher can score"):
        distill(None, model_dirs["student"], RECORDS, teacher_cache=tmp_path / "cache", max_length=64, steps=1,
                device="cpu", progress=False, on_policy=1.0, eval_size=2)
    for options, says in (({"on_policy": 1.5}, r"on_policy is the probability .* got 1.5"),
                          ({"on_policy": 0.5, "rollout_top_p": 0.0}, "top_p must be")):
        with pytest.raises(ValueError, match=says):
            DistillConfig(output_dir=str(tmp_path), **options)


PROMPTS = [{"prompt": record["prompt"]} for record in RECORDS]


def test_prompt_only_data_trains_when_every_step_generates_and_the_teacher_writes_held_out_references(
        pair, model_dirs, tmp_path):
    run = partial(distill, model_dirs["teacher"], model_dirs["student"], PROMPTS, loss="jsd", steps=2, eval_size=4,
                  batch_size=4, device="cpu", progress=False, eval_generate_examples=2, rollout_max_new_tokens=6,
                  max_length=64)
    result = run(on_policy=1.0, out_dir=tmp_path / "student")
    assert result.settings["steps_by_writer"] == {"student": 2, "teacher": 0, "data": 0}
    assert result.settings["eval_references_by_teacher"] == 4
    assert result.before.tokens > 0 and result.before.loss > 0 and result.after.loss > 0
    assert result.before.rouge_l is not None and result.before.agreement is not None
    cut = run(on_policy=1.0, out_dir=tmp_path / "cut", callbacks=[InterruptAt(1)])
    assert cut.interrupted and cut.steps_done == 1
    resumed = run(on_policy=1.0, out_dir=tmp_path / "cut", resume_from_checkpoint=True)  # the references again
    assert resumed.before == result.before and resumed.after.loss == pytest.approx(result.after.loss, rel=1e-5)
    whole, again = weights(tmp_path / "student"), weights(tmp_path / "cut")
    assert all(torch.allclose(whole[k], again[k], rtol=0, atol=1e-6) for k in whole)
    sequence = run(seq_kd=True, on_policy=0.5)  # the teacher writes whenever the student does not
    assert sequence.settings["steps_by_writer"]["data"] == 0 and sequence.before == result.before
    with pytest.raises(ValueError, match=r"no response.*--on-policy 1, --seq-kd"):
        run(on_policy=0.5)  # some steps would train on the data's responses, which these records lack
    with pytest.raises(ValueError, match="no response"):
        run()


def test_held_out_references_of_prompts_are_the_teachers_greedy_continuations(pair):
    from kdviz.data import pad_id, stop_ids, tokenize
    from kdviz.data import read_data
    from kdviz.train.onpolicy import teacher_references

    prompts = tokenize(read_data(PROMPTS[:3], need_response=False), pair.tokenizer, max_length=64, template="auto",
                       need_response=False)
    assert all(set(example.labels) == {-100} for example in prompts)
    from kdviz.train import split_data
    assert {part.template for part in split_data(prompts, eval_size=1)} == {prompts.template}  # rollouts' stop ids
    written, count = teacher_references(pair.teacher, prompts, tokenizer=pair.tokenizer, context=64, max_new_tokens=6,
                                        pad=pad_id(pair.tokenizer))
    assert count == 3 and written.template == prompts.template
    stops = set(stop_ids(pair.tokenizer, prompts.template))
    for prompt, example in zip(prompts, written):
        ids = torch.tensor([prompt.input_ids])
        greedy = pair.teacher.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=6, pad_token_id=pad_id(pair.tokenizer))[0, ids.shape[1]:].tolist()
        end = next((i + 1 for i, token in enumerate(greedy) if token in stops), len(greedy))
        response = example.input_ids[len(prompt.input_ids):]
        assert example.input_ids[: len(prompt.input_ids)] == prompt.input_ids and response == greedy[:end]
        assert example.labels == [-100] * len(prompt.input_ids) + response
    again, _ = teacher_references(pair.teacher, written, tokenizer=pair.tokenizer, context=64, max_new_tokens=6,
                                  pad=pad_id(pair.tokenizer))
    assert again is written  # examples with targets are kept as they are
