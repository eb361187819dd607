"""A tiny GPT (`model.name = "gpt"`): a decoder-only transformer for next-token prediction.

Token + learned position embeddings, `layers` pre-norm blocks (LayerNorm -> causal self-attention
-> residual, LayerNorm -> 4x MLP with GELU -> residual), a final LayerNorm and an output layer that
shares the token embedding's weights (weight tying, Press & Wolf 2017). Attention is
`torch.nn.functional.scaled_dot_product_attention(is_causal=True)`, so each position sees itself
and the positions before it. Initialisation follows GPT-2: N(0, 0.02), the residual output
projections scaled by 1 / sqrt(2 x layers).

Inputs are token ids (N, T) with T <= context; the output is per-token logits (N, T, V), which
`bigbatch.trainer.objective` trains with the mean token loss. No dropout and no BatchNorm: a
forward pass is a function of the weights and the batch alone, so 1 and 2 ranks give the same
losses and a resumed run the same weights.

Size: 12 x layers x width^2 (blocks) + (V + context) x width (embeddings); the defaults (4
layers, width 128, context 128, V = 256 bytes) have 0.84 M parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bigbatch.config.sections import GPT_DEFAULTS
from bigbatch.errors import ConfigError


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (N, H, T, c/H)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(n, t, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, context: int, layers: int = 4, width: int = 128, heads: int = 4):
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tok.weight  # weight tying
        self.apply(self._init)
        for b in self.blocks:  # GPT-2: residual projections scaled by the depth
            for lin in (b.proj, b.out):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        idx, t = idx.long(), idx.shape[1]  # long: also a float meta tensor (the FLOP count)
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def build_gpt(input_shape: tuple[int, ...], vocab: int, kwargs: dict) -> GPT:
    """The GPT for token sequences of `input_shape` = (T,) over `vocab` tokens, from model.kwargs
    (layers, width, heads, context; checked by ModelConfig; context defaults to T, must be >= T)."""
    if len(input_shape) != 1:
        raise ConfigError("model.name", f"gpt needs token sequences (N, T) (data.name = 'pysrc'); got input shape {input_shape}")
    k = {**GPT_DEFAULTS, "context": input_shape[0], **kwargs}
    if k["context"] < input_shape[0]:
        raise ConfigError("model.kwargs.context", f"{k['context']} is shorter than the data's windows ({input_shape[0]} tokens)")
    return GPT(vocab, k["context"], k["layers"], k["width"], k["heads"])
