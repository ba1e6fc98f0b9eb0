"""Training: loss, distillation, metrics, data batching, end-to-end runs, resume, DDP."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import runpy
import platform
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import pyarrow.parquet as pq
import yaml

from pipeline.config import from_dict, load_section
from pipeline.evaluation import EvaluateConfig, evaluate_run
from pipeline.metrics import blocked_ranks, hit_rate, mrr, ndcg, summarize
from pipeline.models import odmt
from pipeline.models.odmt import VARIANTS, ModelConfig, UserEncoder
from pipeline.scoring import ScoreConfig, score_run
from pipeline import ddp
from pipeline.training import TrainConfig, build_model, checkpoint, load_trained, trainer
from pipeline.sequences import left_pad
from pipeline.training.data import epoch_batches, load_sequences, ranked_users
from pipeline.training.distillation import DistillConfig, distillation_terms, ramp_weight, soft_cross_entropy
from pipeline.training.loss import BLOCKED, branch_logits, cross_entropy, in_batch, log_popularity
from pipeline.training.trainer import evaluate, set_up, train, train_step
from tests.toy import excluded_items, full_ranks, make_toy_dataset, ragged

ROOT = Path(__file__).resolve().parents[1]


# --- loss -------------------------------------------------------------------------------------


def test_in_batch_loss_by_hand():
    slots = torch.tensor([[0, 1, 2], [3, 1, 4]])  # user 0 is left-padded
    log_p = torch.log(torch.tensor([1.0, 0.5, 0.2, 0.2, 0.1]))  # made-up p per item 0..4
    batch = in_batch(slots, slots.flatten(), 0, log_p)
    # supervised (input and target real): u0 1->2, u1 3->1, u1 1->4 (flat positions 1, 2, 3)
    assert batch.rows.tolist() == [1, 2, 3]
    assert batch.targets.tolist() == [2, 4, 5]
    # candidates are the slots [0, 1, 2, 3, 1, 4]: padding and the row's own items are blocked,
    # except its target slot (u1's item 1 is blocked in u0's slot too: it is in u1's sequence)
    expected = torch.tensor([[1, 1, 0, 0, 1, 0], [1, 1, 0, 1, 0, 1], [1, 1, 0, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(batch.blocked, expected)

    h = torch.tensor([[[9.0], [1.0]], [[2.0], [3.0]]])  # (B, L, d=1) user states
    e = torch.tensor([[5.0], [1.0], [2.0], [3.0], [1.0], [4.0]])  # candidate vectors
    items = slots.flatten()
    logits = branch_logits(h, e, batch)
    loss = cross_entropy(logits, batch)
    expected_loss = 0.0
    for r, (state, target) in enumerate([(1.0, 2), (2.0, 4), (3.0, 5)]):
        z = [state * e[c, 0].item() - log_p[items[c]].item() for c in range(6)]
        open_cols = [c for c in range(6) if not expected[r, c]]
        assert all(logits[r, c].item() == BLOCKED for c in range(6) if expected[r, c])
        assert all(math.isclose(logits[r, c].item(), z[c], rel_tol=1e-6) for c in open_cols)
        expected_loss += -z[target] + math.log(sum(math.exp(z[c]) for c in open_cols))
    assert math.isclose(loss.item(), expected_loss / 3, rel_tol=1e-5)
    without_logq = in_batch(slots, slots.flatten(), 0, None)
    assert torch.equal(without_logq.log_q, torch.zeros(6))


def test_a_row_whose_target_is_padding_is_never_supervised():
    # Training sequences are left-padded, so a padding target there always comes with a padding
    # input; this batch also has padding after real items (a right-padded row, a gap), where only
    # the target is padding: those rows must not be supervised either, whatever the input.
    slots = torch.tensor([[1, 2, 0], [3, 0, 4], [0, 5, 6]])
    batch = in_batch(slots, slots.flatten(), 0, None)
    # supervised: u0 1->2, u2 5->6 (flat positions 0 and 5); never u0 2->pad, u1 3->pad or pad->4
    assert batch.rows.tolist() == [0, 5]
    assert batch.targets.tolist() == [1, 8]
    assert not (slots.flatten()[batch.targets] == 0).any()


def test_log_popularity_uses_training_counts_and_stays_finite():
    log_p = log_popularity(torch.tensor([0, 3, 1, 0]))
    assert torch.isfinite(log_p).all()
    assert math.isclose(log_p[1].item(), math.log(3 / 6), rel_tol=1e-6)  # zeros clamped to 1: 1+3+1+1


def test_gathered_candidates_keep_this_ranks_targets():
    slots = torch.tensor([[1, 2, 3]])
    other_rank = torch.tensor([5, 2, 6])
    batch = in_batch(slots, torch.cat([other_rank, slots.flatten()]), offset=3, log_p=None)
    assert batch.targets.tolist() == [4, 5]
    assert batch.blocked[0].tolist() == [False, True, False, True, False, True]  # item 2 blocked in both ranks' slots


def test_gathered_negatives_put_each_rows_target_in_this_ranks_own_slots(toy, monkeypatch):
    """DDP with train.gather_negatives on rank 1 of 2: the candidates are rank 0's slots, then
    this rank's, so each row's target column is offset by rank 0's slots and holds its own next item."""
    cfg = toy_config(toy, gather_negatives=True)
    env, data, model, *_ = set_up(cfg)
    rank_1 = ddp.Distributed(rank=1, world_size=2, local_rank=0, device=env.device)
    slots, other_rank = data.train[:4], data.train[4:8]
    with torch.no_grad():
        states, vectors = model(slots)
        _, other_vectors = model(other_rank)
    monkeypatch.setattr(ddp, "gather", lambda x: torch.cat([other_rank.flatten(), x]))
    monkeypatch.setattr(ddp, "gather_with_grad", lambda x: torch.cat([other_vectors.flatten(1, 2).transpose(0, 1), x]))
    seen = []
    real_in_batch = trainer.in_batch
    monkeypatch.setattr(trainer, "in_batch", lambda *args: seen.append((args[1], real_in_batch(*args))) or seen[-1][1])
    trainer.batch_losses(states, vectors, slots, model.branches, cfg, rank_1, None, 0.0)
    candidates, batch = seen[0]
    next_items = slots[:, 1:].flatten()[batch.rows]
    assert torch.equal(candidates[batch.targets], next_items)
    assert (batch.targets >= other_rank.numel()).all()  # this rank's slots, not rank 0's equal items


# --- distillation -----------------------------------------------------------------------------


def test_ramp_weight_values():
    assert math.isclose(ramp_weight(1, 20), math.exp(-5 * 0.95**2))
    assert ramp_weight(20, 20) == 1.0 and ramp_weight(31, 20) == 1.0
    assert ramp_weight(10, 20) < ramp_weight(11, 20)
    assert ramp_weight(1, 0) == 0.0 and ramp_weight(7, 0) == 0.0
    assert ramp_weight(1, 0.5) == 0.5 and ramp_weight(30, 0.5) == 0.5


def test_soft_cross_entropy_by_hand():
    student = torch.zeros(1, 2)
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    # tau 1: softmax(teacher) = (3/4, 1/4), log softmax(student) = log 1/2 -> log 2
    assert math.isclose(soft_cross_entropy(student, teacher, 1.0).item(), math.log(2), rel_tol=1e-6)
    # tau 0.5 multiplies by tau^2; the student's uniform log-probs still give log 2
    assert math.isclose(soft_cross_entropy(student, teacher, 0.5).item(), 0.25 * math.log(2), rel_tol=1e-6)
    student = torch.tensor([[1.0, 0.0]])
    p = [0.75, 0.25]
    q = [math.exp(1) / (math.exp(1) + 1), 1 / (math.exp(1) + 1)]
    assert math.isclose(soft_cross_entropy(student, teacher, 1.0).item(), -sum(a * math.log(b) for a, b in zip(p, q)), rel_tol=1e-6)
    # tau 0.5 inside both softmaxes, with a student that is not uniform: teacher / tau = (2 log 3, 0)
    # gives (9/10, 1/10), student / tau = (2, 0) gives (e^2, 1) / (e^2 + 1); times tau^2 = 1/4
    p = [0.9, 0.1]
    q = [math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)]
    expected = 0.25 * -sum(a * math.log(b) for a, b in zip(p, q))
    assert math.isclose(soft_cross_entropy(student, teacher, 0.5).item(), expected, rel_tol=1e-6)


def branch_logits_for_kd(branches=("id", "text", "image")) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {b: torch.randn(3, 5, requires_grad=True) for b in branches}


@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize(
    "pair, student, teachers",
    [("text_from_id", "text", ["id"]), ("image_from_id", "image", ["id"]), ("id_from_ens", "id", ["text", "image"])],
)
def test_each_pair_teaches_its_student_and_the_teacher_learns_only_when_live(pair, student, teachers, detach):
    logits = branch_logits_for_kd()
    distillation_terms(logits, DistillConfig(tau=0.5, detach_teacher=detach))[pair].backward()
    assert logits[student].grad is not None and logits[student].grad.abs().sum() > 0
    for teacher in teachers:  # the teacher side: a gradient only when it is not detached
        assert (logits[teacher].grad is None) == detach
    untouched = set(logits) - {student, *teachers}
    assert all(logits[b].grad is None for b in untouched)


def test_the_id_teacher_is_the_mean_of_the_branch_logits():
    logits = branch_logits_for_kd()
    terms = distillation_terms(logits, DistillConfig(tau=0.7))
    ensemble = (logits["id"] + logits["text"] + logits["image"]) / 3
    assert torch.equal(terms["id_from_ens"], soft_cross_entropy(logits["id"], ensemble, 0.7))
    assert torch.equal(terms["text_from_id"], soft_cross_entropy(logits["text"], logits["id"], 0.7))
    assert torch.equal(terms["image_from_id"], soft_cross_entropy(logits["image"], logits["id"], 0.7))
    two = distillation_terms({b: logits[b] for b in ("id", "text")}, DistillConfig(tau=0.7))  # no image branch
    assert sorted(two) == ["id_from_ens", "text_from_id"]
    assert torch.equal(two["id_from_ens"], soft_cross_entropy(logits["id"], (logits["id"] + logits["text"]) / 2, 0.7))


@pytest.mark.parametrize("pair", ["text_from_id", "image_from_id", "id_from_ens"])
def test_switching_a_pair_off_removes_exactly_that_term(pair):
    logits = branch_logits_for_kd()
    every = distillation_terms(logits, DistillConfig())
    fewer = distillation_terms(logits, dataclasses.replace(DistillConfig(), **{pair: False}))
    assert set(every) - set(fewer) == {pair}
    assert all(torch.equal(fewer[name], every[name]) for name in fewer)


def test_a_live_teacher_is_sharpened_onto_the_students_top_item():
    # Why params.yaml detaches the teacher: even when teacher and student already agree, the
    # soft cross-entropy (unlike a KL divergence) still has a gradient w.r.t. the teacher, and
    # it moves the teacher's mass onto the student's top item.
    student = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    teacher = student.clone().requires_grad_(True)
    soft_cross_entropy(student, teacher, tau=1.0).backward()
    before, after = student.softmax(1), (teacher - teacher.grad).softmax(1)

    def entropy(p):
        return -(p * p.log()).sum().item()

    assert after[0, 0] > before[0, 0] and entropy(after) < entropy(before)

# --- metrics ----------------------------------------------------------------------------------


def test_full_ranks_exclude_history_and_padding():
    scores = torch.tensor([[9.0, 1.0, 5.0, 3.0, 4.0], [9.0, 2.0, 2.0, 1.0, 0.0], [0.0, 1.0, 5.0, 3.0, 4.0]])
    targets = torch.tensor([3, 1, 2])
    excluded = torch.tensor([[2, 0], [0, 0], [2, 4]])  # user 0 has seen item 2; user 2's target 2 is excluded
    # user 0: item 2 (5.0) excluded, padding excluded, item 4 (4.0) beats 3.0 -> rank 2
    # user 1: item 2 ties with the target -> counts against it -> rank 2
    # user 2: the target is among the excluded items: it cannot be hit
    assert full_ranks(scores, targets, excluded).tolist() == [2, 2, math.inf]
    history = np.array([2, 4])
    assert excluded_items(history, 2, "all").tolist() == [2, 4]
    assert excluded_items(history, 2, "all_but_target").tolist() == [4]  # repeated target: rankable
    assert full_ranks(scores[2:], targets[2:], torch.tensor([[4, 0]])).tolist() == [1]
    ranks = torch.tensor([1, 10, 11])
    assert math.isclose(hit_rate(ranks, 10), 2 / 3)
    assert math.isclose(ndcg(ranks, 10), (1 + 1 / math.log2(11)) / 3)
    assert math.isclose(mrr(ranks, 10), (1 + 0.1) / 3)
    assert summarize([float("inf")], (5,)) == {"hr@5": 0.0, "ndcg@5": 0.0, "mrr@5": 0.0}


def test_blocked_ranks_equal_full_ranks_with_ties_excluded_targets_and_padding():
    generator = torch.Generator().manual_seed(0)
    # small integers: every product and sum is exact in float32, so any block split scores
    # bit for bit as the full product, and ties are frequent
    users = torch.randint(-2, 3, (9, 4), generator=generator).float()
    items = torch.randint(-2, 3, (12, 4), generator=generator).float()  # padding + 11 items
    items[0] = 50.0  # the padding item would beat everything if it were ranked
    targets = torch.tensor([1, 2, 3, 4, 5, 6, 7, 11, 11])
    excluded = torch.tensor([
        [0, 0, 0], [5, 5, 0], [3, 0, 0],  # a repeated item; user 2's target is excluded -> inf
        [1, 9, 10], [0, 0, 0], [6, 6, 2],  # user 5: excluded target, repeated
        [11, 1, 0], [4, 0, 0], [10, 9, 8],
    ])
    expected = full_ranks(users @ items.T, targets, excluded)
    assert math.isinf(expected[2]) and math.isinf(expected[5]) and expected[0] >= 1
    for block in (1, 2, 3, 5, 11, 12, 100):
        assert torch.equal(blocked_ranks(users, items, targets, excluded, block), expected), block
    everything_tied = blocked_ranks(torch.zeros(2, 4), torch.ones(12, 4), torch.tensor([1, 2]), torch.tensor([[0], [5]]), 5)
    assert everything_tied.tolist() == [11, 10]  # ties count against the target: the worst rank


def test_a_non_finite_target_score_is_never_a_hit():
    users, items = torch.ones(3, 2), torch.ones(5, 2)
    users[1] = float("nan")  # a diverged model's user vector
    users[2, 0] = float("inf")  # an overflow: +inf or NaN scores
    ranks = blocked_ranks(users, items, torch.tensor([1, 2, 3]), torch.zeros(3, 1, dtype=torch.long))
    assert ranks.tolist() == [4, math.inf, math.inf]  # user 0: all 4 items tie, against the target
    assert summarize(ranks[1:]) == {"hr@10": 0.0, "ndcg@10": 0.0, "mrr@10": 0.0}


def test_blocked_ranks_never_score_more_than_a_block(monkeypatch):
    import pipeline.metrics as metrics

    widths = []
    ranked_block = metrics._ranked_block
    monkeypatch.setattr(metrics, "_ranked_block", lambda scores, *a: widths.append(scores.shape[1]) or ranked_block(scores, *a))
    users, items = torch.randn(4, 3), torch.randn(101, 3)
    ranks = blocked_ranks(users, items, torch.tensor([1, 50, 99, 100]), torch.zeros(4, 1, dtype=torch.long), 16)
    assert max(widths) == 16 and len(widths) == 2 * 7  # two passes over 7 blocks of 101 rows
    assert ranks.shape == (4,) and (ranks >= 1).all()


def test_validation_users_all_up_to_the_limit_else_the_same_seeded_sample():
    assert ranked_users(943, None, seed=1) is None  # the embedded data: every user
    assert ranked_users(10_000, None, seed=1) is None
    sample = ranked_users(200_000, None, seed=1)
    assert len(sample) == 10_000 and len(set(sample.tolist())) == 10_000 and np.array_equal(sample, np.sort(sample))
    assert np.array_equal(sample, ranked_users(200_000, None, seed=1))  # every epoch, every resume
    assert not np.array_equal(sample, ranked_users(200_000, None, seed=2))
    assert len(ranked_users(50, 7, seed=1)) == 7 and ranked_users(5, 7, seed=1) is None
    assert ranked_users(200_000, "all", seed=1) is None  # the paper's: every user


def test_a_validation_sample_is_what_selection_and_model_pt_report(toy, tmp_path, caplog):
    cfg = toy_config(toy, epochs=2, valid_users=6)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        model, info = train(cfg, tmp_path / "run", tmp_path / "logs")
    assert "validation ranks a seeded sample of 6 of the 16 users every epoch" in caplog.text
    assert (info["ranked_users"], info["num_users"]) == (6, 16)
    everyone = load_sequences(cfg.sequences, cfg.popularity, cfg.model.max_len)
    sampled = load_sequences(cfg.sequences, cfg.popularity, cfg.model.max_len, valid_users=6, seed=cfg.seed)
    rows = torch.from_numpy(ranked_users(16, 6, cfg.seed))
    assert (sampled.num_users, len(sampled.valid.targets)) == (16, 6)
    for split in ("valid", "test"):
        ranked, every = getattr(sampled, split), getattr(everyone, split)
        # only the ranked users padded: their rows of the full split (the excluded items' padding cut to their longest)
        assert torch.equal(ranked.inputs, every.inputs[rows]) and torch.equal(ranked.targets, every.targets[rows])
        width = ranked.excluded.shape[1]
        assert torch.equal(ranked.excluded, every.excluded[rows][:, -width:]) and not every.excluded[rows][:, :-width].any()
        assert info[split] == evaluate(model, ranked, cfg.eval_batch_size) != evaluate(model, every, cfg.eval_batch_size)
    assert json.loads((tmp_path / "logs/metrics.json").read_text())["best"]["ranked_users"] == 6


# --- data -------------------------------------------------------------------------------------


def test_left_pad_and_splits(tmp_path):
    assert left_pad(ragged([[1, 2, 3], [4]]), 2).tolist() == [[2, 3], [0, 4]]
    make_toy_dataset(tmp_path, num_users=4, num_items=10, seq_len=6)
    data = load_sequences(tmp_path / "ingest/sequences.parquet", tmp_path / "ingest/popularity.parquet", max_len=3)
    assert data.train.shape == (4, 4) and data.valid.inputs.shape == (4, 3)
    # test inputs end with the validation item; validation inputs end with the last training item
    assert torch.equal(data.test.inputs[:, -1], data.valid.targets)
    assert torch.equal(data.valid.inputs[:, -1], data.train[:, -1])
    assert (data.test.excluded == data.valid.targets[:, None]).any(1).all()


def test_epoch_batches_split_evenly_and_repeat():
    a = epoch_batches(10, 2, seed=1, epoch=3, rank=0, world_size=3)
    b = epoch_batches(10, 2, seed=1, epoch=3, rank=1, world_size=3)
    assert [len(x) for x in a] == [len(x) for x in b] == [2, 2]  # 10 rows wrapped to 12, 4 per rank
    assert [x.tolist() for x in a] == [x.tolist() for x in epoch_batches(10, 2, seed=1, epoch=3, rank=0, world_size=3)]
    assert [x.tolist() for x in epoch_batches(10, 10, 1, 3)] != [x.tolist() for x in epoch_batches(10, 10, 1, 4)]


# --- end to end -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_toy_dataset(tmp_path_factory.mktemp("toy"), num_users=16, num_items=20, seq_len=7)


def toy_config(root: Path, variant: str = "odmt", backbone: str = "sasrec", **kw) -> TrainConfig:
    model = ModelConfig(variant=variant, backbone=backbone, width=8, max_len=4, imt_layers=1, seq_layers=1)
    return TrainConfig(
        model=model,
        epochs=kw.pop("epochs", 1),
        batch_size=kw.pop("batch_size", 8),
        distill=DistillConfig(tau=0.5, ramp=2.0),
        sequences=str(root / "ingest/sequences.parquet"),
        popularity=str(root / "ingest/popularity.parquet"),
        text_features=str(root / "features/text"),
        image_features=str(root / "features/image"),
        **kw,
    )


def test_cpu_bf16_runs_the_training_forward_pass_in_bfloat16(toy, monkeypatch):
    """train.cpu_bf16: a step's item vectors come out of autocast in bfloat16; the weights stay
    float32 and are updated, the loss is finite, no loss scaler is used."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU path, on a GPU machine too
    cfg = toy_config(toy, cpu_bf16=True)
    env, data, model, optimizer, scaler, autocast, _ = set_up(cfg)
    assert autocast == torch.bfloat16 and not scaler.is_enabled()
    assert set_up(toy_config(toy))[5] is None  # the default: float32
    produced: list[torch.dtype] = []
    model.items.register_forward_hook(lambda _module, _inputs, out: produced.append(out.dtype))
    before = [p.detach().clone() for p in model.parameters()]
    loss = train_step(model, model, optimizer, scaler, data.train[:8], cfg, env, 1.0, log_popularity(data.train_counts), autocast).loss
    assert produced == [torch.bfloat16] and math.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_under_cpu_bf16_the_loss_is_computed_in_float32_outside_autocast(toy, monkeypatch):
    """Only the forward pass runs in bfloat16: the step's loss terms are those float32 gives
    from its outputs (inside autocast the logits' matrix product would be bfloat16)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = toy_config(toy, cpu_bf16=True)
    env, data, model, optimizer, scaler, autocast, _ = set_up(cfg)
    outputs = []
    model.register_forward_hook(lambda _module, _inputs, out: outputs.append([t.detach() for t in out]))
    slots, log_p = data.train[:8], log_popularity(data.train_counts)
    step = train_step(model, model, optimizer, scaler, slots, cfg, env, 1.0, log_p, autocast)
    states, vectors = outputs[0]
    assert vectors.dtype == torch.bfloat16  # the forward pass was autocast
    float32_terms = trainer.batch_losses(states, vectors, slots, model.branches, cfg, env, log_p, 1.0)
    assert step.terms == {name: value.item() for name, value in float32_terms.items()}


def test_cpu_bf16_validation_ranks_bfloat16_vectors_each_epoch_and_float32_for_model_pt(toy, tmp_path, monkeypatch):
    """train.cpu_bf16_validation: each epoch's validation computes the item and user vectors in
    bfloat16 (the ranking in float32); the final valid/test metrics of model.pt are float32."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    asked: list[torch.dtype | None] = []

    def recording(model, split, batch_size, item_block_size=trainer.ITEM_BLOCK_SIZE, autocast=None):
        asked.append(autocast)
        return evaluate(model, split, batch_size, item_block_size, autocast)

    monkeypatch.setattr(trainer, "evaluate", recording)
    model, info = train(toy_config(toy, epochs=2, cpu_bf16_validation=True), tmp_path / "run", tmp_path / "logs")
    assert asked == [torch.bfloat16, torch.bfloat16, None, None]  # 2 epochs, then model.pt's valid and test
    data = load_sequences(toy / "ingest/sequences.parquet", toy / "ingest/popularity.parquet", max_len=4)
    assert info["valid"] == evaluate(model, data.valid, 8)  # float32, whatever the epochs used

    produced: list[torch.dtype] = []
    model.items.register_forward_hook(lambda _module, _inputs, out: produced.append(out.dtype))
    approximate = evaluate(model, data.valid, 8, autocast=torch.bfloat16)
    assert set(produced) == {torch.bfloat16} and approximate.keys() == info["valid"].keys()


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec", "nextitnet"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_users_gathered_from_the_catalogue_table_equal_users_encoded_from_their_own_items(toy, variant, backbone):
    cfg = toy_config(toy, variant, backbone)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, max_len=6, dropout=0.3))
    model = build_model(cfg, 20).eval()
    data = load_sequences(cfg.sequences, cfg.popularity, max_len=7)  # valid: padded; test: cut to 6
    with torch.inference_mode():
        table = model.item_vectors()
        # Sequences holding the whole catalogue: user_vectors(sequences) encodes it in the very
        # batch item_vectors() does, so gathering from the table must give the same bits.
        catalogue = torch.arange(21).view(7, 3)
        assert torch.equal(model.user_vectors(catalogue, table), model.user_vectors(catalogue))
        for inputs in (data.valid.inputs, data.test.inputs):
            gathered = model.user_vectors(inputs, table)
            assert torch.equal(UserEncoder(model, cfg.model.max_len)(inputs), gathered)  # export = evaluation
            # user_vectors(inputs) runs the item encoder on these sequences' distinct items only:
            # a batch of other rows, and a matrix product's result for a row depends in the last
            # bits on where the row falls in the batch (MKL's tail blocks). Same numbers to float32
            # rounding, not to the bit.
            torch.testing.assert_close(gathered, model.user_vectors(inputs), rtol=1e-5, atol=1e-6)
            assert not torch.allclose(model.user_vectors(inputs, table.roll(1, 0)), gathered)  # the table is what is read


def test_evaluation_and_scoring_encode_every_catalogue_item_exactly_once(toy, tmp_path):
    model = build_model(toy_config(toy), 20)
    encoded: list[torch.Tensor] = []
    model.items.register_forward_pre_hook(lambda _, args: encoded.append(args[0].flatten().cpu()))
    catalogue = torch.arange(21)  # padding + 20 items

    data = load_sequences(toy / "ingest/sequences.parquet", toy / "ingest/popularity.parquet", max_len=4)
    evaluate(model, data.valid, batch_size=5)  # several user blocks
    assert torch.equal(torch.cat(encoded).sort().values, catalogue)

    encoded.clear()
    score_run(model, 4, pq.read_table(toy / "ingest/sequences.parquet"), ScoreConfig(k=5, user_block_size=5), tmp_path, {"run": "toy"})
    assert torch.equal(torch.cat(encoded).sort().values, catalogue)  # once for both splits


@pytest.fixture(scope="module")
def signal(tmp_path_factory) -> Path:
    """A catalogue large enough that random (about 23% HR@10) and popularity rankings stay far
    below a model that has learnt the users' walks."""
    root = tmp_path_factory.mktemp("signal")
    return make_toy_dataset(root, num_users=64, num_items=50, seq_len=8, text_shape=(4, 16), image_shape=(3, 16))


def baseline_hit_rates(root: Path) -> tuple[float, float]:
    """Test HR@10 of a popularity ranking (ties broken in its favour) and of a random one."""
    data = load_sequences(root / "ingest/sequences.parquet", root / "ingest/popularity.parquet", max_len=4)
    counts = data.train_counts.double()[None].expand(len(data.test.targets), -1).clone()
    counts[:, 0] = -1
    counts = counts.scatter(1, data.test.excluded, -1.0)
    target = counts.gather(1, data.test.targets[:, None])
    popularity = hit_rate((counts > target).sum(1) + 1, 10)
    eligible = data.num_items - (data.test.excluded > 0).sum(1).double()
    return popularity, float((10 / eligible).clamp(max=1).mean())


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec", "nextitnet"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_and_backbone_learns_the_planted_signal(signal, tmp_path, variant, backbone):
    cfg = dataclasses.replace(toy_config(signal, variant, backbone, epochs=10, batch_size=16, lr=0.01), model=signal_model(variant, backbone))
    _, info = train(cfg, tmp_path / "run", tmp_path / "logs")
    popularity, random = baseline_hit_rates(signal)
    assert max(popularity, random) < 0.3
    assert info["test"]["fused"]["hr@10"] > max(popularity, random) + 0.15, (info["test"]["fused"], popularity, random)
    model, loaded = load_trained(tmp_path / "run", cfg)
    assert loaded == info and not model.training and info["branches"] == list(VARIANTS[variant].branches)
    assert model.item_vectors().shape == (51, len(info["branches"]) * 16)


def signal_model(variant: str, backbone: str) -> ModelConfig:
    return ModelConfig(variant=variant, backbone=backbone, width=16, max_len=4, imt_layers=1, seq_layers=1)


def test_loading_a_trained_model_skips_the_content_init_and_scores_the_same(toy, tmp_path, monkeypatch):
    cfg = toy_config(toy)
    train(cfg, tmp_path / "run", tmp_path / "logs")
    saved = checkpoint.load(tmp_path / "run/model.pt")
    reference = build_model(cfg, 20, tuple(saved["info"]["sources"]))  # content-initialised, then overwritten
    reference.load_state_dict(saved["state_dict"])

    def refuse(*args, **kwargs):
        raise AssertionError("load_trained recomputed the ID initialisation")

    monkeypatch.setattr(odmt, "initial_id_table", refuse)
    model, _ = load_trained(tmp_path / "run", cfg)
    reference.eval()
    sequences = torch.tensor([[0, 3, 5, 7], [1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model.item_vectors(), reference.item_vectors())
        assert torch.equal(model.user_vectors(sequences), reference.user_vectors(sequences))


@pytest.mark.parametrize("exclude", ["all", "all_but_target"])
def test_model_selection_and_the_evaluate_stage_rank_alike(tmp_path, exclude):
    # 8 of 24 users come back to an item of their history for validation and for test
    root = make_toy_dataset(tmp_path / "data", num_users=24, num_items=30, seq_len=8, repeated_targets=8)
    model, info = train(toy_config(root, epochs=3), tmp_path / "run", tmp_path / "logs", exclude_history=exclude)
    sequences = pq.read_table(root / "ingest/sequences.parquet")
    score_run(model, info["max_len"], sequences, ScoreConfig(k=20), tmp_path / "candidates", {"run": "toy"}, exclude)
    metrics, _, _ = evaluate_run(tmp_path / "candidates", sequences, EvaluateConfig(ks=[10], exclude_history=exclude))
    logged = json.loads((tmp_path / "logs/metrics.json").read_text())["best"]
    assert metrics["protocol"]["exclude_history"] == exclude == info["exclude_history"]
    assert metrics["protocol"]["targets_in_history"] == {"valid": 8, "test": 8}
    for split in ("valid", "test"):
        assert set(metrics[split]) == {"fused", "id", "text", "image"}
        for ranking, values in metrics[split].items():
            assert values == info[split][ranking] == logged[split][ranking], (split, ranking)


def test_model_pt_keeps_the_best_epochs_weights_not_the_last(toy, tmp_path, monkeypatch):
    cfg = toy_config(toy, epochs=3)
    train(dataclasses.replace(cfg, epochs=2), tmp_path / "two", tmp_path / "two-logs")
    after_epoch_2 = checkpoint.load(tmp_path / "two/checkpoint.pt")["model"]
    scripted = iter([0.2, 0.5, 0.3])  # the validation HR@10 of epochs 1, 2, 3: the second is the best
    real_evaluate = trainer.evaluate

    def evaluate(model, split, batch_size, **kwargs):
        metrics = real_evaluate(model, split, batch_size, **kwargs)
        value = next(scripted, None)  # after the epochs: model.pt's metrics, real ones
        if value is not None:
            metrics["fused"]["hr@10"] = value
        return metrics

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    model, info = train(cfg, tmp_path / "three", tmp_path / "three-logs")
    assert (info["best_epoch"], info["epochs_trained"]) == (2, 3)
    saved = checkpoint.load(tmp_path / "three/model.pt")["state_dict"]
    assert all(torch.equal(saved[k], after_epoch_2[k]) for k in after_epoch_2)
    assert all(torch.equal(value, after_epoch_2[k]) for k, value in model.state_dict().items())
    data = load_sequences(cfg.sequences, cfg.popularity, cfg.model.max_len)
    assert info["valid"] == real_evaluate(model, data.valid, cfg.eval_batch_size)


def test_the_ramp_weight_scales_the_distillation_terms_of_the_loss(toy, tmp_path):
    cfg = toy_config(toy, epochs=2)  # ramp 2: weight 0.287 in epoch 1, 1 in epoch 2
    train(cfg, tmp_path / "run", tmp_path / "logs")
    curves = {
        path.stem: [float(line.split("\t")[-1]) for line in path.read_text().splitlines()[1:]]
        for path in (tmp_path / "logs/plots/metrics/train").glob("*.tsv")
    }
    assert {"kd_text_from_id", "kd_image_from_id", "kd_id_from_ens"} <= set(curves)
    for epoch in (1, 2):
        weight = curves["kd_weight"][epoch - 1]
        assert math.isclose(weight, ramp_weight(epoch, 2.0), rel_tol=1e-6)
        ce = sum(values[epoch - 1] for name, values in curves.items() if name.startswith("ce_"))
        kd = sum(values[epoch - 1] for name, values in curves.items() if name.startswith("kd_") and name != "kd_weight")
        assert math.isclose(curves["loss"][epoch - 1], ce + weight * kd, rel_tol=1e-5), epoch


def nan_losses_at(monkeypatch, calls: set[int]) -> None:
    """Make the loss terms of these training steps (1-based, counted over the run) NaN."""
    count = iter(range(1, 1_000_000))
    batch_losses = trainer.batch_losses

    def diverging(*args, **kwargs):
        terms = batch_losses(*args, **kwargs)
        return {k: v * float("nan") for k, v in terms.items()} if next(count) in calls else terms

    monkeypatch.setattr(trainer, "batch_losses", diverging)


def test_a_non_finite_loss_stops_training_and_says_where(toy, tmp_path, monkeypatch):
    nan_losses_at(monkeypatch, {3})  # 2 steps per epoch: epoch 2's first
    with pytest.raises(FloatingPointError, match=r"epoch 2, step 1 of 2: the training loss is not finite \(loss nan, ce_id nan"):
        train(toy_config(toy, epochs=3), tmp_path / "run", tmp_path / "logs")
    assert checkpoint.load(tmp_path / "run/checkpoint.pt")["epoch"] == 1 and not (tmp_path / "run/model.pt").exists()


def test_non_finite_loss_skip_leaves_the_weights_and_counts_the_steps(toy, tmp_path, monkeypatch, caplog):
    _, one_epoch = train(toy_config(toy, epochs=1), tmp_path / "one", tmp_path / "one-logs")
    nan_losses_at(monkeypatch, {3, 4})  # every step of epoch 2
    with caplog.at_level(logging.INFO, logger="pipeline"):
        _, info = train(toy_config(toy, epochs=2, non_finite_loss="skip"), tmp_path / "run", tmp_path / "logs")
    assert "epoch 2: 2 of 2 steps skipped for a non-finite loss" in caplog.text
    assert (info["best_epoch"], info["epochs_trained"]) == (1, 2) and info["valid"] == one_epoch["valid"]
    before, after = (checkpoint.load(tmp_path / run / "checkpoint.pt")["model"] for run in ("one", "run"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # the skipped steps changed nothing
    curve = (tmp_path / "logs/plots/metrics/train/skipped_steps.tsv").read_text().split()
    assert curve[-2:] == ["2", "2.0"] and "epoch 2 (" in caplog.text and ": loss nan," in caplog.text


def test_weights_that_turn_nan_stop_training_and_are_never_the_best_epoch(toy, tmp_path, monkeypatch):
    train_epoch = trainer._train_epoch

    def diverging(net, model, *args):
        losses = train_epoch(net, model, *args)
        if args[5] == 1:  # epoch 1 ends with NaN weights, every loss finite (an infinite gradient, say)
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return losses

    monkeypatch.setattr(trainer, "_train_epoch", diverging)
    with pytest.raises(FloatingPointError, match="epoch 1: 1 weight tensors hold NaN or inf"):
        train(toy_config(toy, epochs=2), tmp_path / "run", tmp_path / "logs")
    assert not (tmp_path / "run/model.pt").exists()


def test_the_log_model_pt_and_the_evaluate_stage_agree_on_a_catalogue_of_duplicate_texts(tmp_path):
    # issue 25: 10 pairs of items with the same text vector, so text-only scores tie exactly
    root = make_toy_dataset(tmp_path / "data", num_users=40, num_items=20, seq_len=8, duplicate_texts=10)
    cfg = toy_config(root, "text_only", epochs=2)
    # width 64, as on real data: at the tests' width 8 the matrix kernels round a row by its place
    # in the batch, and equal inputs come out unequal in the last bits (no exact tie)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, width=64))
    model, info = train(cfg, tmp_path / "run", tmp_path / "logs")
    sequences = pq.read_table(root / "ingest/sequences.parquet")
    score_run(model, info["max_len"], sequences, ScoreConfig(k=15), tmp_path / "candidates", {"run": "toy"})
    metrics, _, _ = evaluate_run(tmp_path / "candidates", sequences, EvaluateConfig(ks=[10]))
    logged = json.loads((tmp_path / "logs/metrics.json").read_text())["best"]
    with torch.no_grad():
        vectors = model.item_vectors()
    assert torch.equal(vectors[1], vectors[2]) and torch.equal(vectors[17], vectors[18])
    for split in ("valid", "test"):
        assert metrics[split]["fused"] == info[split]["fused"] == logged[split]["fused"], split


def test_a_ramp_longer_than_the_run_is_warned_and_the_final_weight_logged(toy, tmp_path, caplog):
    cfg = toy_config(toy, epochs=2)
    cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, ramp=5.0))
    with caplog.at_level(logging.INFO, logger="pipeline"):
        train(cfg, tmp_path / "run", tmp_path / "logs")
    final = f"{ramp_weight(2, 5.0):.3f}"
    assert f"distill.ramp 5 > epochs 2: the distillation weight never reaches 1 ({final} at the last epoch)" in caplog.text
    assert f"distillation weight at the last epoch (2): {final}" in caplog.text
    assert "distillation pairs: text <- id, image <- id, id <- ensemble" in caplog.text


def scripted_validation(monkeypatch, scores: list[float]) -> None:
    """Each call of the trainer's evaluate returns the next fused HR@10 of `scores` (then 0)."""
    values = iter(scores)
    monkeypatch.setattr(trainer, "evaluate", lambda *args, **kwargs: {"fused": dict.fromkeys(("hr@10", "ndcg@10", "mrr@10"), next(values, 0.0))})


def test_early_stopping_keeps_the_best_epoch_and_says_why_it_stopped(toy, tmp_path, monkeypatch, caplog):
    # epochs 1-4 score 0.1, 0.3, 0.2, 0.25: no better one for 2 epochs after epoch 2
    scripted_validation(monkeypatch, [0.1, 0.3, 0.2, 0.25])
    cfg = toy_config(toy, epochs=10, patience=2)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        _, info = train(cfg, tmp_path / "run", tmp_path / "logs")
    assert (info["epochs_trained"], info["best_epoch"], info["stop_reason"], info["patience"]) == (4, 2, "patience", 2)
    assert "stopped after epoch 4: no better valid fused hr@10 in 2 epochs (train.patience); best epoch 2" in caplog.text
    saved = checkpoint.load(tmp_path / "run/model.pt")
    assert saved["info"]["stop_reason"] == "patience"
    assert json.loads((tmp_path / "logs/metrics.json").read_text())["stopped"] == {"epochs_trained": 4, "reason": "patience"}
    # the kept weights are epoch 2's: those of a run of 2 epochs
    scripted_validation(monkeypatch, [0.1, 0.3])
    train(dataclasses.replace(cfg, epochs=2, patience=0), tmp_path / "two", tmp_path / "two-logs")
    two = checkpoint.load(tmp_path / "two/model.pt")
    assert all(torch.equal(saved["state_dict"][k], two["state_dict"][k]) for k in two["state_dict"])
    assert two["info"]["stop_reason"] == "max_epochs"


def test_a_run_that_reaches_the_maximum_still_improving_is_warned(toy, tmp_path, monkeypatch, caplog):
    scripted_validation(monkeypatch, [0.1, 0.2, 0.3])
    with caplog.at_level(logging.INFO, logger="pipeline"):
        _, info = train(toy_config(toy, epochs=3, patience=2), tmp_path / "run", tmp_path / "logs")
    assert (info["epochs_trained"], info["best_epoch"], info["stop_reason"]) == (3, 3, "max_epochs")
    assert "stopped at the maximum of 3 epochs (train.epochs) with validation still improving: best epoch 3" in caplog.text


def test_resume_equals_uninterrupted(toy, tmp_path):
    cfg = toy_config(toy, epochs=3)
    _, whole = train(cfg, tmp_path / "whole", tmp_path / "whole-logs")
    # "killed" after epoch 1: only its checkpoint survives; the rerun continues from it
    train(dataclasses.replace(cfg, epochs=1), tmp_path / "split", tmp_path / "split-logs")
    (tmp_path / "split/model.pt").unlink()
    torch.manual_seed(12345)  # the global RNG state must not matter
    _, resumed = train(cfg, tmp_path / "split", tmp_path / "split-logs")
    assert resumed == whole
    a = torch.load(tmp_path / "whole/model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "split/model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # byte for byte too, so DVC sees an unchanged model.pt and does not rerun scoring
    assert (tmp_path / "whole/model.pt").read_bytes() == (tmp_path / "split/model.pt").read_bytes()
    steps = (tmp_path / "split-logs/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in steps[1:]] == ["1", "2", "3"]  # dvclive continued


def test_a_checkpoint_from_other_input_data_is_not_resumed(tmp_path):
    # DVC keeps checkpoint.pt across reruns: after new data (same params) training must restart.
    data = tmp_path / "data"
    make_toy_dataset(data, num_users=16, num_items=20, seq_len=7, seed=0)
    train(toy_config(data, epochs=1), tmp_path / "run", tmp_path / "logs")
    make_toy_dataset(data, num_users=16, num_items=20, seq_len=7, seed=1)
    _, after_new_data = train(toy_config(data, epochs=2), tmp_path / "run", tmp_path / "logs")
    _, fresh = train(toy_config(data, epochs=2), tmp_path / "fresh", tmp_path / "fresh-logs")
    assert after_new_data == fresh


def test_changed_params_start_afresh(toy, tmp_path):
    cfg = toy_config(toy, epochs=1)
    train(cfg, tmp_path / "run", tmp_path / "logs")
    _, changed = train(dataclasses.replace(cfg, lr=0.01), tmp_path / "run", tmp_path / "logs")
    _, fresh = train(dataclasses.replace(cfg, lr=0.01), tmp_path / "fresh", tmp_path / "fresh-logs")
    assert changed == fresh


def _ddp_worker(rank: int, ports: tuple[int, int], root: Path, out: Path) -> None:
    # CPU processes (gloo) on a machine with GPUs too; set before anything here asks CUDA
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(1)
    for port, gather in zip(ports, (False, True)):  # in-batch negatives per rank, then gathered
        os.environ["MASTER_PORT"] = str(port)  # a fresh process group per run
        model, _ = train(toy_config(root, epochs=2, batch_size=4, gather_negatives=gather), out / f"run-{gather}", out / f"logs-{gather}")
        torch.save(model.state_dict(), out / f"rank{rank}-{gather}.pt")


def _free_ports(n: int) -> tuple[int, ...]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:  # all bound at once, so the ports differ
        s.bind(("127.0.0.1", 0))
    ports = tuple(s.getsockname()[1] for s in sockets)
    for s in sockets:
        s.close()
    return ports


def test_more_ranks_than_gpus_says_what_to_do(monkeypatch):
    """torchrun --nproc_per_node 2 on a one-GPU machine: a message, not CUDA's 'invalid device ordinal'."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK 1, but this machine shows 1 GPU.*nproc_per_node.*CUDA_VISIBLE_DEVICES"):
        ddp.setup()


def test_ddp_two_cpu_processes_agree(toy, tmp_path):
    mp.spawn(_ddp_worker, args=(_free_ports(2), toy, tmp_path), nprocs=2, join=True)
    torch.manual_seed(1)  # the initial weights (seed 1)
    initial = build_model(toy_config(toy), 20).state_dict()
    finals = []
    for gather in (False, True):
        rank0, rank1 = (torch.load(tmp_path / f"rank{r}-{gather}.pt") for r in (0, 1))
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # both ranks hold the same weights
        written = torch.load(tmp_path / f"run-{gather}/model.pt", weights_only=True)["state_dict"]
        assert all(torch.equal(written[k], rank0[k]) for k in rank0)  # rank 0 wrote them
        assert any(not torch.equal(initial[k], rank0[k]) for k in rank0)  # and they trained
        assert (tmp_path / f"logs-{gather}/metrics.json").exists()
        finals.append(rank0)
    assert any(not torch.equal(finals[0][k], finals[1][k]) for k in finals[0])  # gathering changes training


def test_paper_params_are_the_reference_configuration():
    paper = load_section(TrainConfig, "train", ROOT / "params-paper.yaml")
    # odmt.md sections 1, 2, 5, 6 (Amazon Arts) and the reference code's behaviour at every switch
    assert (paper.distill.tau, paper.distill.ramp, paper.distill.detach_teacher) == (0.3, 20.0, False)
    assert paper.distill.text_from_id and paper.distill.image_from_id and paper.distill.id_from_ens
    assert (paper.epochs, paper.batch_size, paper.lr, paper.weight_decay, paper.clip_norm) == (31, 128, 1e-4, 0.1, 5.0)
    m = paper.model
    assert (m.variant, m.backbone, m.width, m.text_tokens, m.image_tokens, m.dropout) == ("odmt", "sasrec", 768, 30, 50, 0.1)
    assert (m.imt_layers, m.imt_heads, m.seq_layers, m.seq_heads, m.max_len, m.id_init) == (2, 2, 2, 2, 12, "mean_cls")
    assert (m.id_projection, m.id_scale_sqrt_width, m.id_init_rescale, m.head_init_scale) == (True, False, False, 1.0)
    assert (m.xavier_init, m.ffn_dropout, m.dropout_per_slot, m.attention_dropout) == ("encoders", False, True, False)
    assert paper.modalities == ["id", "text", "image"] and paper.logq and paper.valid_users == "all"
    assert load_section(EvaluateConfig, "evaluate", ROOT / "params-paper.yaml").exclude_history == "all"
    # the header's `dvc exp run -S ...` line turns params.yaml's train section into this one
    header = " ".join(line for line in (ROOT / "params-paper.yaml").read_text().splitlines() if line.startswith("#"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in re.findall(r"-S '?([\w.]+)=([^\s']+)'?", header.split("dvc exp run", 1)[1].split("What still differs")[0]):
        section, *path, name = key.split(".")
        target = params[section]
        for part in path:
            target = target[part]
        target[name] = yaml.safe_load(value)
    assert from_dict(TrainConfig, params["train"], "train") == paper
    assert params["evaluate"]["exclude_history"] == "all"


def test_stage_script(toy, tmp_path, monkeypatch):
    params = {"train": dataclasses.asdict(toy_config(toy)), "evaluate": {"exclude_history": "all_but_target"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py", "--variant", "sasrec_id", "--seed", "3", "--params", "params.yaml"])
    runpy.run_path(str(ROOT / "stages/train.py"), run_name="__main__")
    model, info = load_trained(tmp_path / "models/sasrec_id-s3", toy_config(toy))
    assert (info["variant"], info["seed"], info["branches"], info["exclude_history"]) == ("sasrec_id", 3, ["id"], "all_but_target")
    assert (tmp_path / "logs/sasrec_id-s3/metrics.json").exists()


@pytest.mark.gpu
def test_cuda_amp_training_and_cpu_loading(toy, tmp_path):
    cfg = toy_config(toy, epochs=2)
    model, info = train(cfg, tmp_path / "run", tmp_path / "logs")
    assert next(model.parameters()).is_cuda
    saved = torch.load(tmp_path / "run/checkpoint.pt", weights_only=True)
    assert saved["scaler"]  # the float16 loss scaler is in use and checkpointed
    loaded, _ = load_trained(tmp_path / "run", cfg, device="cpu")
    assert not next(loaded.parameters()).is_cuda and loaded.item_vectors().shape[0] == 21


def test_freed_memory_is_kept_under_glibc_and_left_alone_elsewhere(monkeypatch):
    from pipeline import allocator

    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert allocator.keep_freed_memory() is glibc
    assert allocator.keep_freed_memory(trim_heap=True) is glibc
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.keep_freed_memory() is False
