"""A one-MoE-layer model whose routing is given, for the compression tests."""

import torch
from torch import nn

from moekit import MoE, Routing


class Fixed(nn.Module):
    """A model of one MoE layer whose routing is given: token t goes to ``experts[t]`` with ``weights[t]``."""

    def __init__(self, experts, weights):
        super().__init__()
        self.moe = MoE(4, 8, 3, router="topk")
        self.experts, self.weights = torch.tensor(experts), torch.tensor(weights)

    def forward(self, x):
        T = x.shape[0]
        r = Routing(token=torch.arange(T), expert=self.experts, weight=self.weights, num_tokens=T, num_experts=3)
        return self.moe(x, routing=r)
