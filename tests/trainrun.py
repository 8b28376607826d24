"""A tiny deterministic training run, for fault injection: ``python -m tests.trainrun OUT STAGE N``
trains it in OUT and kills the process (``os._exit(9)``, nothing cleaned up) at the N-th time the
checkpoint writer reaches STAGE."""

from __future__ import annotations

import os
import sys

import torch

from moekit.data.corpus import Document
from moekit.data.dataset import TokenStream
from moekit.models import GPT, GPTConfig
from moekit.train import TrainConfig, Trainer

VOCAB = 64


def stream() -> TokenStream:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (4000,), generator=g)
    return TokenStream(ids, torch.zeros(ids.numel(), dtype=torch.int32), [Document("x")])


def trainer(out, **kw) -> Trainer:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, max_seq_len=16, d_ff=32).with_moe(4, 2))
    cfg = TrainConfig(**{"steps": 6, "batch_size": 2, "seq_len": 16, "warmup_steps": 1, "log_every": 1,
                         "ckpt_every": 2, "lr": 3e-3, **kw})
    return Trainer(model, stream(), None, cfg, out_dir=out, progress=False)


if __name__ == "__main__":
    out, stage, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
    seen = 0

    def kill(s: str) -> None:
        global seen
        if s == stage:
            seen += 1
            if seen == nth:
                os._exit(9)

    if len(sys.argv) > 4 and sys.argv[4] == "no-exchange":
        import moekit.io

        moekit.io.folders._exchange = lambda a, b: False
    from moekit.io import fault_hook

    with fault_hook(kill):
        trainer(out).train()
    sys.exit(3)  # the stage was never reached
