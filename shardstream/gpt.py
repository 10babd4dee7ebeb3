"""The reference trainer's model: a small decoder-only transformer in the spirit of nanochat's GPT.

Rotary position embeddings, parameter-free RMSNorm (also on queries and keys), causal attention through
F.scaled_dot_product_attention, a squared-ReLU MLP, an untied output head and a soft cap on the logits.
Sized by depth as nanochat does: model_dim = depth * 64, one head per 64 dims. No dropout, so a run is a
pure function of its seed, its batches and its optimizer state (exact resume relies on this).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError


@dataclass(frozen=True)
class GPTConfig:
    sequence_len: int = 512
    vocab_size: int = 32768
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    logit_softcap: float = 15.0

    def __post_init__(self):
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ConfigError(f"n_embd={self.n_embd} must split into n_head={self.n_head} heads of an even size")


def config_for_depth(depth, sequence_len, vocab_size, aspect_ratio=64, head_dim=64):
    """nanochat's sizing rule: width grows with depth (model_dim = depth * aspect_ratio)."""
    if not isinstance(depth, int) or depth < 1:
        raise ConfigError(f"--depth must be a positive int, got {depth!r}")
    model_dim = depth * aspect_ratio
    n_head = max(1, model_dim // head_dim)
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head, n_embd=model_dim)


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(seq_len, head_dim, base=10000.0, device=None):
    """cos/sin of shape (1, seq_len, 1, head_dim/2), broadcastable over (B, T, H, D/2)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]


def apply_rotary(x, cos, sin):
    """Rotate pairs (first half, second half) of the last dim of x (B, T, H, D) by position."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_k = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_v = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_head, self.head_dim)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn = CausalSelfAttention(config)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin):
        x = x + self.attn(norm(x), cos, sin)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        cos, sin = rotary_tables(config.sequence_len, config.n_embd // config.n_head)
        # Derived from the config, so not saved in checkpoints.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                bound = math.sqrt(3.0 / linear.in_features)
                nn.init.uniform_(linear.weight, -bound, bound)
            # Residual branches start as identity maps.
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, loss_reduction="mean"):
        B, T = idx.shape
        if T > self.config.sequence_len:
            raise ConfigError(f"sequence of {T} tokens is longer than the model's sequence_len "
                              f"{self.config.sequence_len}")
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = norm(self.wte(idx))
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.lm_head(norm(x)).float()
        cap = self.config.logit_softcap
        logits = cap * torch.tanh(logits / cap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1,
                               reduction=loss_reduction)

    def make_optimizer(self, lr, weight_decay=0.0, betas=(0.9, 0.95)):
        """AdamW; weight decay on the blocks' matrices only (not on the embedding or the head)."""
        decay = [p for block in self.blocks for p in block.parameters() if p.dim() >= 2]
        decay_ids = {id(p) for p in decay}
        rest = [p for p in self.parameters() if id(p) not in decay_ids]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
        for group in groups:
            group["initial_lr"] = lr
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8)
