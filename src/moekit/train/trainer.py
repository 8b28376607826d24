"""The trainer: AdamW, warmup + cosine, clipping, MoE auxiliary losses, budgets, exact resume.

Everything that decides the next step is saved in a checkpoint: weights, optimizer moments, the
torch RNG, and the step (data batches and the learning rate are pure functions of the step), so
``resume=True`` continues a killed run with the same losses an uninterrupted run would have had.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..data.dataset import TokenStream
from ..io import atomic_write_text
from ..layer import aux_loss
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .evaluate import evaluate


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 0  # 0: evaluate only at the end
    eval_chunks: int = 64
    ckpt_every: int = 0  # 0: no periodic checkpoints (one at the end if out_dir is set)
    minutes: float | None = None  # wall-clock budget; the run stops cleanly when it is spent
    seed: int = 0
    log_every: int = 10

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig: {name} must be an int >= 1, got {v!r}")
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError(f"TrainConfig: minutes must be > 0, got {self.minutes!r}; omit it for no time limit")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig: lr must be > 0, got {self.lr!r}")

    def lr_at(self, step: int) -> float:
        """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        t = min(1.0, (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _mean_over_ranks(t: torch.Tensor, group) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t / dist.get_world_size(group)


class Trainer:
    """Train ``model`` (a causal LM with ``.loss(x, y)``) on a token stream.

    ``out_dir`` receives ``metrics.jsonl`` and ``checkpoints/``. ``progress=False`` silences the bar.
    """

    def __init__(self, model, train: TokenStream, val: TokenStream | None = None, config: TrainConfig | None = None,
                 out_dir: str | os.PathLike | None = None, progress: bool = True, name: str = "train") -> None:
        self.model, self.train_data, self.val_data = model, train, val
        self.config = config or TrainConfig()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress, self.name = progress, name
        train.check_fits(self.config.seq_len, "training data")
        if val is not None:
            val.check_fits(self.config.seq_len, "validation data")
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        c = self.config
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=c.lr, betas=(c.beta1, c.beta2),
        )
        self.step = 0
        self.history: list[dict] = []
        # data + expert parallel (moekit.parallel.expert_parallel): every rank draws its own batches,
        # gradients are synchronised, rank 0 alone writes
        self.ep_group = getattr(model, "moekit_ep_group", False)
        self.parallel = self.ep_group is not False
        self.rank = dist.get_rank(self.ep_group) if self.parallel else 0
        self.writes = self.rank == 0

    # ----------------------------------------------------------------------------------- io

    @property
    def ckpt_dir(self) -> Path | None:
        if self.out_dir is None:
            return None
        if self.parallel:  # each rank keeps its shard of the experts and of the optimizer state
            return self.out_dir / "checkpoints" / f"rank{self.rank}-of-{dist.get_world_size(self.ep_group)}"
        return self.out_dir / "checkpoints"

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.out_dir is not None and self.writes:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            # one write() of a whole line with O_APPEND: a kill never leaves half a record behind
            fd = os.open(self.out_dir / "metrics.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
            finally:
                os.close(fd)

    def save(self) -> Path | None:
        if self.ckpt_dir is None:
            return None
        return save_checkpoint(self.ckpt_dir, self.step, self.model, self.optimizer,
                               {"config": asdict(self.config), "history": self.history})

    def _resume(self) -> None:
        ckpt = None if self.ckpt_dir is None else latest_checkpoint(self.ckpt_dir)
        if self.parallel:  # every rank finds its checkpoint, or all stop (a lone error would hang the others)
            found = torch.tensor(float(ckpt is not None))
            dist.all_reduce(found, op=dist.ReduceOp.MIN, group=self.ep_group)
            if not found and ckpt is not None:
                raise FileNotFoundError(f"resume: another rank has no checkpoint beside {self.ckpt_dir}; start a new run")
        if ckpt is None:
            hint = (" (an expert-parallel run resumes at the world size it was written at; at another size, start "
                    "from its saved model)") if self.parallel else ""
            raise FileNotFoundError(
                f"resume: no checkpoint under {self.ckpt_dir}{hint}; run without --resume to start a new run"
            )
        state = load_checkpoint(ckpt, self.model, self.optimizer)
        self.step, self.history = state["step"], state["history"]
        if self.parallel:  # a kill during a checkpoint write can leave the ranks at different steps
            steps = torch.tensor([self.step, -self.step])
            dist.all_reduce(steps, op=dist.ReduceOp.MAX, group=self.ep_group)
            if int(steps[0]) != -int(steps[1]):
                raise ValueError(f"resume: the ranks' latest checkpoints are at different steps ({-int(steps[1])} .. "
                                 f"{int(steps[0])}); point each rank's LATEST file under {self.ckpt_dir.parent} at the "
                                 "same step, or start a new run")
        # forget what a killed run logged after its last checkpoint
        lines = "".join(json.dumps(r) + "\n" for r in self.history)
        if self.writes:
            atomic_write_text(self.out_dir / "metrics.jsonl", lines)

    # ----------------------------------------------------------------------------------- loop

    def train_step(self) -> dict:
        c = self.config
        self.model.train()
        x, y = self.train_data.batch(self.step, c.batch_size, c.seq_len, c.seed + 1009 * self.rank)
        lr = c.lr_at(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        lm = self.model.loss(x, y)
        aux = aux_loss(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        (lm + aux).backward()
        if self.parallel:
            from ..parallel import clip_grad_norm, sync_gradients

            sync_gradients(self.model, self.ep_group)
            grad_norm = clip_grad_norm(self.model, c.grad_clip, self.ep_group) if c.grad_clip else None
            lm, aux = _mean_over_ranks(lm.detach(), self.ep_group), _mean_over_ranks(aux.detach(), self.ep_group)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip) if c.grad_clip else None
        self.optimizer.step()
        self.step += 1
        return {"step": self.step, "loss": float(lm.detach()), "aux": float(aux.detach()), "lr": lr,
                "grad_norm": None if grad_norm is None else float(grad_norm)}

    def evaluate(self, **kw):
        return evaluate(self.model, self.val_data, self.config.seq_len, self.config.batch_size,
                        kw.pop("max_chunks", self.config.eval_chunks), **kw)

    def train(self, resume: bool = False) -> list[dict]:
        """Run until ``config.steps`` or the wall-clock budget; return the metrics history."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        c = self.config
        if resume:
            self._resume()
        elif self.out_dir is not None and self.writes and (self.out_dir / "metrics.jsonl").exists():
            (self.out_dir / "metrics.jsonl").unlink()
        start = time.perf_counter()
        tokens_per_step = c.batch_size * c.seq_len
        window_t, window_steps = time.perf_counter(), 0
        info = ""
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), disable=not (self.progress and self.writes),
                      transient=False) as bar:
            task = bar.add_task(self.name, total=c.steps, completed=self.step, info="")
            while self.step < c.steps:
                rec = self.train_step()
                window_steps += 1
                elapsed = time.perf_counter() - start
                over = c.minutes is not None and elapsed > c.minutes * 60
                if self.parallel and c.minutes is not None:  # every rank stops at the same step, or the rest hang
                    flag = torch.tensor(float(over))
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.ep_group)
                    over = bool(flag)
                if over and window_steps == 1 and not self.history:
                    raise ValueError(
                        f"TrainConfig: minutes={c.minutes} is too small to train one step (one step took "
                        f"{elapsed:.1f} s); give at least {elapsed / 60 * 2:.2f} minutes or fewer tokens per step"
                    )
                if self.step % c.log_every == 0 or self.step == c.steps:
                    now = time.perf_counter()
                    rec["tok_s"] = window_steps * tokens_per_step / max(now - window_t, 1e-9)
                    rec["elapsed_s"] = elapsed
                    window_t, window_steps = now, 0
                    self._log(rec)
                    info = f"loss {rec['loss']:.3f}  ppl {math.exp(min(rec['loss'], 50)):.1f}  {rec['tok_s']:,.0f} tok/s"
                if self.val_data is not None and c.eval_every and self.step % c.eval_every == 0 and self.step < c.steps:
                    ev = self.evaluate()
                    self._log({"step": self.step, "val_loss": ev.loss, "val_ppl": ev.ppl})
                if self.ckpt_dir is not None and c.ckpt_every and self.step % c.ckpt_every == 0:
                    self.save()
                bar.update(task, completed=self.step, info=info)
                if over:
                    self._log({"step": self.step, "stopped": "wall-clock budget", "elapsed_s": elapsed})
                    break
        if self.val_data is not None:
            ev = self.evaluate()
            self._log({"step": self.step, "val_loss": ev.loss, "val_ppl": ev.ppl})
        self.save()
        return self.history
