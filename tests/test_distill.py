import math

import pytest
import torch
import torch.nn.functional as F

from slimformer import models
from slimformer.errors import SlimformerError
from slimformer.evaluate import evaluate, torch_runner
from slimformer.stages.distill import DistillConfig, check_same_tokenizer, distill, evenly_spaced, kd_loss, make_student
from slimformer.stages.finetune import FinetuneConfig, finetune
from slimformer.testing import tiny_bert, tiny_ner_task, tiny_sst2_task

FAST = {"batch_size": 8, "precision": "fp32", "logging_steps": 1000}


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5]])
    t = torch.tensor([[0.5, 3.0, -1.0]])
    y = torch.tensor([1])
    T, alpha = 2.0, 0.3
    p_t = [math.exp(x / T) for x in (0.5, 3.0, -1.0)]
    p_t = [x / sum(p_t) for x in p_t]
    p_s = [math.exp(x / T) for x in (1.0, 2.0, 0.5)]
    p_s = [x / sum(p_s) for x in p_s]
    kl = sum(a * math.log(a / b) for a, b in zip(p_t, p_s, strict=True))
    q = [math.exp(x) for x in (1.0, 2.0, 0.5)]
    ce = -math.log(q[1] / sum(q))
    expected = alpha * ce + (1 - alpha) * T * T * kl
    assert math.isclose(kd_loss(s, t, y, alpha, T).item(), expected, rel_tol=1e-5)


def test_alpha_one_is_plain_cross_entropy():
    s, t, y = torch.randn(5, 4), torch.randn(5, 4), torch.randint(0, 4, (5,))
    assert torch.isclose(kd_loss(s, t, y, 1.0, 3.0), F.cross_entropy(s, y))


def test_large_temperature_becomes_logit_matching():
    # As T grows, T^2 KL -> (1 / 2C) * sum((d - mean d)^2), with d = teacher - student logits (Hinton et al.).
    s, t = torch.randn(1, 6, dtype=torch.float64), torch.randn(1, 6, dtype=torch.float64)
    d = (t - s)[0]
    limit = ((d - d.mean()) ** 2).sum().item() / (2 * 6)
    assert math.isclose(kd_loss(s, t, None, 0.0, 1000.0).item(), limit, rel_tol=1e-3)


def test_token_level_kd_ignores_masked_positions():
    s, t = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    t2 = t.clone()
    t2[mask == 0] = 100.0  # anything at padding must not matter
    assert torch.isclose(kd_loss(s, t, None, 0.0, 2.0, mask), kd_loss(s, t2, None, 0.0, 2.0, mask))


def test_evenly_spaced_layers():
    assert evenly_spaced(3, 6) == [0, 2, 4]
    assert evenly_spaced(6, 6) == list(range(6))
    assert evenly_spaced(1, 6) == [0]
    with pytest.raises(SlimformerError):
        evenly_spaced(7, 6)


@pytest.mark.parametrize("task", ["sequence-classification", "token-classification"])
def test_student_with_all_layers_reproduces_teacher(task):
    teacher = tiny_bert(task)
    student = make_student(teacher, [0, 1])
    enc = teacher.tokenizer(["a charming journey", "Peter Blackburn"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        assert torch.equal(student.model(**enc).logits, teacher.model(**enc).logits)


def test_smaller_student_saves_and_reloads(tmp_path):
    student = make_student(tiny_bert(num_hidden_layers=4), [1, 3])
    assert student.config.num_hidden_layers == 2 and student.record["student_of"]["layers"] == [1, 3]
    out = models.save(student, tmp_path / "s")
    again = models.load(out)
    enc = student.tokenizer(["hello there"], return_tensors="pt")
    with torch.inference_mode():
        assert torch.equal(again.model(**enc).logits, student.model(**enc).logits)
    with pytest.raises(SlimformerError, match="do not exist"):
        make_student(tiny_bert(), [0, 5])


def test_distillation_transfers_the_teacher(tmp_path):
    task = tiny_sst2_task()
    teacher = tiny_bert(num_hidden_layers=2)
    finetune(teacher, task, FinetuneConfig(epochs=6, learning_rate=3e-3, **FAST), tmp_path / "t", progress=False)
    assert evaluate(torch_runner(teacher.model), teacher.tokenizer, task, bootstrap=0)["value"] == 1.0
    cfg = DistillConfig(num_layers=1, alpha=0.0, temperature=2.0, epochs=6, learning_rate=3e-3,
                        hidden_weight=1.0, attention_weight=0.5, **FAST)
    student, summary = distill(teacher, task, cfg, tmp_path / "s", progress=False)
    assert student.config.num_hidden_layers == 1 and summary["layer_map"] == [0]
    # alpha=0: the student never saw a label, only the teacher, and still learns the task.
    assert evaluate(torch_runner(student.model), student.tokenizer, task, bootstrap=0)["value"] == 1.0


def test_token_classification_distillation_runs(tmp_path):
    task = tiny_ner_task()
    teacher = tiny_bert("token-classification")
    student, summary = distill(teacher, task, DistillConfig(num_layers=1, epochs=1, **FAST), tmp_path / "s",
                               progress=False)
    assert summary["steps"] > 0 and student.config.num_hidden_layers == 1


@pytest.mark.parametrize("cache", [False, True])
def test_teacher_cache_avoids_recomputing(tmp_path, cache):
    task = tiny_sst2_task(n_train=16)  # 2 training batches of 8 per epoch, 1 tuning batch per evaluation
    teacher = tiny_bert()
    student = make_student(teacher, [0])
    calls = []
    teacher.model.register_forward_hook(lambda m, i, o: calls.append(1))
    cfg = DistillConfig(num_layers=1, epochs=3, cache_teacher=cache, **FAST)
    distill(teacher, task, cfg, tmp_path / "s", student=student, progress=False)
    evaluations = 3
    # Without the cache the teacher runs on every training batch; with it, only in the first epoch.
    assert len(calls) == (2 if cache else 6) + evaluations


def test_different_tokenizers_are_refused():
    teacher = tiny_bert()

    class Other:
        def get_vocab(self):
            return {"a": 0}

    with pytest.raises(SlimformerError, match="different tokenizers"):
        check_same_tokenizer(teacher, Other())


def test_augmented_copies_are_deterministic_and_varied():
    from slimformer.augment import augment_words

    sents = [f"the film was really very good number {i}".split() for i in range(50)]
    a = augment_words(sents, 2, mask_token="[MASK]", seed=1)
    assert a == augment_words(sents, 2, mask_token="[MASK]", seed=1)
    assert a != augment_words(sents, 2, mask_token="[MASK]", seed=2)
    assert 0.8 * 100 < len(a) <= 100  # identical copies are dropped, and few are identical
    assert all(s not in sents for s in a)
    flat = [w for s in a for w in s]
    assert 0.05 < flat.count("[MASK]") / len(flat) < 0.2  # p_mask = 0.1
    assert any(len(s) <= 5 for s in a)  # n-gram spans
    assert set(flat) <= {w for s in sents for w in s} | {"[MASK]"}  # swaps draw from the corpus' words


def test_unlabeled_rows_get_soft_targets_only():
    s, t = torch.randn(4, 2), torch.randn(4, 2)
    unlabeled = torch.full((4,), -100)
    kd_only = kd_loss(s, t, None, alpha=0.0, temperature=2.0)
    assert torch.allclose(kd_loss(s, t, unlabeled, alpha=0.5, temperature=2.0), 0.5 * kd_only)
    mixed = torch.tensor([1, -100, 0, -100])
    ce = F.cross_entropy(s[[0, 2]], mixed[[0, 2]])
    assert torch.allclose(kd_loss(s, t, mixed, alpha=0.5, temperature=2.0), 0.5 * kd_only + 0.5 * ce)


@pytest.mark.parametrize("kind", ["seq", "ner"])
def test_distillation_with_transfer_text(tmp_path, kind):
    task = tiny_sst2_task() if kind == "seq" else tiny_ner_task()
    teacher = tiny_bert("sequence-classification" if kind == "seq" else "token-classification")
    text = tmp_path / "transfer.txt"
    text.write_text("a few unlabeled words\n\nmore text here\n")
    cfg = DistillConfig(num_layers=1, epochs=1, augment=2, transfer_text=str(text), **FAST)
    student, summary = distill(teacher, task, cfg, tmp_path / "s", progress=False)
    # 2 transfer lines + about 2 copies of every training example, each seen once.
    assert 2 + len(task.train) < summary["transfer_examples"] <= 2 + 2 * len(task.train)
    assert summary["steps"] > 0


def test_bad_transfer_text(tmp_path):
    task = tiny_sst2_task()
    teacher = tiny_bert()
    with pytest.raises(SlimformerError, match="does not exist"):
        distill(teacher, task, DistillConfig(num_layers=1, transfer_text=str(tmp_path / "no.txt"), **FAST),
                tmp_path / "s", progress=False)
    with pytest.raises(SlimformerError, match="classification tasks"):
        from slimformer.testing import tiny_gpt2, tiny_lm_task

        distill(tiny_gpt2(), tiny_lm_task(), DistillConfig(num_layers=1, augment=1, **FAST), tmp_path / "s2",
                progress=False)


def test_distilling_leaves_the_teacher_reusable(tmp_path):
    # The search distils several students (and recovers pruned ones) from one loaded teacher: a KD run
    # must not freeze it, or every later student copied from it has nothing to train.
    task = tiny_sst2_task(n_train=16)
    teacher = tiny_bert(num_hidden_layers=2)
    distill(teacher, task, DistillConfig(num_layers=1, epochs=1, **FAST), tmp_path / "a", progress=False)
    assert all(p.requires_grad for p in teacher.model.parameters())
    for p in teacher.model.parameters():
        p.requires_grad_(False)  # even a frozen teacher gives a trainable student
    student = make_student(teacher, [1])
    assert all(p.requires_grad for p in student.model.parameters())
    _, summary = distill(teacher, task, DistillConfig(epochs=1, **FAST), tmp_path / "b", student=student,
                         progress=False)
    assert summary["steps"] > 0
