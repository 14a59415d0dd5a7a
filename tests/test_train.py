import json
import signal
import subprocess
import sys
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from conftest import tiny_gpt2
from kdviz import load_pair
from kdviz.data import from_records
from kdviz.losses import get_loss
from kdviz.train import DistillConfig, DistillTrainer, distill, evaluate_student
from kdviz.train.evaluate import rouge_l
from kdviz.train.okd import OnlineAdapter
from kdviz.train.trainer import batch_dict as _batch_dict
from kdviz.train.trainer import disable_dropout

RECORDS = [{"prompt": f"def f{i}(a, b):\n    \"\"\"Return the sum.\"\"\"\n", "response": "    return a + b\n"}
           for i in range(6)] + [{"prompt": "The teacher knows", "response": " more than the student."}] * 4


def config(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                    logging_steps=1, disable_tqdm=True, use_cpu=True, eval_generate_examples=2,
                    eval_generate_tokens=4)
    return DistillConfig(**{**defaults, **kwargs})


def make_trainer(tokenizer, tmp_path, **kwargs):
    data = from_records(RECORDS, tokenizer, max_length=64)
    student, teacher = tiny_gpt2(tokenizer, seed=2).train(), tiny_gpt2(tokenizer, n_embd=32, n_layer=2, seed=1)
    return DistillTrainer(model=student, teacher=teacher, args=config(tmp_path, **kwargs), train_dataset=data,
                          eval_dataset=data, processing_class=tokenizer), data


@pytest.mark.parametrize("loss,params", [("fkl", {}), ("atkd", {"lam": 0.3}), ("atkd", {"base": "rkl"}),
                                         ("jsd", {"beta": 0.5})])
@pytest.mark.parametrize("fused_linear", [True, False])
def test_step_loss_and_gradients_match_the_plain_loss_on_shifted_logits(tokenizer, tmp_path, loss, params,
                                                                         fused_linear):
    trainer, data = make_trainer(tokenizer, tmp_path, loss=loss, loss_params=params, ce_weight=0.5,
                                 fused_linear=fused_linear)
    assert trainer.use_linear == fused_linear
    batch = _batch_dict(list(data)[:4], tokenizer.pad_token_id)
    student = trainer.model.eval()  # no dropout: both passes see the same network
    ours = trainer.compute_loss(student, batch)
    ours_grads = torch.autograd.grad(ours, list(student.parameters()))

    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        t_logits = trainer.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    reference = get_loss(loss, fused=False, **params)(logits, t_logits, labels) + 0.5 * F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    ref_grads = torch.autograd.grad(reference, list(student.parameters()))
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_training_moves_the_student_not_the_teacher_and_logs_hard_easy_parts(tokenizer, tmp_path):
    trainer, _ = make_trainer(tokenizer, tmp_path, loss="atkd")
    teacher_before = [p.clone() for p in trainer.teacher.parameters()]
    student_before = [p.clone() for p in trainer.model.parameters()]
    trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, trainer.teacher.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(student_before, trainer.model.parameters()))
    logs = [entry for entry in trainer.state.log_history if "kd" in entry]
    assert len(logs) == 3
    for entry in logs:
        assert entry["kd_hard"] + entry["kd_easy"] == pytest.approx(entry["kd"], rel=1e-5)
        assert entry["loss"] == pytest.approx(entry["kd"], rel=1e-4)  # ce_weight 0
        assert 0 <= entry["unc"] <= 1


def test_okd_trains_a_small_adapter_and_keeps_the_teacher_frozen(tokenizer, tmp_path):
    trainer, _ = make_trainer(tokenizer, tmp_path, loss="okd", okd_rank=2, okd_pull=0.5)
    assert isinstance(trainer.adapter, OnlineAdapter)
    adapter_params = sum(p.numel() for p in trainer.adapter.parameters())
    assert adapter_params <= 0.05 * sum(p.numel() for p in trainer.teacher.parameters())
    up_before = trainer.adapter.up.weight.clone()
    assert torch.count_nonzero(up_before) == 0  # starts as the identity: the plain teacher
    teacher_before = [p.clone() for p in trainer.teacher.parameters()]
    trainer.train()
    assert not torch.equal(up_before, trainer.adapter.up.weight)
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, trainer.teacher.parameters()))
    logs = [entry for entry in trainer.state.log_history if "adapter_ce" in entry]
    assert len(logs) == 3 and all(entry["adapter_pull"] >= 0 for entry in logs)


def test_evaluate_reports_loss_agreement_and_rouge(tokenizer, tmp_path, pair):
    data = from_records(RECORDS, tokenizer, max_length=64)
    result = evaluate_student(pair, data, batch_size=3, generate_examples=2, max_new_tokens=4)
    ids, mask, labels = (_batch_dict(list(data), tokenizer.pad_token_id)[k] for k in ("input_ids", "attention_mask",
                                                                                     "labels"))
    teacher, student = pair.logits(ids, mask)
    valid = labels[:, 1:] != -100
    ce = F.cross_entropy(student[:, :-1][valid], labels[:, 1:][valid])
    agreement = (student[:, :-1][valid].argmax(-1) == teacher[:, :-1][valid].argmax(-1)).float().mean()
    assert result.tokens == int(valid.sum())
    assert result.loss == pytest.approx(float(ce), rel=1e-5)
    assert result.agreement == pytest.approx(float(agreement))
    assert 0 <= result.rouge_l < 1


def test_rouge_l_is_one_for_a_model_that_learned_the_response(tokenizer):
    data = from_records(RECORDS[:1], tokenizer, max_length=64)
    model = tiny_gpt2(tokenizer, n_embd=32, seed=3).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = _batch_dict(list(data), tokenizer.pad_token_id)
    for _ in range(60):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    model.eval()
    assert rouge_l(model, tokenizer, list(data), max_new_tokens=32) == pytest.approx(1.0)
    assert rouge_l(tiny_gpt2(tokenizer, seed=4), tokenizer, list(data), max_new_tokens=32) < 0.5
    plain_text = from_records([{"prompt": "", "response": "return a + b"}], tokenizer, max_length=64)
    assert rouge_l(model, tokenizer, list(plain_text), max_new_tokens=8) is None  # no prompt to continue


@pytest.mark.parametrize("kwargs,message", [
    ({"loss": "kl"}, "Unknown loss 'kl'; choose one of fkl, rkl"),
    ({"loss": "atkd", "loss_params": {"lam": 2}}, "lam=2 is not allowed"),
    ({"loss": "fkl", "loss_params": {"lam": 0.2}}, "has no parameter"),
    ({"ce_weight": -1}, "ce_weight must be a finite number >= 0, got -1"),
    ({"ce_weight": float("inf")}, "ce_weight must be a finite number >= 0, got inf"),
    ({"loss": "okd", "okd_base": "ce"}, "okd_base must be one of .*, got 'ce'"),
    ({"okd_rank": 0}, "okd_rank must be an integer >= 1, got 0"),
    ({"atkd_split": "batch"}, "atkd_split must be one of 'global', 'micro_batch', got 'batch'"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be an integer >= 1, got 0"),
    ({"loss": "okd", "okd_learning_rate": -1.0}, "okd_learning_rate must be a finite number > 0, got -1.0"),
    ({"loss": "okd", "okd_learning_rate": float("nan")}, "okd_learning_rate must be a finite number > 0, got nan"),
    ({"weight_decay": float("inf")}, "weight_decay must be a finite number >= 0, got inf"),
    ({"learning_rate": float("nan")}, "learning rate must be a finite number > 0, got nan"),
    ({"warmup_steps": 1000, "max_steps": 300}, "warmup_steps=1000 is more than the run's 300 steps"),
])
def test_config_rejects_bad_settings_with_what_is_allowed(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **kwargs)


def test_config_fields_carry_help():
    from dataclasses import fields

    names = ("loss", "loss_params", "ce_weight", "okd_rank", "okd_pull", "atkd_split", "keep_dropout")
    ours = [f for f in fields(DistillConfig) if f.name in names]
    assert len(ours) == len(names) and all(f.metadata.get("help") for f in ours)


def test_distill_saves_a_loadable_student_and_metrics(model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    result = distill(model_dirs["teacher"], model_dirs["student"], RECORDS * 2, loss="fkl", steps=12, out_dir=out,
                     eval_size=4, batch_size=4, learning_rate=1e-2, device="cpu", progress=False,
                     eval_generate_examples=2, eval_generate_tokens=4)
    curves = result.curves()
    assert len(curves) == 12 and curves[-1]["kd"] < curves[0]["kd"]  # the student moves toward the teacher
    assert result.after.agreement >= result.before.agreement
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["after"]["loss"] == pytest.approx(result.after.loss)
    assert saved["settings"]["train_examples"] == 16 and saved["settings"]["eval_examples"] == 4
    original = AutoModelForCausalLM.from_pretrained(model_dirs["student"]).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert any(not torch.equal(original[k], trained[k]) for k in original)
    pair = load_pair(model_dirs["teacher"], out, device="cpu")  # the tokenizer was saved with the student
    assert pair.vocab_size == len(pair.tokenizer)


def test_distill_without_out_dir_writes_nothing_where_it_runs(model_dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # once made ./kdviz-out/distill in whatever folder a notebook ran in
    result = distill(model_dirs["teacher"], model_dirs["student"], RECORDS * 2, loss="fkl", steps=1, eval_size=4,
                     batch_size=4, device="cpu", progress=False, eval_generate_examples=0)
    assert result.steps_done == 1 and result.out_dir is None
    assert list(tmp_path.iterdir()) == []


def test_cli_distill_runs_and_reports(model_dirs, tmp_path):
    out = tmp_path / "cli-run"
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in RECORDS * 2))
    cmd = [sys.executable, "-m", "kdviz.cli", "distill", "--teacher", str(model_dirs["teacher"]), "--student",
           str(model_dirs["student"]), "--data", str(data), "--loss", "atkd", "--param", "lam=0.3", "--steps", "4",
           "--eval-size", "4", "--batch-size", "4", "--out", str(out), "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "eval loss" in done.stdout and (out / "config.json").exists()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["settings"]["loss_params"]["lam"] == 0.3 and saved["steps"] == 4

    bad = subprocess.run(cmd[:10] + ["--loss", "kl", "--out", str(tmp_path / "x")], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "Unknown loss 'kl'" in bad.stderr and "Traceback" not in bad.stderr


def test_trainer_evaluate_reports_and_logs_the_student_metrics(tokenizer, tmp_path):
    from kdviz.pair import ModelPair

    trainer, data = make_trainer(tokenizer, tmp_path, loss="fkl")
    metrics = trainer.evaluate()
    direct = evaluate_student(ModelPair(trainer.teacher, trainer.model, tokenizer), data, batch_size=8,
                              generate_examples=2, max_new_tokens=4)
    assert metrics["eval_loss"] == pytest.approx(direct.loss) and metrics["eval_agreement"] == pytest.approx(
        direct.agreement)
    assert trainer.state.log_history[-1]["eval_loss"] == metrics["eval_loss"]
    assert trainer.model.training  # evaluation puts the student back in training mode


def test_a_non_finite_loss_stops_training_with_a_clear_error(tokenizer, tmp_path):
    trainer, data = make_trainer(tokenizer, tmp_path, loss="fkl")
    with torch.no_grad():
        trainer.teacher.get_output_embeddings().weight[0, 0] = float("nan")
    batch = _batch_dict(list(data)[:4], tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="Step 0: teacher logits contain NaN or \\+inf"):
        trainer.compute_loss(trainer.model, batch)


def soft_capped_student(tokenizer):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(5)
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=0.5,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                          bos_token_id=tokenizer.eos_token_id)
    return Gemma2ForCausalLM(config).eval()


def test_a_soft_capped_head_falls_back_to_the_models_own_logits(tokenizer, tmp_path):
    data = from_records(RECORDS, tokenizer, max_length=64)
    student, teacher = soft_capped_student(tokenizer), tiny_gpt2(tokenizer, n_embd=32, n_layer=2, seed=1)
    trainer = DistillTrainer(model=student, teacher=teacher, args=config(tmp_path, loss="fkl"), train_dataset=data,
                             processing_class=tokenizer)
    assert not trainer.use_linear
    batch = _batch_dict(list(data)[:4], tokenizer.pad_token_id)
    ours = trainer.compute_loss(student, batch)
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    assert logits.abs().max() <= 0.5  # the cap is real, so head(hidden) would be the wrong logits
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    torch.testing.assert_close(ours, get_loss("fkl", fused=False)(logits, t_logits, batch["labels"][:, 1:]))
    with pytest.raises(ValueError, match="OKD adapts the teacher's final hidden state"):
        DistillTrainer(model=student, teacher=teacher, args=config(tmp_path, loss="okd"), train_dataset=data,
                       processing_class=tokenizer)


@pytest.mark.parametrize("keep", [False, True])
def test_the_students_dropout_is_off_while_distilling_unless_kept(tokenizer, tmp_path, keep):
    trainer, data = make_trainer(tokenizer, tmp_path, loss="fkl", keep_dropout=keep)
    batch = _batch_dict(list(data)[:4], tokenizer.pad_token_id)
    student = trainer.model.train()  # as each training step sets it
    assert student.config.resid_pdrop > 0  # the model has dropout to turn off
    first, second = (student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                     for _ in range(2))
    assert torch.equal(first, second) != keep


def test_disable_dropout_reaches_attention_dropout_that_is_a_float():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, attention_dropout=0.5))
    disable_dropout(model)
    assert model.model.layers[0].self_attn.attention_dropout == 0.0


class InterruptAt(TrainerCallback):
    """Ctrl-C (SIGINT to this process) at the end of one step, once distill handles it."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler, "distill must catch Ctrl-C"
            signal.raise_signal(signal.SIGINT)


def test_an_interrupted_okd_run_resumes_to_the_uninterrupted_student(model_dirs, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    run = partial(distill, model_dirs["teacher"], model_dirs["student"], RECORDS * 2, loss="okd", steps=6,
                  eval_size=4, batch_size=4, learning_rate=1e-2, device="cpu", progress=False,
                  eval_generate_examples=2, eval_generate_tokens=4, okd_rank=2, okd_base="atkd")
    whole = run(out_dir=tmp_path / "whole")
    cut = run(out_dir=tmp_path / "cut", callbacks=[InterruptAt(2)])
    assert cut.interrupted and cut.steps_done == 2 and cut.after is None
    assert cut.checkpoint == str(tmp_path / "cut" / "checkpoint-2")
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["interrupted"]
    assert not (tmp_path / "cut" / "config.json").exists()  # the student is in the checkpoint, not yet in --out
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run .*checkpoint-2.*--resume"):
        run(out_dir=tmp_path / "cut")
    with pytest.raises(ValueError, match="other settings \\(loss='okd' there, 'fkl' here"):
        run(out_dir=tmp_path / "cut", resume_from_checkpoint=True, loss="fkl")

    import transformers.trainer

    warned = []
    monkeypatch.setattr(transformers.trainer.logger, "warning", lambda message, *a, **k: warned.append(message))
    resumed = run(out_dir=tmp_path / "cut", resume_from_checkpoint=True)
    assert not resumed.interrupted and resumed.steps_done == 6
    assert not [m for m in warned if "missing keys" in m]  # the tied LM head is not reported as missing
    assert resumed.before == cut.before  # measured at the start and stored, not measured again
    initial = AutoModelForCausalLM.from_pretrained(model_dirs["student"]).state_dict()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "whole").state_dict()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "cut").state_dict()
    difference = max(float((ours[k] - reference[k]).abs().max()) for k in reference)
    update = max(float((reference[k] - initial[k]).abs().max()) for k in reference)
    assert difference <= 1e-6 * update  # the adapter, optimizer and schedule came back too
    assert [e["kd"] for e in resumed.curves()] == pytest.approx([e["kd"] for e in whole.curves()], rel=1e-6)


def test_resume_without_a_checkpoint_says_so(model_dirs, tmp_path, capsys):
    from kdviz.cli import main

    code = main(["distill", "--teacher", str(model_dirs["teacher"]), "--student", str(model_dirs["student"]),
                 "--data", "zoo:docstrings", "--out", str(tmp_path / "empty"), "--resume"])
    assert code == 2
    assert "No complete checkpoint in" in capsys.readouterr().err


def test_only_a_tied_head_is_left_out_of_the_missing_keys(tokenizer):
    from kdviz.train.trainer import untied_missing_keys

    model = tiny_gpt2(tokenizer)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert untied_missing_keys(model, ["lm_head.weight"]) == []
    assert untied_missing_keys(model, ["lm_head.weight", "transformer.h.0.attn.c_attn.weight"]) == [
        "transformer.h.0.attn.c_attn.weight"]
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untied: really missing
    assert untied_missing_keys(model, ["lm_head.weight"]) == ["lm_head.weight"]


def test_a_diverging_run_says_it_diverged(tokenizer, tmp_path):
    trainer, _ = make_trainer(tokenizer, tmp_path, loss="fkl", learning_rate=1e9, max_steps=6, optim="sgd")
    with pytest.raises(ValueError, match="training diverged: the student weights are NaN or infinite after [1-9]\\d* "
                                         "optimizer step\\(s\\) \\(learning rate 1000000000.0"):
        trainer.train()


def test_distill_takes_warmup_steps_from_the_caller(tokenizer, model_dirs, tmp_path):
    result = distill(model_dirs["teacher"], model_dirs["student"], RECORDS, loss="fkl", steps=2, batch_size=4,
                     eval_size=2, device="cpu", progress=False, warmup_steps=2, eval_generate_examples=0)
    assert result.steps_done == 2


def test_the_trainer_hooks_kdviz_overrides_are_still_there():
    """kdviz overrides private Trainer hooks (kdviz.train.trainer's module doc names the versions): fail loudly
    when transformers renames one or changes its parameters, instead of training a different student."""
    import inspect

    from transformers import Trainer

    from kdviz.train.trainer import UNDO_GA_DIVISION

    expected = {"get_batch_samples": ["epoch_iterator", "num_batches", "device"],
                "compute_loss": ["model", "inputs", "return_outputs", "num_items_in_batch"],
                "training_step": ["model", "inputs", "num_items_in_batch"], "create_optimizer": ["model"],
                "log": ["logs", "start_time"], "_save_checkpoint": ["model", "trial"],
                "_load_from_checkpoint": ["resume_from_checkpoint", "model"],
                "_issue_warnings_after_load": ["load_result"], "_get_train_sampler": ["train_dataset"]}
    for name, parameters in expected.items():
        found = list(inspect.signature(getattr(Trainer, name)).parameters)[1:]
        assert found == parameters, f"Trainer.{name}{tuple(found)}: kdviz was written for {tuple(parameters)}"
    if UNDO_GA_DIVISION:  # before transformers 5.19: the loss is divided by this many micro-batches
        assert "current_gradient_accumulation_steps" in inspect.getsource(Trainer.training_step)
    else:
        assert "loss_is_scaled_for_ga" in inspect.getsource(Trainer.training_step)
