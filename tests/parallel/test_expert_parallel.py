"""Expert parallelism: two gloo processes (spawn, loopback, timeouts) against one process and the naive reference;
four as 2 data-parallel replicas x 2 expert shards, and checkpoints moving between layouts."""

import copy
import os
import shutil
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moekit import MoE, Routing, aux_loss
from moekit.models import GPT, GPTConfig
from moekit.parallel import (
    exit_now,
    expert_parallel,
    full_state_dict,
    init_distributed,
    is_expert_parallel,
    parallel_mesh,
    sync_gradients,
)
from moekit.train import TrainConfig, Trainer, load_checkpoint
from tests.reference import reference_moe
from tests.trainrun import VOCAB, stream

WORLD = 2


def _init(rank: int, tmp: str, world: int = WORLD, backend: str = "gloo") -> None:
    """Join a group through a rendezvous file (no TCP port to race for with other tests)."""
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))


def _inputs(T: list[int], d: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return [torch.randn(t, d, generator=g) for t in T]


def _layer_case(rank: int, router: str, T: list[int], routing_fn=None) -> None:
    """Output and every gradient of the expert-parallel layer equal the single-process layer's."""
    torch.manual_seed(0)
    ref = MoE(16, 24, 8, router)
    ep = expert_parallel(copy.deepcopy(ref))
    xs = _inputs(T, 16)
    gs = [torch.randn(t, 16, generator=torch.Generator().manual_seed(7 + i)) for i, t in enumerate(T)]
    x = xs[rank].clone().requires_grad_(True)
    r = routing_fn(T[rank]) if routing_fn else None
    y = ep(x, routing=r) if r is not None else ep(x)
    (y * gs[rank]).sum().backward()
    # the single-process oracle on every rank's tokens (each rank runs it identically)
    ref_x = [xi.clone().requires_grad_(True) for xi in xs]
    total = 0
    for i, xi in enumerate(ref_x):
        ri = routing_fn(T[i]) if routing_fn else None
        yi = ref(xi, routing=ri) if ri is not None else ref(xi)
        if i == rank:
            assert torch.allclose(y, yi, atol=1e-5), (router, T, (y - yi).abs().max())
            naive, _ = reference_moe(ref, xi.detach(), ri if ri is not None else ref.gate(xi.detach()))
            assert torch.allclose(y.detach(), naive, atol=1e-5)
        total = total + (yi * gs[i]).sum()
    total.backward()
    assert torch.allclose(x.grad, ref_x[rank].grad, atol=1e-5)
    El = 8 // WORLD
    for name in ("gate_up_proj", "down_proj"):  # expert shards: gradients from every rank's tokens
        p = getattr(ep.experts, name)
        got = p.grad if p.grad is not None else torch.zeros_like(p)  # None: no token reached this rank's experts
        want = getattr(ref.experts, name).grad[rank * El:(rank + 1) * El]
        assert torch.allclose(got, want, atol=1e-5), name
    if routing_fn is None and any(p.requires_grad for p in ref.gate.parameters()):  # the replicated router: local tokens
        g = ep.gate.weight.grad.clone()
        dist.all_reduce(g)
        assert torch.allclose(g, ref.gate.weight.grad, atol=1e-5)


def _gpt_case(rank: int, tmp: str) -> None:
    """A GPT with MoE layers: data + expert parallel training step equals the single-process step
    on the union of the batches; checkpoints gather global experts and reload at another size."""
    cfg = GPTConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, d_ff=64).with_moe(4, 2)
    torch.manual_seed(0)
    ref = GPT(cfg)
    model = expert_parallel(copy.deepcopy(ref))
    g = torch.Generator().manual_seed(5)
    ids = [torch.randint(0, 64, (2, 12), generator=g) for _ in range(WORLD)]
    model.loss(ids[rank][:, :-1], ids[rank][:, 1:]).backward()
    sync_gradients(model)
    ref_loss = sum(ref.loss(i[:, :-1], i[:, 1:]) for i in ids) / WORLD
    ref_loss.backward()
    full = {n: p for n, p in model.named_parameters()}
    for n, p in ref.named_parameters():
        got = full[n].grad
        if got.shape != p.grad.shape:  # an expert shard
            El = got.shape[0]
            want = p.grad[rank * El:(rank + 1) * El]
        else:
            want = p.grad
        assert torch.allclose(got, want, atol=1e-5), n
    state = full_state_dict(model)
    assert all(torch.equal(state[n], t) for n, t in ref.state_dict().items())
    if rank == 0:  # written at 2 ranks, loaded at 1
        ref.load_state_dict(state)
        ref.save(os.path.join(tmp, "ep2"))
    dist.barrier()
    one = GPT.load(os.path.join(tmp, "ep2"))
    again = expert_parallel(GPT.load(os.path.join(tmp, "ep2")))  # and at 2 again
    with torch.no_grad():
        assert torch.allclose(again(ids[rank]), one(ids[rank]), atol=1e-5)


def _sync_case(rank: int) -> None:
    """sync_gradients: the mean over ranks; a parameter only some ranks computed a gradient for
    counts zeros for the others; one no rank did keeps None."""
    m = torch.nn.Linear(3, 2)
    m.extra = torch.nn.Parameter(torch.ones(4))
    m.unused = torch.nn.Parameter(torch.ones(2))
    m.weight.grad = torch.full((2, 3), float(rank + 1))
    m.bias.grad = None
    m.extra.grad = torch.full((4,), 4.0) if rank == 0 else None
    m.shard = torch.nn.Parameter(torch.ones(2, 3))  # an expert shard no token reached on this rank
    m.shard.moekit_ep = (rank, WORLD, 2 * WORLD)
    m.shard.grad = torch.full((2, 3), 6.0) if rank == 0 else None
    sync_gradients(m)
    assert torch.equal(m.weight.grad, torch.full((2, 3), 1.5)) and torch.equal(m.extra.grad, torch.full((4,), 2.0))
    assert m.bias.grad is None and m.unused.grad is None
    assert torch.equal(m.shard.grad, torch.full((2, 3), 3.0) if rank == 0 else torch.zeros(2, 3))  # zeros, not None


def _bad_input_case(rank: int) -> None:
    with pytest.raises(ValueError, match="not divisible by the world size 2"):
        expert_parallel(MoE(8, 16, 3, "topk"))
    with pytest.raises(ValueError, match="different models"):
        expert_parallel(MoE(8, 16, 4 if rank == 0 else 6, "topk"))


def _worker(rank: int, tmp: str) -> None:
    _init(rank, tmp)
    try:
        _sync_case(rank)
        _layer_case(rank, "topk", [10, 7])
        _layer_case(rank, "sigmoid_ste", [9, 12])  # ragged: any number of experts per token
        _layer_case(rank, "expert_choice", [8, 8])
        _layer_case(rank, "topk", [12, 0])  # rank 1 has no tokens, and still takes part in every exchange
        # heavily skewed: every token of both ranks goes to experts 0 and 1, which live on rank 0
        _layer_case(rank, "topk", [11, 5], lambda t: Routing.from_topk(
            torch.tensor([[0, 1]] * t, dtype=torch.long).reshape(t, 2), torch.full((t, 2), 0.5), 8))
        _gpt_case(rank, tmp)
        _bad_input_case(rank)
    finally:
        dist.destroy_process_group()
    exit_now()


def test_expert_parallel_two_processes(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True, start_method="spawn")


def _adamw_idle_rank_case(rank: int) -> None:
    """Several AdamW steps (weight decay on) in expert-parallel form equal the same steps in one
    process on the union of the batches, parameter by parameter, although no token of any rank ever
    reaches rank 1's experts (2 and 3): in one process their slice of the expert tensors still gets a
    zero gradient and decays, so the idle rank's shards must too."""
    import moekit
    from moekit.parallel import is_expert_parallel

    D, E, steps = 8, 4, 4
    torch.manual_seed(0)
    ref = MoE(D, 12, E, "topk")
    with torch.no_grad():  # feature 0 of every input is 5, so experts 2 and 3 score -250 and are never chosen
        ref.gate.weight[2:] = 0.0
        ref.gate.weight[2:, 0] = -50.0
    model = expert_parallel(copy.deepcopy(ref))
    opt_kw = dict(lr=1e-2, weight_decay=0.1)
    ep_opt = torch.optim.AdamW(model.parameters(), **opt_kw)
    ref_opt = torch.optim.AdamW(ref.parameters(), **opt_kw)
    El = E // WORLD
    gen = torch.Generator().manual_seed(11)
    for _ in range(steps):
        xs = [torch.randn(t, D, generator=gen) for t in (6, 5)]
        gs = [torch.randn(t, D, generator=gen) for t in (6, 5)]
        for x in xs:
            x[:, 0] = 5.0
            x.requires_grad_(True)  # as inside a model, where the MoE input is on the autograd graph
        loss = (model(xs[rank]) * gs[rank]).sum() + moekit.aux_loss(model)
        used = model.last_routing.expert.unique().tolist()
        assert set(used) <= {0, 1}, used  # rank 1's experts receive no token, from any rank
        loss.backward()  # on rank 1 the idle shards may have no gradient at all (the grouped_mm backend)
        sync_gradients(model)
        ep_opt.step()
        ep_opt.zero_grad(set_to_none=True)
        ref_loss = 0
        for x, g in zip(xs, gs):
            ref_loss = ref_loss + (ref(x) * g).sum() + moekit.aux_loss(ref)
        (ref_loss / WORLD).backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
    ep_params = dict(model.named_parameters())
    assert set(ep_params) == {n for n, _ in ref.named_parameters()}
    for n, want in ref.named_parameters():
        got = ep_params[n]
        if is_expert_parallel(got):
            want = want[rank * El:(rank + 1) * El]
        assert got.shape == want.shape, n
        assert torch.allclose(got, want, rtol=0, atol=1e-5), (rank, n, (got - want).abs().max())
    if rank == 1:  # and they did move: weight decay shrank the idle experts
        torch.manual_seed(0)
        start = MoE(D, 12, E, "topk")  # the same initial weights as ref
        assert model.experts.down_proj.abs().sum() < start.experts.down_proj[El:].abs().sum()


def _adamw_worker(rank: int, tmp: str) -> None:
    _init(rank, tmp)
    try:
        _adamw_idle_rank_case(rank)
    finally:
        dist.destroy_process_group()
    exit_now()


def test_expert_parallel_adamw_with_an_idle_rank_equals_one_process(tmp_path):
    mp.start_processes(_adamw_worker, args=(str(tmp_path),), nprocs=WORLD, join=True, start_method="spawn")


def _ep_trainer(out):
    torch.manual_seed(0)
    model = expert_parallel(GPT(GPTConfig(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, max_seq_len=16,
                                          d_ff=32).with_moe(4, 2)))
    cfg = TrainConfig(steps=6, batch_size=2, seq_len=16, warmup_steps=1, log_every=1, ckpt_every=2)
    return Trainer(model, stream(), None, cfg, out_dir=out, progress=False)


def _ep_resume_worker(rank: int, tmp: str) -> None:
    """A kill while the ranks write their checkpoints of one step leaves one rank a step ahead:
    resume takes the newest step every rank has, and the run ends as an uninterrupted one."""
    _init(rank, tmp)
    try:
        full = _ep_trainer(os.path.join(tmp, "full"))
        full.train()
        want = full_state_dict(full.model)
        run = os.path.join(tmp, "run")
        _ep_trainer(run).train()
        dist.barrier()
        if rank == 1:  # rank 1 never got to publish step 6; rank 0 did
            import shutil

            shutil.rmtree(os.path.join(run, "checkpoints", "rank1-of-2", "step-0000006"))
        dist.barrier()
        t = _ep_trainer(run)
        t.start(resume=True)
        assert t.step == 4  # the newest step both ranks have (rank 0 kept step 4 until every rank had step 6)
        t.train()
        got = full_state_dict(t.model)
        assert all(torch.equal(got[k], v) for k, v in want.items())
        # keeping one checkpoint: rank 0 removes its step 4 only once rank 1 has published step 6 too
        one = _ep_trainer(os.path.join(tmp, "one"))
        one.keep = 1
        seen = []

        def slow_publish(stage):
            if stage == "publish" and one.step == 6 and rank == 1:
                import time

                time.sleep(1.0)  # rank 0 is done with step 6 by now
                seen.append(os.path.isdir(os.path.join(tmp, "one", "checkpoints", "rank0-of-2", "step-0000004")))

        from moekit.io import fault_hook

        with fault_hook(slow_publish):
            one.train()
        assert rank == 0 or seen[0] is True  # (the periodic save of step 6; the final one saves it again)
    finally:
        dist.destroy_process_group()
    exit_now()


def test_expert_parallel_resume_takes_the_newest_step_every_rank_has(tmp_path):
    mp.start_processes(_ep_resume_worker, args=(str(tmp_path),), nprocs=WORLD, join=True, start_method="spawn")


def test_expert_parallel_needs_a_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        expert_parallel(MoE(8, 16, 4, "topk"))


def test_torchrun_trains_with_expert_parallelism(tmp_path):
    """`torchrun --nproc-per-node 2 -m moekit train --expert-parallel 2`: a real launch; the saved
    model holds every expert under its global id and loads in one process."""
    import subprocess
    import sys

    data = tmp_path / "corpus.txt"
    data.write_text("\n\n".join(f"paragraph {i}: the cat sat on the mat and looked around." for i in range(300)),
                    encoding="utf-8")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "moekit", "train", "--data", str(data), "--out", str(out), "--steps", "4", "--eval-every", "2",
           "--ckpt-every", "2",
           "--vocab", "300", "--d-model", "32", "--layers", "1", "--heads", "2", "--d-ff", "64", "--seq-len", "16",
           "--batch-size", "2", "--warmup", "1", "--no-progress", "--ffn", "moe", "--experts", "4",
           "--expert-parallel", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    model = GPT.load(out / "model")
    assert model.blocks[0].ffn.experts.gate_up_proj.shape[0] == 4
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert any("val_ppl" in line for line in lines) and len({line for line in lines}) == len(lines)  # rank 0 only
    assert (out / "checkpoints" / "rank0-of-2" / "latest").exists() and (out / "checkpoints" / "rank1-of-2").is_dir()
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=240, env=env)
    said = "\n".join(line for line in resumed.stderr.splitlines() if line.startswith("moekit"))
    assert resumed.returncode == 0, said + "\n" + resumed.stderr[-3000:]
    bad = subprocess.run(cmd[:4] + [cmd[4]] + cmd[5:-1] + ["3", "--overwrite"], capture_output=True, text=True,
                         timeout=240, env=env)
    assert bad.returncode != 0 and "torchrun started 2 processes" in bad.stderr




# ----------------------------------------------------------------------------------- expert x data parallel


def _mesh_gpt(balance: float | None = None) -> GPT:
    """A tiny MoE GPT (4 experts); ``balance=0``: no load-balancing loss, the one auxiliary loss that
    is not a mean over tokens, so that a global batch split in slices has the gradient of the whole."""
    args = {"k": 2} if balance is None else {"k": 2, "balance": balance}
    return GPT(GPTConfig(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, max_seq_len=16,
                         d_ff=32).with_moe(4, 2, router_args=args))


def _mesh_config(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 4, "batch_size": 4, "seq_len": 16, "warmup_steps": 1, "log_every": 1,
                          "ckpt_every": 2, "lr": 1e-2, **kw})


def _mesh_step_case(rank: int, mesh) -> None:
    """One Trainer step at 2 replicas x 2 expert shards equals the single-process step written out
    by hand on the same global batch: each rank's output, every gradient, the clipped AdamW update."""
    cfg = _mesh_config(steps=1, grad_clip=0.5)
    torch.manual_seed(0)
    ref = _mesh_gpt()
    model = expert_parallel(copy.deepcopy(ref), mesh=mesh)
    t = Trainer(model, stream(), None, cfg, progress=False)
    x, y = stream().batch(0, 4, 16, cfg.seed)  # the global batch: world rank r takes sequence r
    with torch.no_grad():
        assert torch.allclose(model(x[rank:rank + 1]), ref(x[rank:rank + 1]), atol=1e-5)
    rec = t.train_step()
    opt = torch.optim.AdamW([{"params": [p for p in ref.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in ref.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                            lr=cfg.lr_at(0), betas=(cfg.beta1, cfg.beta2))
    lm, aux = [], []
    for i in range(4):  # data parallel: the mean over the slices of each slice's LM + auxiliary loss
        lm.append(ref.loss(x[i:i + 1], y[i:i + 1]))
        aux.append(aux_loss(ref))
    ((sum(lm) + sum(aux)) / 4).backward()
    norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.grad_clip))
    opt.step()
    assert norm > cfg.grad_clip and rec["grad_norm"] == pytest.approx(norm, rel=1e-5)
    assert rec["loss"] == pytest.approx(float(sum(lm).detach()) / 4, rel=1e-6)
    assert rec["aux"] == pytest.approx(float(sum(aux).detach()) / 4, rel=1e-5) and rec["aux"] > 0
    mine = dict(model.named_parameters())
    for n, p in ref.named_parameters():
        got, want, want_grad = mine[n], p.detach(), p.grad
        if is_expert_parallel(got):  # this rank's experts: those of its column of the mesh
            r, W, E = got.moekit_ep
            assert (r, W) == (rank % 2, 2)
            want, want_grad = want[r * E // W:(r + 1) * E // W], want_grad[r * E // W:(r + 1) * E // W]
        assert torch.allclose(got.grad, want_grad, rtol=1e-4, atol=1e-7), (rank, n)
        assert torch.allclose(got.detach(), want, rtol=0, atol=1e-5), (rank, n, (got - want).abs().max())


def _mesh_checkpoint_case(rank: int, mesh, tmp: str) -> None:
    """Checkpoints written at 2 x 2 (one folder per expert shard, by data-parallel rank 0) by a run
    stopped after step 4, resumed at 4 expert shards x 1; the test resumes a copy in one process.
    The end state goes to a file."""
    run = os.path.join(tmp, "run")
    torch.manual_seed(0)
    t = Trainer(expert_parallel(_mesh_gpt(0.0), mesh=mesh), stream(), None, _mesh_config(steps=6), out_dir=run,
                progress=False)
    t.start()
    for _ in range(4):  # a run of 6 steps stopped after step 4
        t._log(t.train_step())
        if t.step % 2 == 0:
            t.save()
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["moekit.json", "rank0-of-2", "rank1-of-2"]
    if rank == 0:
        shutil.copytree(run, os.path.join(tmp, "for-one-process"))
    dist.barrier()
    torch.manual_seed(1)  # other initial weights: the checkpoint's replace them
    t = Trainer(expert_parallel(_mesh_gpt(0.0)), stream(), None, _mesh_config(steps=6), out_dir=run, progress=False)
    t.train(resume=True)
    state = full_state_dict(t.model)
    if rank == 0:
        torch.save({"state": state, "history": t.history}, os.path.join(tmp, "ep4.pt"))
    assert os.path.isdir(os.path.join(run, "checkpoints", f"rank{rank}-of-4", "step-0000006"))


def _mesh_errors_case(mesh) -> None:
    with pytest.raises(ValueError, match="batch_size 6 does not split over 4 processes"):
        Trainer(_mesh_gpt(), stream(), None, _mesh_config(batch_size=6), progress=False)
    with pytest.raises(ValueError, match="sharded over 2 ranks with 1 replicas, but the world has 4 processes"):
        Trainer(expert_parallel(_mesh_gpt(), group=mesh.get_group("ep")), stream(), None, _mesh_config(),
                progress=False)


def _mesh_worker(rank: int, tmp: str) -> None:
    _init(rank, tmp, world=4)
    try:
        assert init_distributed("cpu") == (rank, 4) and dist.get_backend() == "gloo"  # the group already joined
        mesh = parallel_mesh(2, "cpu")
        assert mesh.mesh_dim_names == ("dp", "ep") and tuple(mesh.shape) == (2, 2)
        _mesh_step_case(rank, mesh)
        _mesh_checkpoint_case(rank, mesh, tmp)
        _mesh_errors_case(mesh)
    finally:
        dist.destroy_process_group()
    exit_now()


def _losses(history: list[dict]) -> list[float]:
    return [r["loss"] for r in history if "loss" in r]


def test_expert_x_data_parallel_equals_one_process_and_checkpoints_move_between_layouts(tmp_path):
    mp.start_processes(_mesh_worker, args=(str(tmp_path),), nprocs=4, join=True, start_method="spawn")
    torch.manual_seed(0)
    ref = Trainer(_mesh_gpt(0.0), stream(), None, _mesh_config(steps=6), progress=False)  # the uninterrupted run
    ref.train()
    want = ref.model.state_dict()
    # steps 1-4 at 2 x 2, then 5-6 at 4 x 1: the single-process run's losses and weights
    ep4 = torch.load(tmp_path / "ep4.pt")
    assert _losses(ep4["history"]) == pytest.approx(_losses(ref.history), rel=1e-5)
    for k, v in want.items():
        assert torch.allclose(ep4["state"][k], v, rtol=0, atol=1e-5), k
    # steps 1-4 at 2 x 2, then 5-6 in one process
    torch.manual_seed(1)
    one = Trainer(_mesh_gpt(0.0), stream(), None, _mesh_config(steps=6), out_dir=tmp_path / "for-one-process",
                  progress=False)
    one.train(resume=True)
    assert _losses(one.history) == pytest.approx(_losses(ref.history), rel=1e-5)
    for k, v in want.items():
        assert torch.allclose(one.model.state_dict()[k], v, rtol=0, atol=1e-5), k
    assert (tmp_path / "for-one-process" / "checkpoints" / "step-0000006").is_dir()
    shards = [tmp_path / "run" / "checkpoints" / f"rank{i}-of-2" / "step-0000004" for i in (1, 0)]
    with pytest.raises(ValueError, match="are not the 2 shards of one checkpoint in order"):
        load_checkpoint(shards, one.model, one.optimizer)


def _nccl_worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    assert init_distributed("cuda") == (rank, 2)  # as under torchrun
    try:
        assert dist.get_backend() == "nccl" and torch.cuda.current_device() == rank
        torch.manual_seed(0)
        model = expert_parallel(_mesh_gpt(0.0).to(f"cuda:{rank}"), mesh=parallel_mesh(2, "cuda"))
        t = Trainer(model, stream(), None, _mesh_config(device="cuda"), progress=False)
        t.train()
        want = torch.load(os.path.join(tmp, "cpu.pt"))
        assert _losses(t.history) == pytest.approx(want["losses"], rel=1e-4)
        state = full_state_dict(t.model)
        for k, v in want["state"].items():
            assert torch.allclose(state[k].cpu(), v, rtol=0, atol=1e-4), k
    finally:
        dist.destroy_process_group()
    exit_now()


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_nccl_expert_parallel_on_two_gpus_follows_the_cpu_run(tmp_path):
    import socket

    torch.manual_seed(0)
    ref = Trainer(_mesh_gpt(0.0), stream(), None, _mesh_config(), progress=False)
    ref.train()
    torch.save({"losses": _losses(ref.history), "state": ref.model.state_dict()}, tmp_path / "cpu.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_nccl_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
