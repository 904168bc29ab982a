"""The recommender model: a frozen pretrained encoder read through a soft prompt.

A user is the sequence `[shared soft prompt] + [personal prompt] + [history item vectors]`
(a `user_text` version: `[soft prompt] + [the user's text tokens] + [history]`, the text
being the profile and a request's query, services/user_text.py) fed to the frozen
backbone as `inputs_embeds` (its first `user_layers` layers); the
L2-normalised output at the last item (causal, readout "last") or its mean is the user
vector. An item's vector is the frozen backbone's embedding of its text
(services/backbone.py), offset by its item token when the version has item tokens, so
a new item is rankable as soon as its text is known.

    Score(user, item) = exp(logit_scale) * cos(user, item) [+ item_bias[item]]
                        [+ query_gate * cos(query, item text)]

The last term is a request's query (user_text versions): its sentence vector, made as
the items' text vectors are, against each item's text, weighed by a trained gate, so a
query word reaches the scores whatever the frozen layers do with its tokens.

The version's `PromptStructure` (services/weights.py) decides which weights the module
has, as nanoGPT's config decides its blocks: `item_bias` and `item_tokens` add per-item
weights, `causal` reads the history with causal attention (one pass trains a next-item
prediction at every position, as SASRec does) and adds the personal prompt after the
backbone through a trained gate, and `lora_rank` adapts the user side's attention
(services/lora.py). Everything but those weights is frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.backbone import mean_pool
from services.lora import adapted_layers, get_adapters, set_adapters
from services.weights import BadPromptWeights, PromptStructure, PromptWeights


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool mask (True = may attend) -> the additive mask the attention layers take."""
    additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return additive.masked_fill_(~allowed, torch.finfo(dtype).min)


def _param(tensor: torch.Tensor | None) -> nn.Parameter | None:
    return None if tensor is None else nn.Parameter(tensor.detach().clone().float())


class PromptRecModel(nn.Module):
    """Frozen encoder + one version's trainable weights (soft prompt, temperature and,
    as its structure says, item bias, item tokens, personal gate, LoRA adapters); encodes
    users and scores items."""

    def __init__(self, encoder: nn.Module, weights: PromptWeights):
        super().__init__()
        self.encoder = encoder
        self.structure: PromptStructure = weights.structure
        self.soft_prompt = _param(weights.soft_prompt)  # [P, H]
        self.logit_scale = _param(weights.logit_scale)  # []
        self.item_bias = _param(weights.item_bias)  # [N] or None
        self.item_delta = _param(weights.item_delta)  # [N, H] or None
        self.personal_gate = _param(weights.personal_gate)  # [] or None (causal only)
        self.query_gate = _param(weights.query_gate)  # [] or None (user_text only)
        # With LoRA the user side runs its own adapted copies of the first layers, so the
        # shared encoder (and every item text vector) stays the pretrained one.
        self.adapted = None
        if self.structure.lora_rank:
            layers = encoder.encoder.layer[: self.structure.user_layers]
            self.adapted = adapted_layers(layers, self.structure.lora_rank)
            set_adapters(self.adapted, weights.lora_a, weights.lora_b)
        self.dropout = 0.0  # on the history's item vectors in train mode (training sets it)

    @property
    def causal(self) -> bool:
        return self.structure.causal

    def run_backbone(self, inputs: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        """inputs [B, T, H] embeddings, additive_mask [B, 1, T or 1, T] (0 = may attend,
        dtype-min = may not) -> hidden [B, T, H] after the backbone's embedding layer and
        its first `user_layers` layers (all when 0). Item text vectors come from the whole
        backbone elsewhere; only the user side is shortened."""
        layers = self.encoder.encoder.layer if self.adapted is None else self.adapted
        if self.structure.user_layers:
            layers = layers[: self.structure.user_layers]
        hidden = self.encoder.embeddings(inputs_embeds=inputs)
        for layer in layers:
            hidden = layer(hidden, attention_mask=additive_mask)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return hidden

    @property
    def hidden_size(self) -> int:
        return self.soft_prompt.shape[1]

    def item_table(self, text_vectors: torch.Tensor, rows: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """Frozen text vectors [N, H] -> the item vectors this version reads and ranks [N, H].

        Without item tokens that is the text vectors themselves; with them,
        normalize(text + item_delta). Compute it once per version (serving) or once per
        step (training: the gradient reaches item_delta through both uses).
        """
        if self.item_delta is None:
            return text_vectors if rows is None else text_vectors[rows]
        if rows is not None:  # some rows only ([R, H]): a live catalog's changed items
            return F.normalize(text_vectors[rows] + self.item_delta[rows], dim=-1)
        if self.item_delta.shape != text_vectors.shape:
            raise ValueError(f"item_delta is {tuple(self.item_delta.shape)}, the catalog "
                             f"{tuple(text_vectors.shape)}")
        return F.normalize(text_vectors + self.item_delta, dim=-1)

    def text_tokens(self, text_ids: torch.Tensor | None, batch: int) -> tuple[torch.Tensor, ...]:
        """text_ids [B, U] token ids (TEXT_PAD = -1 left padding) -> (embeddings [B, U, H]
        from the backbone's frozen word embeddings, key mask [B, U]); [B, 0, ...] for a
        version without user text. A user_text version needs the ids (a row of just the
        end token is "no text": services/user_text.py)."""
        if not self.structure.user_text:
            empty = self.soft_prompt.new_zeros(batch, 0, self.hidden_size)
            return empty, torch.zeros(batch, 0, dtype=torch.bool, device=empty.device)
        if text_ids is None or text_ids.shape != (batch, self.structure.user_text_tokens):
            raise ValueError(f"a user_text version reads [{batch}, "
                             f"{self.structure.user_text_tokens}] text ids "
                             f"(services.user_text), got "
                             f"{None if text_ids is None else tuple(text_ids.shape)}")
        text_ids = text_ids.to(self.soft_prompt.device, torch.long)
        words = self.encoder.embeddings.word_embeddings(text_ids.clamp(min=0))
        return words.to(self.soft_prompt.dtype), text_ids >= 0

    def encode_users(self, history: torch.Tensor, history_mask: torch.Tensor,
                     personal: torch.Tensor | None = None, text_ids: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """history [B, L] item vectors (oldest first) [B, L, H], history_mask [B, L],
        personal [B, H] personal prompts (an all-zero row = none), text_ids [B, U] (user_text
        versions) -> users [B, H].

        Input sequence: [shared soft prompt] + [personal prompt] + [history].
        L may be 0 (cold-start users): then the prompt alone encodes the user.
        A causal version encodes the prefix that ends at the user's last item (the full
        mean under its causal mask) and adds the personal prompt after the backbone
        (`add_personal`).
        """
        if self.causal:
            prefixes = self.encode_prefixes(history, history_mask, with_prompt_only=True,
                                            text_ids=text_ids)
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
        hidden = self.run_backbone(inputs, _additive(mask.bool()[:, None, None, :], inputs.dtype))
        return F.normalize(mean_pool(hidden, mask), dim=-1)

    def encode_prefixes(self, history: torch.Tensor, history_mask: torch.Tensor,
                        with_prompt_only: bool = False, text_ids: torch.Tensor | None = None
                        ) -> torch.Tensor:
        """Causal versions only: the user as of every history position in one pass.

        history [B, L, H] (right-padded), history_mask [B, L], text_ids [B, U] (user_text
        versions: the user's text between the prompt and the history) -> users [B, L, H],
        row t = the user after item t, each item attending to the prompt, the text and
        earlier items only (the text reads the prompt and itself causally):
        readout "last" reads the hidden state at item t, "mean" the mean of the hidden
        states of the prompt and items <= t. With
        `with_prompt_only`, [B, L + 1, H] whose row 0 is the prompt alone (with user text:
        the prompt and the text, read at the text's last token, its end token).
        Training reads all L rows, so one pass teaches L next-item predictions (as SASRec
        does). The personal prompt is not an input token here (one token cannot summarise
        a different prefix for each position); `add_personal` mixes it in afterwards.
        """
        batch, length = history.shape[:2]
        n_prompt = self.soft_prompt.shape[0]
        text, text_keys = self.text_tokens(text_ids, batch)  # [B, U, H], [B, U]
        inputs = torch.cat([self.soft_prompt.unsqueeze(0).expand(batch, -1, -1), text,
                            history.to(self.soft_prompt.dtype)], dim=1)
        keys = torch.cat([torch.ones(batch, n_prompt, dtype=torch.bool, device=inputs.device),
                          text_keys, history_mask.bool()], dim=1)  # [B, T]
        n_prefix = n_prompt + text.shape[1]  # what every history item may read
        total = n_prefix + length
        pos = torch.arange(total, device=inputs.device)
        visible = (pos[None, :] <= pos[:, None]) | (pos[None, :] < n_prompt)  # [T(q), T(k)]
        allowed = visible[None] & keys[:, None, :]  # [B, T, T]
        hidden = self.run_backbone(inputs, _additive(allowed[:, None], inputs.dtype))  # [B, T, H]
        if self.structure.readout == "last":
            prefixes = F.normalize(hidden, dim=-1)
        else:
            weights = keys.unsqueeze(-1).to(hidden.dtype)
            sums = (hidden * weights).cumsum(1)
            counts = weights.cumsum(1).clamp(min=1e-6)
            prefixes = F.normalize(sums / counts, dim=-1)  # [B, T, H]
        return prefixes[:, n_prefix - 1 if with_prompt_only else n_prefix:]

    def add_personal(self, users: torch.Tensor, personal: torch.Tensor | None) -> torch.Tensor:
        """Causal versions: users [B, H] or [B, L, H] + personal_gate x personal prompts of
        the same shape (all-zero = none), renormalised. The gate is trained; it starts at 0."""
        if personal is None or self.personal_gate is None:
            return users
        return F.normalize(users + self.personal_gate * personal.to(users.dtype), dim=-1)

    def logits(self, users: torch.Tensor, items: torch.Tensor,
               query_scores: torch.Tensor | None = None) -> torch.Tensor:
        """users [B, H] (or [B, L, H]), items [N, H] unit vectors (the whole catalog, in
        catalog order, when there is an item bias), query_scores [B, N] (`query_scores`)
        -> [B, N] (or [B, L, N])."""
        scores = self.logit_scale.exp() * users @ items.T
        if self.item_bias is not None:
            if self.item_bias.shape[0] != items.shape[0]:
                raise ValueError(f"item_bias has {self.item_bias.shape[0]} items, the catalog "
                                 f"{items.shape[0]}")
            scores = scores + self.item_bias
        return scores if query_scores is None else scores + query_scores

    def query_scores(self, query: torch.Tensor | None, text_vectors: torch.Tensor
                     ) -> torch.Tensor | None:
        """query [B, H] the queries' unit sentence vectors (services.backbone.embed_texts;
        an all-zero row = no query), text_vectors [N, H] the items' frozen text vectors ->
        what each query adds to each item's score [B, N]: query_gate x cos; None for a
        version without the gate or without queries."""
        if query is None or self.query_gate is None:
            return None
        query = query.to(text_vectors.device, text_vectors.dtype)
        return self.query_gate.to(text_vectors.dtype) * (query @ text_vectors.T)

    def forward(self, history_idx: torch.Tensor, history_mask: torch.Tensor,
                text_vectors: torch.Tensor, personal: torch.Tensor | None = None,
                text_ids: torch.Tensor | None = None, query: torch.Tensor | None = None
                ) -> torch.Tensor:
        """The training path: history_idx [B, L] catalog indices (anything where masked),
        history_mask [B, L], text_vectors [N, H] frozen, personal [B, H], text_ids [B, U]
        (user_text versions), query [B, H] (`query_scores`) -> logits [B, N];
        for a causal version personal is [B, L, H] (the prompt after each position) and
        the logits [B, L + 1, N]: row 0 (the prompt alone, as a user without history is
        encoded) scores the first history item, row t + 1 the item after history item t.
        A query is what the user asked for after the whole history, so it scores the
        target's row only (row L_b, the row after the last real item).

        The item table is built inside forward, so under DDP the item tokens' gradient is
        part of the pass that DDP synchronises.
        """
        items = self.item_table(text_vectors)
        history = items[history_idx] * history_mask.unsqueeze(-1).to(items.dtype)
        history = F.dropout(history, self.dropout, self.training and self.dropout > 0)
        asked = self.query_scores(query, text_vectors)
        if asked is None and self.query_gate is not None:  # DDP needs each weight in the pass
            asked = 0 * self.query_gate
        if self.causal:
            users = self.encode_prefixes(history, history_mask, with_prompt_only=True,
                                         text_ids=text_ids)
            if personal is not None:  # no personal prompt before the first item
                personal = torch.cat([torch.zeros_like(personal[:, :1]), personal], dim=1)
            logits = self.logits(self.add_personal(users, personal), items)
            if asked is not None:
                rows = torch.arange(logits.shape[0], device=logits.device)
                last = history_mask.long().sum(1)
                logits = logits.index_put((rows, last), logits[rows, last] + asked)
            return logits
        return self.logits(self.encode_users(history, history_mask, personal, text_ids), items,
                           asked)

    def weights(self) -> PromptWeights:
        """The current weights, detached, on the CPU (a new version to encode or keep)."""
        def copy(param: nn.Parameter | None) -> torch.Tensor | None:
            return None if param is None else param.detach().cpu().clone()

        lora_a, lora_b = get_adapters(self.adapted) if self.adapted is not None else (None, None)
        return PromptWeights(self.structure, soft_prompt=copy(self.soft_prompt),
                             logit_scale=copy(self.logit_scale),
                             item_bias=copy(self.item_bias), item_delta=copy(self.item_delta),
                             personal_gate=copy(self.personal_gate), lora_a=lora_a,
                             lora_b=lora_b, query_gate=copy(self.query_gate))

    def load_weights(self, weights: PromptWeights) -> None:
        """Copy in a version of this model's structure; another structure is refused (build
        a new module for it: the structure decides which parameters exist)."""
        if diff := weights.structure.differences(self.structure):
            raise BadPromptWeights(f"weights of another structure than the model's "
                                   f"({', '.join(diff)}: weights vs model)")
        tensors = weights.tensors()
        if self.adapted is not None:
            set_adapters(self.adapted, tensors.pop("lora_a"), tensors.pop("lora_b"))
        with torch.no_grad():
            for name, tensor in tensors.items():
                getattr(self, name).copy_(tensor)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
