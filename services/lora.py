"""Low-rank adapters (LoRA) on the user side's backbone layers, the pretrained weights kept.

The frozen backbone's attention was trained to read words, not item sequences; a soft
prompt and item tokens can only change what goes in. LoRA (Hu et al., 2021) lets the
user side's attention adapt at a small cost: each adapted projection W [out, in] reads

    y = W x + b + (B (A x)) · scale,    A [r, in], B [out, r], scale = 1

with B zeros at first, so an untrained adapter changes nothing. The adapted layers are
copies of the backbone's first `user_layers` layers owned by one version's model: the
shared encoder, and so every item text vector, stays exactly the pretrained one.

In a version the adapters travel stacked (services/weights.py), L = user_layers,
M = len(TARGETS), H = hidden size:
    lora_a [L, M, r, H]    lora_b [L, M, H, r]
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

# The adapted projections of a BERT layer (as PEFT's target_modules names them): the
# attention's query, key, value and output, all [H, H].
TARGETS = ("attention.self.query", "attention.self.key", "attention.self.value",
           "attention.output.dense")
# alpha / r in the paper's terms; with Adam the rate matters more (lora_lr).
SCALE = 1.0


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update; x [..., in] -> [..., out]."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.zeros(rank, base.in_features))  # [r, in]
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))  # [out, r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T.to(x.dtype)) @ self.lora_b.T.to(x.dtype) * SCALE


def adapted_layers(layers: nn.ModuleList, rank: int) -> nn.ModuleList:
    """Frozen copies of `layers` with every TARGETS projection wrapped in a LoRALinear of
    `rank` (zeros: load a version's adapters with `set_adapters`)."""
    copies = copy.deepcopy(layers)
    for param in copies.parameters():
        param.requires_grad_(False)
    for layer in copies:
        for path in TARGETS:
            parent_path, _, name = path.rpartition(".")
            parent = layer.get_submodule(parent_path)
            setattr(parent, name, LoRALinear(getattr(parent, name), rank))
    return copies


def _adapters(layers: nn.ModuleList) -> list[list[LoRALinear]]:
    return [[layer.get_submodule(path) for path in TARGETS] for layer in layers]


def get_adapters(layers: nn.ModuleList) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (lora_a [L, M, r, H], lora_b [L, M, H, r]), detached copies on the CPU."""
    rows = _adapters(layers)
    a = torch.stack([torch.stack([m.lora_a.detach() for m in row]) for row in rows])
    b = torch.stack([torch.stack([m.lora_b.detach() for m in row]) for row in rows])
    return a.cpu().clone(), b.cpu().clone()


def set_adapters(layers: nn.ModuleList, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    """Copy a version's stacked adapters (shapes as `get_adapters`) into `layers`."""
    with torch.no_grad():
        for i, row in enumerate(_adapters(layers)):
            for j, module in enumerate(row):
                module.lora_a.copy_(lora_a[i, j])
                module.lora_b.copy_(lora_b[i, j])


def initial_adapters(layers: int, rank: int, hidden: int, seed: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """A first version's adapters: A as PEFT draws it (Kaiming-uniform, a = sqrt(5)), from
    a fixed seed so that every process builds the same untrained version; B zeros.
    -> (lora_a [L, M, r, H], lora_b [L, M, H, r])."""
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(hidden)  # kaiming_uniform_(a=sqrt(5)) on an [r, H] matrix
    a = (torch.rand(layers, len(TARGETS), rank, hidden, generator=generator) * 2 - 1) * bound
    return a, torch.zeros(layers, len(TARGETS), hidden, rank)
