"""A training-free router for partitioned experts: least squares on calibration text.

After a dense FFN is cut into experts, a fresh router knows nothing. Following MoEfication's idea
of predicting which experts a token activates most, :func:`fit_routers` fits each linear router by
least squares to ``log(mean |h|)`` of each expert's channels on calibration tokens (centred per
token), so top-k picks the experts whose channels would fire hardest and a sigmoid gate opens for
the experts above the token's average. Our design; fine-tuning then takes over.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moekit.convert.calibration import MIN_CALIBRATION_TOKENS, calibration_batches_for, default_run
from moekit.layer import MoE
from moekit.routing import LinearRouter

__all__ = ["fit_routers"]


@torch.no_grad()
def fit_routers(model: nn.Module, calibration, run: Callable | None = None, ridge: float = 1e-3,
                scale: float = 1.0, min_tokens: int = MIN_CALIBRATION_TOKENS, max_tokens: int = 8192) -> int:
    """Fit the router of every MoE layer with a linear router (``TopK``, ``SigmoidSTE``...) in place;
    returns the number of layers fitted. Layers are fitted in order, each on the inputs it receives
    once the layers before it route with their fitted routers."""
    batches = calibration_batches_for(calibration, min_tokens, "fit_routers")
    moes = [m for m in model.modules() if isinstance(m, MoE) and isinstance(m.gate, LinearRouter)]
    if not moes:
        raise ValueError("fit_routers: the model has no MoE layer with a linear router")
    was = model.training
    model.eval()
    try:
        for moe in moes:
            xs: list[torch.Tensor] = []

            def grab(mod, args, xs=xs):
                xs.append(args[0].detach().reshape(-1, mod.d_model).float())

            h = moe.register_forward_pre_hook(grab)
            try:
                seen = 0
                for b in batches:
                    (run or default_run)(model, b)
                    seen = sum(x.shape[0] for x in xs)
                    if seen >= max_tokens:
                        break
            finally:
                h.remove()
            x = torch.cat(xs)[:max_tokens]
            ex = moe.experts
            hid = torch.einsum("td,eod->teo", x, ex.first_proj.float())
            if ex.first_bias is not None:
                hid = hid + ex.first_bias.float()
            target = ex.act.apply(hid).abs().mean(-1).clamp_min(1e-6).log()  # [T, E]
            target = scale * (target - target.mean(-1, keepdim=True)) / target.std().clamp_min(1e-6)
            xb = torch.cat([x, torch.ones(x.shape[0], 1)], 1)  # the centring absorbs a bias; fit one, drop it
            a = xb.T @ xb + ridge * x.shape[0] * torch.eye(xb.shape[1])
            w = torch.linalg.solve(a, xb.T @ target)[:-1]  # [D, E]
            moe.gate.weight.copy_(w.T.to(moe.gate.weight.dtype))
    finally:
        model.train(was)
    return len(moes)
