"""The GPT's configuration: sizes, the per-layer FFN specs (kinds in :mod:`moekit.models.ffn`) and
the Read-ME PreGate's arguments."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

__all__ = ["GPTConfig"]


@dataclass
class GPTConfig:
    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 256
    d_ff: int = 1024  # hidden width of the dense FFN
    #: per-layer FFN specs (``None``: every layer dense). A spec is ``{"kind": "dense"}`` or
    #: ``{"kind": "moe", "num_experts": 8, "d_ff": 512, "router": "topk", "router_args": {"k": 2},
    #: "shared_d_ff": None}``; any registered router name works. MoE++ (router ``"moepp"``) adds
    #: ``"zero_experts"``, ``"copy_experts"``, ``"constant_experts"`` (counts, default 0).
    ffn: list[dict] | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    #: Read-ME pre-gating router (``moekit.models.pregate.PreGate`` arguments without the vocabulary size):
    #: layers whose router is ``"pregate"`` take the expert it picks from the token ids
    pregate: dict | None = None
    extra: dict = field(default_factory=dict)  # free-form metadata (e.g. tokenizer key), compared on load

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "d_ff"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"GPTConfig: {name} must be a positive int, got {v!r}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"GPTConfig: d_model={self.d_model} must split into n_heads={self.n_heads} heads of even width"
            )
        if self.ffn is not None and len(self.ffn) != self.n_layers:
            raise ValueError(f"GPTConfig: ffn has {len(self.ffn)} specs for n_layers={self.n_layers}")

    def layer_ffn(self, i: int) -> dict:
        return {"kind": "dense"} if self.ffn is None else self.ffn[i]

    def with_moe(self, num_experts: int = 8, k: int = 2, router: str = "topk", router_args: dict | None = None,
                 d_ff: int | None = None, every: int = 1, **moe_args) -> GPTConfig:
        """The same model with MoE FFNs in every ``every``-th layer; by default each expert is
        ``d_ff // k`` wide so that the active parameters equal the dense model's. ``moe_args`` go into
        each MoE layer's spec: ``shared_d_ff``, MoE++'s ``zero_experts``, ``copy_experts``,
        ``constant_experts`` (e.g. ``with_moe(8, router="moepp", zero_experts=1, copy_experts=1,
        constant_experts=2)``)."""
        args = {"k": k} if router_args is None else dict(router_args)
        spec = {"kind": "moe", "num_experts": num_experts, "d_ff": d_ff or self.d_ff // k, "router": router,
                "router_args": args, **moe_args}
        return replace(self, ffn=[dict(spec) if (i + 1) % every == 0 else {"kind": "dense"}
                                  for i in range(self.n_layers)])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GPTConfig: unknown fields {unknown}")
        return cls(**d)

    def diff(self, other: GPTConfig) -> dict[str, tuple]:
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}
