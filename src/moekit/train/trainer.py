"""The trainer: AdamW, warmup + cosine, clipping, MoE auxiliary losses, budgets, exact resume.

Everything that decides the next step is saved in a checkpoint: weights, optimizer moments, the
torch RNG, and the step (data batches and the learning rate are pure functions of the step), so
``resume=True`` continues a killed run with the same losses an uninterrupted run would have had.

A run folder (``out_dir``) is moekit's own: ``moekit.json`` records the run's id, its
:class:`TrainConfig` and the caller's ``settings`` (model config, data fingerprint), with the
checksum of every file the caller asked to keep with the run (its tokenizer). Starting a run in a
folder that holds one needs ``overwrite=True``; resuming compares the settings and refuses a
conflicting one (the few that are well defined to change, such as more steps, are applied and
reported). A step whose loss or gradient is NaN or inf is skipped, never applied and never
checkpointed; ``max_nonfinite`` of them in a row stop the run with :class:`TrainingDiverged`.

The run lives on ``TrainConfig.device`` (the CPU unless asked; ``auto``: CUDA where there is a
GPU); a resume may move it to another device (checkpoints are read to the CPU first). In a process
group of several ranks (torchrun, :func:`moekit.parallel.init_distributed`) it is data parallel:
every rank reads its slice of each step's batch (so every layout sees the same data), replicated
parameters are averaged by ``DistributedDataParallel``, expert shards
(:func:`moekit.parallel.expert_parallel`, excluded from DDP) over their replicas, and world rank 0
alone writes the run folder. Each expert shard's writer keeps its checkpoints under
``checkpoints/rank{r}-of-{N}``; a resume takes the newest step that every shard of a layout holds,
written at this layout or any other.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from moekit._checks import check_number
from moekit.data.dataset import TokenStream
from moekit.io import (
    MANIFEST,
    IntegrityError,
    MoekitWarning,
    atomic_write_text,
    check_target,
    claim_folder,
    clean_stale,
    dumps,
    kind_of,
    read_json,
    remove_folder,
    update_manifest,
    verify,
    write_folder,
)
from moekit.models.gpt import MODEL_KIND
from moekit.parallel import (
    clip_grad_norm,
    device_name,
    expert_groups,
    is_expert_parallel,
    resolve_device,
    sync_expert_gradients,
)
from moekit.train.checkpoint import (
    FOLDER_KIND,
    LATEST,
    all_finite,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    set_aside,
    step_folders,
)
from moekit.train.checkpoint import KIND as CKPT_KIND
from moekit.train.evaluate import evaluate
from moekit.train.schedule import warmup_cosine
from moekit.train.step import lm_and_aux, set_lr

RUN_KIND = "train-run"
#: TrainConfig fields a resumed run may change: what they mean from the resumed step on is well defined
RESUMABLE = ("steps", "minutes", "lr", "eval_every", "ckpt_every", "log_every", "eval_chunks", "max_nonfinite",
             "device")
_SHARD_FOLDER = re.compile(r"^rank(\d+)-of-(\d+)$")


class TrainingDiverged(RuntimeError):
    """The loss or the gradients stayed NaN or inf: the run stopped; the message names the last finite checkpoint."""


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
    max_nonfinite: int = 3  # steps in a row with a NaN/inf loss or gradient before the run stops
    device: str = "cpu"  # cpu, cuda, cuda:N or auto (CUDA where there is a GPU); a torch.device is taken by its name

    def __post_init__(self) -> None:
        o = "TrainConfig"
        try:
            self.device = device_name(self.device)
        except ValueError as e:
            raise ValueError(f"{o}: {e}") from None
        for name in ("steps", "batch_size", "seq_len", "log_every", "eval_chunks", "max_nonfinite"):
            check_number(name, getattr(self, name), lo=1, integer=True, owner=o)
        for name in ("warmup_steps", "eval_every", "ckpt_every", "seed"):
            check_number(name, getattr(self, name), lo=0, integer=True, owner=o)
        check_number("lr", self.lr, lo=0, lo_open=True, owner=o)
        check_number("min_lr_ratio", self.min_lr_ratio, lo=0, hi=1, owner=o)
        check_number("weight_decay", self.weight_decay, lo=0, owner=o)
        check_number("beta1", self.beta1, lo=0, hi=1, owner=o)
        check_number("beta2", self.beta2, lo=0, hi=1, owner=o)
        check_number("grad_clip", self.grad_clip, lo=0, owner=o)
        if self.minutes is not None:
            if isinstance(self.minutes, bool) or not isinstance(self.minutes, (int, float)) or not self.minutes > 0 \
                    or not math.isfinite(self.minutes):
                raise ValueError(f"TrainConfig: minutes must be > 0, got {self.minutes!r}; omit it for no time limit")

    def lr_at(self, step: int) -> float:
        """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
        return warmup_cosine(step, self.steps, self.lr, self.warmup_steps, self.min_lr_ratio)


def _mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


class _Losses(nn.Module):
    """The model's LM and auxiliary losses as one module's forward: what DistributedDataParallel wraps."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return lm_and_aux(self.model, x, y)


def _data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``(x, y) -> (lm, aux)`` of ``model``, its replicated parameters' gradients averaged over the
    world by DistributedDataParallel; the expert shards are left out of DDP (they differ from rank to
    rank: :func:`moekit.parallel.sync_expert_gradients` averages them over their replicas). A static
    graph: the parameters a step uses are the same at every step (in moekit's models every router
    and replicated layer runs at every step; DDP stops with an error where that fails). A parameter
    some ranks leave unused gets zeros from them, one no rank uses keeps no gradient, as in one process."""
    losses = _Losses(model)
    replicated = [p for p in model.parameters() if p.requires_grad and not is_expert_parallel(p)]
    if not replicated:
        return losses
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        losses, [f"model.{n}" for n, p in model.named_parameters() if is_expert_parallel(p)])
    return DistributedDataParallel(losses, device_ids=[device.index] if device.type == "cuda" else None,
                                   static_graph=True)


def _checkpoint_sets(root: Path, run: str | None, current: list[Path]) -> list[tuple[int, list[Path]]]:
    """``(step, folders)`` for every step of run ``run`` that every folder of one layout under ``root``
    holds (``root`` itself: one process or data parallel; ``rank{i}-of-{N}``: ``N`` expert shards),
    newest first, the ``current`` layout first among equal steps. Folders of a step whose manifest is
    unreadable count (they are verified, and set aside, next)."""
    shards: dict[int, set[int]] = {}
    for f in sorted(root.glob("rank*-of-*")) if root.is_dir() else []:
        if (m := _SHARD_FOLDER.match(f.name)) and f.is_dir():
            shards.setdefault(int(m[2]), set()).add(int(m[1]))
    layouts = [[root]] + [[root / f"rank{i}-of-{n}" for i in range(n)] for n, have in sorted(shards.items())
                          if have == set(range(n))]
    found = []
    for folders in layouts:
        steps = []
        for f in folders:
            clean_stale(f)
            steps.append({s for s, p in step_folders(f)
                          if kind_of(p) != CKPT_KIND or read_json(p / MANIFEST).get("run") == run})
        found += [(s, folders) for s in set.intersection(*steps)]
    return sorted(found, key=lambda c: (-c[0], c[1] != current))


def _all_checkpoints(out_dir: Path) -> list[tuple[int, Path, str | None]]:
    """Every checkpoint of a run folder: ``checkpoints/step-*`` or, expert-parallel, ``checkpoints/rank*/step-*``."""
    root = out_dir / "checkpoints"
    folders = [root] + sorted(p for p in root.glob("rank*-of-*") if p.is_dir()) if root.is_dir() else []
    return [c for f in folders for c in list_checkpoints(f)]


def discard_run(out_dir: Path) -> None:
    """Remove what moekit wrote for the run in ``out_dir`` (its checkpoints, model and metrics; the
    manifest and the files it lists are rewritten by the new run), each proved moekit's by a
    manifest; anything else in the folder stays."""
    for _, p, _ in _all_checkpoints(out_dir):
        remove_folder(p, CKPT_KIND)
    root = out_dir / "checkpoints"
    for f in [*sorted(root.glob("rank*-of-*")), root] if root.is_dir() else []:
        if kind_of(f) == FOLDER_KIND:
            (f / LATEST).unlink(missing_ok=True)
            remove_folder(f, FOLDER_KIND)
    if kind_of(out_dir / "model") == MODEL_KIND:
        if kind_of(out_dir / "model" / "experts") == "expert-store":  # the store moekit generate wrote beside it
            remove_folder(out_dir / "model" / "experts", "expert-store")
        remove_folder(out_dir / "model", MODEL_KIND)
    (out_dir / "metrics.jsonl").unlink(missing_ok=True)  # its manifest and files are written anew next


def _diff(old: dict, new: dict, prefix: str = "") -> dict[str, tuple]:
    """``{key: (old, new)}`` for every (nested) key whose value differs."""
    out = {}
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(_diff(a, b, f"{prefix}{k}."))
        elif json.loads(dumps(a)) != json.loads(dumps(b)):
            out[prefix + k] = (a, b)
    return out


class Trainer:
    """Train ``model`` (a causal LM with ``.loss(x, y)``) on a token stream.

    Args:
        out_dir: the run folder: ``moekit.json``, ``metrics.jsonl`` and ``checkpoints/`` (``None``:
            nothing is written).
        settings: JSON-able description of what else defines the run (model config, data
            fingerprint...): recorded with the run, and a resume with other settings is refused.
        files: ``{name: text or bytes}`` kept in the run folder with a checksum (a tokenizer).
        overwrite: start a new run in an ``out_dir`` that holds one (its checkpoints are removed
            once the new run has written its first).
        keep: checkpoints kept (the newest).
        progress: ``False`` silences the bar.
    """

    def __init__(self, model, train: TokenStream, val: TokenStream | None = None, config: TrainConfig | None = None,
                 out_dir: str | os.PathLike | None = None, progress: bool = True, name: str = "train",
                 settings: dict | None = None, files: dict[str, str | bytes] | None = None, overwrite: bool = False,
                 keep: int = 2) -> None:
        self.model, self.train_data, self.val_data = model, train, val
        self.config = config or TrainConfig()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress, self.name = progress, name
        self.settings = json.loads(dumps(settings)) if settings is not None else None
        self.files, self.overwrite = dict(files or {}), overwrite
        check_number("keep", keep, lo=1, integer=True, owner="Trainer")
        self.keep = keep
        train.check_fits(self.config.seq_len, "training data")
        if val is not None:
            val.check_fits(self.config.seq_len, "validation data")
        self.device = resolve_device(self.config.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        model.to(self.device)
        self._place(model)
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        c = self.config
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=c.lr, betas=(c.beta1, c.beta2),
        )
        self.step = 0
        self.history: list[dict] = []
        self.run: str | None = None  # the run's id, once started
        self.started = False
        self.nonfinite_streak = 0
        self._losses = _data_parallel(model, self.device) if self.world > 1 else _Losses(model)

    def _place(self, model: nn.Module) -> None:
        """This process's place in the run: its world rank (``world`` processes in the default group,
        1 without one), its expert shard (``shard = (r, N)``, or ``None``), who writes what."""
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.rank = dist.get_rank() if self.world > 1 else 0
        groups = expert_groups(model)
        self.ep_group, self.shard, replica = None, None, 0
        if groups is not None:
            ep, dp = groups
            self.ep_group, self.shard = ep, (dist.get_rank(ep), dist.get_world_size(ep))
            replicas = dist.get_world_size(dp) if dp is not None else 1
            replica = dist.get_rank(dp) if dp is not None else 0
            if self.shard[1] * replicas != self.world:
                raise ValueError(f"Trainer: the experts are sharded over {self.shard[1]} ranks with {replicas} "
                                 f"replicas, but the world has {self.world} processes; shard them with "
                                 "expert_parallel(model, mesh=parallel_mesh(N)) so that every process holds a shard")
        if self.config.batch_size % self.world:
            raise ValueError(f"TrainConfig: batch_size {self.config.batch_size} does not split over {self.world} "
                             f"processes; give a multiple of {self.world} (every process takes an equal slice)")
        self.writes = self.rank == 0  # the run folder and the metrics
        self.writes_checkpoint = replica == 0 if self.shard else self.writes

    # ----------------------------------------------------------------------------------- io

    @property
    def ckpt_dir(self) -> Path | None:
        if self.out_dir is None:
            return None
        if self.shard:  # each shard keeps its experts and their optimizer state
            return self.out_dir / "checkpoints" / f"rank{self.shard[0]}-of-{self.shard[1]}"
        return self.out_dir / "checkpoints"

    def _log(self, record: dict) -> None:
        record = json.loads(dumps(record))  # NaN / inf as null: every line stays JSON
        self.history.append(record)
        if self.out_dir is not None and self.writes:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            # one write() of a whole line with O_APPEND: a kill never leaves half a record behind
            fd = os.open(self.out_dir / "metrics.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, (dumps(record, indent=None) + "\n").encode("utf-8"))
            finally:
                os.close(fd)

    def save(self) -> Path | None:
        """Checkpoint the current step (finite weights only; see :func:`save_checkpoint`)."""
        if self.ckpt_dir is None:
            return None
        if not self.started:
            self.start()
        path = None
        if self.writes_checkpoint:
            path = save_checkpoint(self.ckpt_dir, self.step, self.model, self.optimizer,
                                   {"config": asdict(self.config), "history": self.history}, keep=self.keep,
                                   run=self.run, prune=not self.shard)
        if self.world > 1:  # older shards go only once every rank has written this step
            self._barrier()
        if self.shard and self.writes_checkpoint:
            prune_checkpoints(self.ckpt_dir, self.step, self.keep, self.run)
        return path

    def _barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def _run_meta(self) -> dict:
        return {"run": self.run, "config": asdict(self.config), "settings": self.settings}

    def _write_run(self) -> None:
        with write_folder(self.out_dir, RUN_KIND, "run folder", meta=self._run_meta()) as w:
            for fname, data in self.files.items():
                w.write_bytes(fname, data.encode("utf-8") if isinstance(data, str) else data)

    def _share_run_id(self) -> None:
        if self.world > 1:  # every rank tags its checkpoints with rank 0's run id
            box = [self.run]
            dist.broadcast_object_list(box, src=0)
            self.run = box[0]

    def start(self, resume: bool = False) -> None:
        """Prepare the run folder: a new run (``resume=False``) or the newest verified checkpoint of
        the run in ``out_dir``. :meth:`train` calls it."""
        self.started = True
        if self.out_dir is None:
            if resume:
                raise ValueError("Trainer: resume=True needs an out_dir")
            return
        if resume:
            self._resume()
            return
        if self.writes:
            if check_target(self.out_dir, RUN_KIND, "run folder"):
                if not self.overwrite:
                    done = [s for s, _, _ in _all_checkpoints(self.out_dir)]
                    at = f" (checkpoints up to step {max(done)})" if done else ""
                    raise FileExistsError(f"{self.out_dir}: holds a moekit training run{at}; continue it with --resume "
                                          "(resume=True) or start a new one in its place with --overwrite "
                                          "(overwrite=True)")
                discard_run(self.out_dir)
            self.run = uuid.uuid4().hex[:12]
            self._write_run()
            atomic_write_text(self.out_dir / "metrics.jsonl", "")
            if self.shard:  # the shards' folders live in moekit's own folder, where one process may resume
                claim_folder(self.out_dir / "checkpoints", FOLDER_KIND, "checkpoint folder")
        self._share_run_id()

    def _resume(self) -> None:
        c, fix = self.config, "start a new run (--overwrite) or resume another folder"
        meta = verify(self.out_dir, RUN_KIND, fix)
        self.run = meta.get("run")
        changed = _diff(meta.get("config") or {}, asdict(c))
        refused = {k: v for k, v in changed.items() if k not in RESUMABLE}
        if self.settings is not None:
            refused.update({f"settings.{k}": v for k, v in _diff(meta.get("settings") or {}, self.settings).items()})
        else:
            self.settings = meta.get("settings")
        if refused:
            detail = "; ".join(f"{k}: run {a!r}, now {b!r}" for k, (a, b) in refused.items())
            raise ValueError(f"resume: {self.out_dir} was started with other settings ({detail}); resume with the "
                             "run's own settings, or start a new run (--overwrite)")
        ckpt = self._pick_checkpoint()
        if ckpt is None:
            raise FileNotFoundError(f"resume: no complete checkpoint under {self.out_dir / 'checkpoints'}; start a "
                                    "new run (--overwrite)")
        state = load_checkpoint(ckpt, self.model, self.optimizer, verified=True)
        self.step, self.history = state["step"], state["history"]
        if c.steps < self.step:
            raise ValueError(f"resume: steps={c.steps} but the run is already at step {self.step}; give more steps")
        applied = {k: v for k, v in changed.items() if k in RESUMABLE}
        if applied and self.writes:
            update_manifest(self.out_dir, RUN_KIND, config=asdict(c))  # the run now continues with these
            note = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in applied.items())
            warnings.warn(f"resume: continuing from step {self.step} with {note}"
                          + (" (the cosine schedule now ends at the new step count)" if "steps" in applied else ""),
                          MoekitWarning, stacklevel=3)
        # forget what a killed run logged after its last checkpoint
        if self.writes:
            atomic_write_text(self.out_dir / "metrics.jsonl", "".join(dumps(r, indent=None) + "\n" for r in self.history))

    def _pick_checkpoint(self) -> list[Path] | None:
        """The folders (one per expert shard) of the newest checkpoint of this run that every shard
        of its layout holds (a kill while the shards are written leaves some a step ahead) and that
        verifies, at this layout or another; world rank 0 looks, every rank gets its answer. Newer
        ones that do not verify are set aside (renamed, never deleted) with a warning."""
        choice = None
        if self.writes:
            root = self.out_dir / "checkpoints"
            current = [root / f"rank{i}-of-{self.shard[1]}" for i in range(self.shard[1])] if self.shard else [root]
            choice = next((c for c in map(self._verified, _checkpoint_sets(root, self.run, current)) if c), None)
        if self.world > 1:
            box = [choice]
            dist.broadcast_object_list(box, src=0)
            choice = box[0]
        return choice

    def _verified(self, candidate: tuple[int, list[Path]]) -> list[Path] | None:
        """The checkpoint folders of ``(step, layout folders)`` if every one verifies, else ``None``."""
        step, folders = candidate
        paths = [f / f"step-{step:07d}" for f in folders]
        for p in paths:
            try:
                verify(p, CKPT_KIND, "skipped")
            except (IntegrityError, FileNotFoundError) as e:
                aside = set_aside(p)
                warnings.warn(f"resume: skipped a checkpoint that does not verify ({e}); moved it to {aside.name}",
                              MoekitWarning, stacklevel=5)
                return None
        return paths

    # ----------------------------------------------------------------------------------- loop

    def train_step(self) -> dict:
        """One step. A NaN or inf loss or gradient norm skips it: the batch is consumed, no update is
        applied (the record says ``"skipped": true``)."""
        c = self.config
        self.model.train()
        x, y = self._batch()
        lr = c.lr_at(self.step)
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        lm, aux = self._losses(x, y)
        (lm + aux).backward()
        clip = c.grad_clip or math.inf  # the norm is computed either way: it is checked below
        if self.shard:
            sync_expert_gradients(self.model)
            grad_norm = clip_grad_norm(self.model, clip, self.ep_group)
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        if self.world > 1:  # the mean loss of the global batch
            lm, aux = _mean_over_ranks(lm.detach()), _mean_over_ranks(aux.detach())
        rec = {"step": self.step + 1, "loss": float(lm.detach()), "aux": float(aux.detach()), "lr": lr,
               "grad_norm": grad_norm}
        bad = [k for k in ("loss", "aux", "grad_norm") if not math.isfinite(rec[k])]
        if bad:  # identical on every rank: the losses and the norm are global
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.nonfinite_streak += 1
            return {**rec, "skipped": True, "nonfinite": bad}
        self.optimizer.step()
        ok = torch.tensor(float(all_finite(self.model.parameters())), device=self.device)
        if self.world > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not ok:
            raise TrainingDiverged(f"training diverged: the update of step {self.step + 1} made weights NaN or inf "
                                   f"(learning rate {lr:.3g}); {self._last_checkpoint_text()}")
        self.step += 1
        self.nonfinite_streak = 0
        return rec

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the step's batch (the same global batch at every layout), on the device."""
        c = self.config
        x, y = self.train_data.batch(self.step, c.batch_size, c.seq_len, c.seed)
        n = c.batch_size // self.world
        mine = slice(self.rank * n, (self.rank + 1) * n)
        return x[mine].to(self.device), y[mine].to(self.device)

    def _last_checkpoint_text(self) -> str:
        mine = sorted((s, p) for s, p, r in _all_checkpoints(self.out_dir) if r == self.run) if self.out_dir else []
        if not mine:
            return "no checkpoint was written yet: start again with a lower learning rate (--lr, with --overwrite)"
        s, p = mine[-1]
        return (f"the last finite checkpoint is {p} (step {s}): resume from it with a lower learning rate "
                "(moekit train --resume --lr ...)")

    def evaluate(self, **kw):
        return evaluate(self.model, self.val_data, self.config.seq_len, self.config.batch_size,
                        kw.pop("max_chunks", self.config.eval_chunks), **kw)

    def train(self, resume: bool = False) -> list[dict]:
        """Run until ``config.steps`` or the wall-clock budget; return the metrics history. Raises
        :class:`TrainingDiverged` after ``max_nonfinite`` skipped steps in a row."""
        c = self.config
        if not self.started:
            self.start(resume)
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
                if self.world > 1 and c.minutes is not None:  # every rank stops at the same step, or the rest hang
                    flag = torch.tensor(float(over), device=self.device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    over = bool(flag)
                if over and window_steps == 1 and not self.history:
                    raise ValueError(
                        f"TrainConfig: minutes={c.minutes} is too small to train one step (one step took "
                        f"{elapsed:.1f} s); give at least {elapsed / 60 * 2:.2f} minutes or fewer tokens per step"
                    )
                if rec.get("skipped"):
                    self._log(rec)
                    if self.nonfinite_streak >= c.max_nonfinite:
                        first = self.step - self.nonfinite_streak + 1
                        self._log({"step": self.step, "stopped": "diverged"})
                        raise TrainingDiverged(
                            f"training diverged: steps {first}-{self.step} had a NaN or inf loss or gradient "
                            f"({self.nonfinite_streak} in a row, the limit max_nonfinite={c.max_nonfinite}); none "
                            f"was applied; {self._last_checkpoint_text()}")
                elif self.step % c.log_every == 0 or self.step == c.steps:
                    now = time.perf_counter()
                    rec["tok_s"] = window_steps * tokens_per_step / max(now - window_t, 1e-9)
                    rec["elapsed_s"] = elapsed
                    window_t, window_steps = now, 0
                    self._log(rec)
                    info = f"loss {rec['loss']:.3f}  ppl {math.exp(min(rec['loss'], 50)):.1f}  {rec['tok_s']:,.0f} tok/s"
                healthy = not rec.get("skipped")
                if healthy and self.val_data is not None and c.eval_every and self.step % c.eval_every == 0 \
                        and self.step < c.steps:
                    ev = self.evaluate()
                    self._log({"step": self.step, "val_loss": ev.loss, "val_ppl": ev.ppl})
                if healthy and self.ckpt_dir is not None and c.ckpt_every and self.step % c.ckpt_every == 0:
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
