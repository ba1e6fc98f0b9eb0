"""The training loop: AdamW, gradient clipping, AMP on CUDA, validation every epoch with full
ranking, best-epoch selection, early stopping, a resumable checkpoint, dvclive curves, DDP.

Every variant trains under one protocol: at most train.epochs epochs, stopped early once
train.patience epochs in a row bring no better validation score (train.select_metric of the
fused ranking); the best epoch's weights are kept. model.pt's info, the log and the report say
how many epochs ran, the best one and why training stopped.

Determinism: the model is initialised from `seed`; every epoch then reseeds the RNG from
(seed, epoch, rank) and draws its batch order from (seed, epoch). So an epoch's result
depends only on the weights and optimiser state it starts from, which is exactly what the
checkpoint holds: a resumed run repeats the uninterrupted one bit for bit on CPU, on every rank.
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

import torch
from dvclive import Live
from torch.nn.parallel import DistributedDataParallel

from ..allocator import keep_freed_memory
from ..config import to_dict
from ..io import atomic_path
from ..metrics import ITEM_BLOCK_SIZE, ExcludeHistory, blocked_ranks, summarize
from ..models.odmt import ODMT, VARIANTS
from ..progress import Progress, log
from .. import ddp
from . import Sources, TrainConfig, build_model, checkpoint, find_sources
from .data import SequenceData, Split, epoch_batches, load_sequences
from .distillation import distillation_pairs, distillation_terms, ramp_weight
from .loss import branch_logits, cross_entropy, in_batch, log_popularity


def train(cfg: TrainConfig, run_dir: Path, log_dir: Path, exclude_history: ExcludeHistory = "all") -> tuple[ODMT, dict[str, Any]]:
    """Train one run; writes run_dir/model.pt, run_dir/checkpoint.pt and dvclive output in
    log_dir (rank 0). Returns the model with its best-validation weights and the info dict
    stored in model.pt. ``exclude_history`` (evaluate.exclude_history) is the ranking protocol
    of model selection and of the metrics logged, the same one the evaluate stage reports."""
    env, data, model, optimizer, scaler, autocast, sources = set_up(cfg, exclude_history)
    params = to_dict(cfg)
    run_dir, log_dir = Path(run_dir), Path(log_dir)
    distill = VARIANTS[cfg.model.variant].distill and cfg.distill.ramp > 0 and bool(distillation_pairs(model.branches, cfg.distill))
    _log_plan(cfg, model, sources, distill)
    _log_ranked_users(len(data.valid.targets), data.num_users)

    state = {"epoch": 0, "best_score": float("-inf"), "best_epoch": 0, "best_state": None, "bad_epochs": 0}
    inputs = checkpoint.input_digests([cfg.sequences, cfg.popularity, cfg.text_features, cfg.image_features])
    code = checkpoint.code_digest()
    resume_params = {**params, "evaluate.exclude_history": exclude_history}  # it picks the best epoch too
    saved = checkpoint.load_compatible(run_dir / "checkpoint.pt", resume_params, inputs, code)
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        state = {k: saved[k] for k in state}
        log.info("resuming %s after epoch %d", run_dir, state["epoch"])
    net = DistributedDataParallel(model, broadcast_buffers=False) if env.enabled else model
    live = None
    if env.is_main:
        if saved is not None:  # a run killed after logging an epoch but before its checkpoint
            _drop_curve_steps_after(log_dir, state["epoch"])
        live = Live(str(log_dir), resume=saved is not None, save_dvc_exp=False, dvcyaml=None)
    log_p = log_popularity(data.train_counts).to(env.device) if cfg.logq else None
    rows_per_epoch = sum(map(len, epoch_batches(len(data.train), cfg.batch_size, cfg.seed, 1, env.rank, env.world_size)))
    progress = Progress("training", total=max(cfg.epochs - state["epoch"], 0) * rows_per_epoch, unit="sequences", every_s=30)

    while state["epoch"] < cfg.epochs and not patience_ran_out(cfg, state["bad_epochs"]):
        epoch = state["epoch"] + 1
        torch.manual_seed((cfg.seed * 1_000_003 + epoch) * 1009 + env.rank)
        weight = ramp_weight(epoch, cfg.distill.ramp) if distill else 0.0
        started = time.perf_counter()
        losses = _train_epoch(net, model, optimizer, scaler, data.train, cfg, env, epoch, weight, log_p, autocast, progress)
        _check_finite_weights(model, epoch)
        seconds = time.perf_counter() - started
        valid = evaluate(model, data.valid, cfg.eval_batch_size, autocast=validation_autocast(cfg, env.device))
        score = valid["fused"][cfg.select_metric]
        if score > state["best_score"]:
            best = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            state.update(best_score=score, best_epoch=epoch, best_state=best, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        log.info(
            "epoch %d (%.1fs): loss %.4f, kd weight %.3f, valid fused HR@10 %.4f NDCG@10 %.4f (best epoch %d)",
            epoch, seconds, losses["loss"], weight, valid["fused"]["hr@10"], valid["fused"]["ndcg@10"], state["best_epoch"],
        )
        if env.is_main:
            _log_epoch(live, epoch, losses, weight, valid)
            snapshot = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "params": resume_params,
                "inputs": inputs,
                "code": code,
            }
            checkpoint.save({**snapshot, **state}, run_dir / "checkpoint.pt")

    progress.close()
    stop_reason = "patience" if patience_ran_out(cfg, state["bad_epochs"]) else "max_epochs"
    _log_stop(cfg, state["epoch"], state["best_epoch"], stop_reason)
    model.load_state_dict(state["best_state"])
    results = {"valid": evaluate(model, data.valid, cfg.eval_batch_size), "test": evaluate(model, data.test, cfg.eval_batch_size)}
    info = {
        "variant": cfg.model.variant,
        "backbone": cfg.model.backbone,
        "seed": cfg.seed,
        "max_len": cfg.model.max_len,
        "branches": list(model.branches),
        "branch_dim": model.branch_dim,
        "sources": [s for s in sources.used if s in VARIANTS[cfg.model.variant].sources],  # read by the model; load_trained rebuilds on them
        "source_present": sources.present,
        "exclude_history": exclude_history,
        "num_items": data.num_items,
        "best_epoch": state["best_epoch"],
        "epochs_trained": state["epoch"],
        "stop_reason": stop_reason,  # patience (early stopping) | max_epochs (train.epochs reached)
        "patience": cfg.patience,
        "ranked_users": len(data.valid.targets),  # of num_users: the users behind valid and test below
        "num_users": data.num_users,
        **results,
    }
    if env.is_main:
        checkpoint.save({"state_dict": state["best_state"], "params": params, "info": info}, run_dir / "model.pt")
        live.step = state["epoch"]
        # valid/test metrics of the kept weights, on the ranked users (the evaluate stage: all users)
        live.summary["best"] = {"epoch": state["best_epoch"], "ranked_users": len(data.valid.targets), **results}
        live.summary["stopped"] = {"epochs_trained": state["epoch"], "reason": stop_reason}
        live.make_summary()
        live.end()
    if distill:
        log.info("distillation weight at the last epoch (%d): %.3f", state["epoch"], ramp_weight(state["epoch"], cfg.distill.ramp))
    log.info("best epoch %d: test fused HR@10 %.4f NDCG@10 %.4f", state["best_epoch"], results["test"]["fused"]["hr@10"], results["test"]["fused"]["ndcg@10"])
    ddp.cleanup(env)
    return model.eval(), info


def patience_ran_out(cfg: TrainConfig, bad_epochs: int) -> bool:
    """Early stopping: train.patience epochs in a row without a better validation score (0: off)."""
    return cfg.patience > 0 and bad_epochs >= cfg.patience


def _log_stop(cfg: TrainConfig, epochs: int, best_epoch: int, reason: str) -> None:
    if reason == "patience":
        log.info("stopped after epoch %d: no better valid fused %s in %d epochs (train.patience); best epoch %d", epochs, cfg.select_metric, cfg.patience, best_epoch)
    elif cfg.patience:  # the best epoch less than patience before the maximum
        log.warning(
            "stopped at the maximum of %d epochs (train.epochs) with validation still improving: best epoch %d, less than "
            "train.patience (%d) epochs before; the run may not have converged: raise train.epochs", epochs, best_epoch, cfg.patience,
        )
    else:
        log.info("stopped at the maximum of %d epochs (train.epochs); best epoch %d", epochs, best_epoch)


class RunSetup(NamedTuple):
    env: ddp.Distributed
    data: SequenceData
    model: ODMT
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: torch.dtype | None  # the training forward pass's autocast type; None = float32
    sources: Sources


def set_up(cfg: TrainConfig, exclude_history: ExcludeHistory = "all") -> RunSetup:
    """What a run (and the training benchmark) starts from: deterministic kernels, the data, the
    item sources, the seeded model, AdamW and the float16 loss scaler (active on CUDA only)."""
    keep_freed_memory(trim_heap=cfg.model.imt_recompute)
    env = ddp.setup()
    _deterministic(env)
    warn_without_native_bf16(cfg, env.device)
    torch.manual_seed(cfg.seed)
    data = load_sequences(cfg.sequences, cfg.popularity, cfg.model.max_len, exclude_history, cfg.valid_users, cfg.seed)
    sources = find_sources(cfg)
    model = build_model(cfg, data.num_items, sources.used).to(env.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    autocast = autocast_dtype(cfg, env.device)
    return RunSetup(env, data, model, optimizer, torch.amp.GradScaler("cuda", enabled=autocast == torch.float16), autocast, sources)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """float16 on CUDA (train.amp, with the loss scaler), bfloat16 on the CPU (train.cpu_bf16:
    no scaler needed, bfloat16 has float32's range), else None: float32."""
    if device.type == "cuda":
        return torch.float16 if cfg.amp else None
    return torch.bfloat16 if cfg.cpu_bf16 else None


CPUINFO = Path("/proc/cpuinfo")
# bfloat16 instructions, as /proc/cpuinfo names them: x86 AVX512_BF16 and AMX-BF16, Arm BF16 (ARMv8.6)
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def native_bf16(cpuinfo: str) -> bool:
    """Whether the text of /proc/cpuinfo lists a bfloat16 instruction set (x86 `flags`, Arm `Features`)."""
    lines = (line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    return any(key.strip() in ("flags", "Features") and BF16_FLAGS & set(value.split()) for key, value in lines)


def warn_without_native_bf16(cfg: TrainConfig, device: torch.device) -> None:
    """train.cpu_bf16 and cpu_bf16_validation only speed up CPUs with bfloat16 instructions;
    elsewhere bfloat16 is emulated and slower than float32: say so in the log."""
    switches = [f"train.{name}" for name in ("cpu_bf16", "cpu_bf16_validation") if getattr(cfg, name)]
    if device.type != "cpu" or not switches:
        return
    try:
        native = native_bf16(CPUINFO.read_text())
    except OSError:
        log.warning("%s: cannot tell whether this CPU has bfloat16 instructions (%s unreadable)", " and ".join(switches), CPUINFO)
        return
    if not native:
        log.warning(
            "%s: this CPU has no bfloat16 instructions (none of %s in %s), so bfloat16 is emulated and SLOWER than "
            "float32 here (validation 5x slower on an AVX2 CPU); set it to false (docs/training.md)",
            " and ".join(switches), ", ".join(sorted(BF16_FLAGS)), CPUINFO,
        )  # fmt: skip


def validation_autocast(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bfloat16 for each epoch's validation on the CPU under train.cpu_bf16_validation, else None."""
    return torch.bfloat16 if cfg.cpu_bf16_validation and device.type == "cpu" else None


def _log_ranked_users(ranked: int, total: int) -> None:
    if ranked == total:
        log.info("validation ranks all %d users every epoch", total)
    else:
        log.info(
            "validation ranks a seeded sample of %d of the %d users every epoch (train.valid_users), and the valid/test "
            "metrics of model.pt come from the same sample; the evaluate stage reports all users", ranked, total,
        )


def _log_plan(cfg: TrainConfig, model: ODMT, sources: Sources, distill: bool) -> None:
    """Say at the start what will be trained: sources, branches, distillation pairs and ramp."""
    log.info("%s; %s trains branches %s", sources.describe(cfg), cfg.model.variant, ", ".join(model.branches))
    if not distill:
        return
    pairs = ", ".join(f"{student} <- {teacher}" for _, student, teacher in distillation_pairs(model.branches, cfg.distill))
    log.info("distillation pairs: %s", pairs)
    if cfg.distill.ramp >= 1 and cfg.distill.ramp > cfg.epochs:
        log.warning(
            "distill.ramp %g > epochs %d: the distillation weight never reaches 1 (%.3f at the last epoch)",
            cfg.distill.ramp, cfg.epochs, ramp_weight(cfg.epochs, cfg.distill.ramp),
        )


def _train_epoch(net, model: ODMT, optimizer, scaler, train: torch.Tensor, cfg: TrainConfig, env, epoch: int, weight: float, log_p, autocast: torch.dtype | None, progress: Progress) -> dict[str, float]:
    """The epoch's mean loss terms over its stepped batches, and under train.non_finite_loss
    skip the count of batches skipped for a non-finite loss ("skipped_steps")."""
    net.train()
    batches = epoch_batches(len(train), cfg.batch_size, cfg.seed, epoch, env.rank, env.world_size)
    sums: dict[str, float] = defaultdict(float)
    skipped = 0
    for number, rows in enumerate(batches, 1):
        step = train_step(net, model, optimizer, scaler, train[rows].to(env.device), cfg, env, weight, log_p, autocast)
        progress.update(len(rows))
        if not step.stepped:
            if cfg.non_finite_loss == "stop":
                raise FloatingPointError(
                    f"epoch {epoch}, step {number} of {len(batches)}: the training loss is not finite ({_describe(step)}); "
                    "training diverged and was stopped before the step. The checkpoint of the last complete epoch is kept. "
                    "Lower train.lr, keep train.clip_norm above 0, or set train.non_finite_loss: skip to skip such steps "
                    "and count them"
                )
            skipped += 1
            continue
        sums["loss"] += step.loss
        for name, value in step.terms.items():
            sums[name] += value
    stepped = len(batches) - skipped
    means = {k: v / stepped for k, v in sums.items()} if stepped else {"loss": math.nan}
    if cfg.non_finite_loss == "skip":
        if skipped:
            log.warning("epoch %d: %d of %d steps skipped for a non-finite loss (train.non_finite_loss: skip)", epoch, skipped, len(batches))
        means["skipped_steps"] = float(skipped)
    return ddp.mean_over_ranks(means, env)


def _check_finite_weights(model: ODMT, epoch: int) -> None:
    """Stop when a weight went NaN or inf although every loss was finite (an infinite gradient,
    say): no later step or skip can repair it, and such weights must never be kept as the best."""
    finite = torch.stack([torch.isfinite(p).all() for p in model.parameters()])
    if not finite.all():
        names = [name for (name, _), ok in zip(model.named_parameters(), finite.tolist()) if not ok]
        raise FloatingPointError(
            f"epoch {epoch}: {len(names)} weight tensors hold NaN or inf ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) "
            "although every loss was finite: training diverged. The checkpoint of the last complete epoch is kept; "
            "lower train.lr or keep train.clip_norm above 0"
        )


def _describe(step: Step) -> str:
    return ", ".join(f"{name} {value:.4g}" for name, value in {"loss": step.loss, **step.terms}.items())


class Step(NamedTuple):
    terms: dict[str, float]  # each loss term of the batch
    loss: float  # their weighted sum, the loss minimised
    stepped: bool  # False: the loss was not finite (on some rank), the weights were left as they were


def train_step(net, model: ODMT, optimizer, scaler, slots: torch.Tensor, cfg: TrainConfig, env, weight: float, log_p, autocast: torch.dtype | None) -> Step:
    """One optimiser step on a batch of training slots: its loss terms and total loss. The
    forward pass runs under ``autocast`` (None: float32); the logits are float32 (branch_logits).
    A loss that is not finite, on this rank or another, takes no step (the caller stops or skips)."""
    with torch.autocast(env.device.type, dtype=autocast, enabled=autocast is not None):
        states, vectors = net(slots)
    terms = batch_losses(states, vectors, slots, model.branches, cfg, env, log_p, weight)
    loss = sum(v for k, v in terms.items() if k.startswith("ce_")) + weight * sum(v for k, v in terms.items() if k.startswith("kd_"))
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    step = Step({name: value.item() for name, value in terms.items()}, loss.item(), True)
    if not ddp.all_ranks(math.isfinite(step.loss), env):  # every rank skips the same steps
        return step._replace(stepped=False)
    if cfg.clip_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
    scaler.step(optimizer)
    scaler.update()
    return step


def batch_losses(states, vectors, slots, branches, cfg: TrainConfig, env, log_p, weight: float) -> dict[str, torch.Tensor]:
    """Per-branch in-batch CE ("ce_<branch>") and, when weight > 0, the KD terms ("kd_<pair>")."""
    candidates, offset = slots.flatten(), 0
    candidate_vectors = vectors.flatten(1, 2)  # (branches, C, d)
    if cfg.gather_negatives and env.enabled:
        offset = env.rank * candidates.numel()
        candidates = ddp.gather(candidates)
        candidate_vectors = ddp.gather_with_grad(candidate_vectors.transpose(0, 1)).transpose(0, 1)
    batch = in_batch(slots, candidates, offset, log_p)
    logits = {b: branch_logits(states[i], candidate_vectors[i], batch) for i, b in enumerate(branches)}
    terms = {f"ce_{b}": cross_entropy(z, batch) for b, z in logits.items()}
    if weight > 0:
        terms.update({f"kd_{k}": v for k, v in distillation_terms(logits, cfg.distill).items()})
    return terms


@torch.no_grad()
def evaluate(
    model: ODMT, split: Split, batch_size: int, item_block_size: int = ITEM_BLOCK_SIZE, autocast: torch.dtype | None = None
) -> dict[str, dict[str, float]]:
    """HR/NDCG/MRR@10 of the fused score and of each branch, full ranking, the split's excluded
    items left out (the protocol of the evaluate stage). The catalogue goes through the item
    encoder once; user vectors gather their items from that table. Users are ranked batch_size
    at a time against item_block_size items at a time (blocked_ranks), so memory is bounded by
    their product, never users x items. `autocast`: the item and user passes under autocast to
    that dtype; the ranking stays float32."""
    model.eval()
    device = next(model.parameters()).device
    passes = torch.autocast(device.type, dtype=autocast, enabled=autocast is not None)
    with passes:
        table = model.item_vectors()
    items = table.float()
    d = model.branch_dim
    ranks: dict[str, list[torch.Tensor]] = {name: [] for name in ("fused", *model.branches)}
    for start in range(0, len(split.targets), batch_size):
        block = slice(start, start + batch_size)
        with passes:
            users = model.user_vectors(split.inputs[block].to(device), table)
        users = users.float()
        targets, excluded = split.targets[block].to(device), split.excluded[block].to(device)
        ranks["fused"].append(blocked_ranks(users, items, targets, excluded, item_block_size).cpu())
        for i, branch in enumerate(model.branches):
            part = slice(i * d, (i + 1) * d)
            ranks[branch].append(blocked_ranks(users[:, part], items[:, part], targets, excluded, item_block_size).cpu())
    return {name: summarize(torch.cat(r)) for name, r in ranks.items()}


def _log_epoch(live: Live, epoch: int, losses: dict[str, float], weight: float, valid: dict[str, dict[str, float]]) -> None:
    live.step = epoch
    for name, value in losses.items():
        live.log_metric(f"train/{name}", value)
    live.log_metric("train/kd_weight", weight)
    for branch, metrics in valid.items():
        for name in ("hr@10", "ndcg@10"):
            live.log_metric(f"valid/{branch}/{name}", metrics[name])
    live.next_step()


def _drop_curve_steps_after(log_dir: Path, step: int) -> None:
    """Cut dvclive's curve files (tab-separated, with a `step` column) back to `step`, so that a
    resumed run does not write the steps of the interrupted epoch twice."""
    for curve in (log_dir / "plots" / "metrics").rglob("*.tsv"):
        header, *rows = curve.read_text().splitlines(keepends=True)
        step_column = header.rstrip("\n").split("\t").index("step")
        kept = [row for row in rows if int(row.split("\t")[step_column]) <= step]
        if len(kept) < len(rows):
            with atomic_path(curve) as tmp:
                tmp.write_text(header + "".join(kept))


def _deterministic(env: ddp.Distributed) -> None:
    if env.device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    # warn_only: a CUDA op without a deterministic kernel warns instead of stopping training.
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Deterministic mode also fills every new tensor with NaN, to expose reads of uninitialised
    # memory; no kernel of this model reads any, and the fill was an extra pass over every
    # activation (12% of a training step's CPU time, benchmarks/results/train-profile.txt).
    torch.utils.deterministic.fill_uninitialized_memory = False
