"""The prompt weights: what one prompt version is, how it travels, and the rules on it.

A version is a `PromptWeights`: its tensors plus the `PromptStructure` that shaped them
(what decides which tensors exist, and the hidden and catalog sizes they fit), as a PEFT
config decides its module; nothing is inferred from which keys a blob happens to hold.

Tensors (float32), H = backbone hidden size, N = catalog size:
    soft_prompt    [P, H]  always; initialised from the token embeddings of a task text
    logit_scale    []      always; softmax temperature, log-space
    item_bias      [N]     structure.item_bias: one float per catalog item (zeros at first)
    item_delta     [N, H]  structure.item_tokens: a learned offset per item (zeros at first)
    personal_gate  []      structure.causal: weight of the personal prompt
    query_gate     []      structure.query_gate: weight of a query's text match (0 at first)
    lora_a         [L, M, r, H]  structure.lora_rank: low-rank adapters of the user side's
    lora_b         [L, M, H, r]  L = user_layers layers, M projections (services/lora.py)
    item_ids       [B]     with per-item weights: the rows' N item ids, a JSON list in uint8

On the wire a version is one safetensors blob whose metadata records the structure under
one key, METADATA_KEY, as a JSON string (metadata values are strings):
    {"causal": true, "format": "promptrec.prompt/1", "hidden_size": 384,
     "item_bias": true, "item_tokens": true, "num_items": 1682, "prompt_len": 16,
     "lora_rank": 0, "query_gate": false, "readout": "last", "user_layers": 2,
     "user_text": false, "user_text_tokens": 0}
`decode_weights` checks a blob against its metadata and what the caller expects
(`decode_version`, services/decoded.py, once per process per version). A version
serves any later catalog: `aligned_to` maps its rows onto the catalog's by item id, and
items it never knew start from what their text says.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from services.config import ModelConfig
from services.lora import TARGETS as LORA_TARGETS
from services.lora import initial_adapters

FORMAT = "promptrec.prompt/1"
# The ModelConfig fields that decide which tensors a version has and their shapes.
CONFIG_FIELDS = ("prompt_len", "item_bias", "item_tokens", "causal", "readout", "user_layers",
                 "lora_rank", "user_text", "user_text_tokens")
# Fields added after the first blobs: a blob without them was trained with these values.
LEGACY_DEFAULTS = {"readout": "mean", "user_layers": 0, "lora_rank": 0, "user_text": False,
                   "user_text_tokens": 0, "query_gate": False}
METADATA_KEY = "promptrec"
TENSOR_NAMES = ("soft_prompt", "logit_scale", "item_bias", "item_delta", "personal_gate",
                "lora_a", "lora_b", "query_gate")
ITEM_IDS = "item_ids"


class BadPromptWeights(ValueError):
    """Refused weights: not a current blob, a structure other than the one expected,
    wrong tensors or shapes, or values that are not finite."""


@dataclass(frozen=True)
class PromptStructure:
    """The shape of a prompt version: the ModelConfig fields that trained it and the
    sizes it fits. `num_items` counts the rows of the per-item weights; a version without
    them fits any catalog, so it records 0."""

    prompt_len: int
    hidden_size: int
    num_items: int = 0
    item_bias: bool = False
    item_tokens: bool = False
    causal: bool = False
    readout: str = "mean"  # "last": the hidden state at the user's last item (causal only)
    user_layers: int = 0  # the backbone's first k layers read the user; 0 = all
    lora_rank: int = 0  # adapters of that rank on the user side's layers; 0 = none
    user_text: bool = False  # reads the user's own text (services/user_text.py)
    user_text_tokens: int = 0  # how many text positions it reads (0 without user_text)
    query_gate: bool = False  # scores a query's sentence vector against item texts (user_text)

    def __post_init__(self) -> None:
        if not self.user_text:  # frozen, so set through object; as num_items below
            object.__setattr__(self, "user_text_tokens", 0)
            object.__setattr__(self, "query_gate", False)
        elif self.user_text_tokens < 2 or not self.causal:
            raise ValueError("user_text needs causal and user_text_tokens >= 2")
        if self.lora_rank < 0 or (self.lora_rank and self.user_layers <= 0):
            raise ValueError("lora_rank needs user_layers >= 1 (the adapted layers)")
        if not self.has_item_weights:
            object.__setattr__(self, "num_items", 0)  # frozen; see the class docstring
        elif self.num_items <= 0:
            raise ValueError("item_bias and item_tokens need the catalog size (num_items)")

    @classmethod
    def of(cls, config: ModelConfig, hidden_size: int, num_items: int = 0) -> PromptStructure:
        return cls(prompt_len=config.prompt_len, hidden_size=hidden_size, num_items=num_items,
                   item_bias=config.item_bias, item_tokens=config.item_tokens,
                   causal=config.causal, readout=config.readout if config.causal else "mean",
                   user_layers=config.user_layers, lora_rank=config.lora_rank,
                   user_text=config.user_text, user_text_tokens=config.user_text_tokens,
                   query_gate=config.user_text)

    @property
    def has_item_weights(self) -> bool:
        return self.item_bias or self.item_tokens

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """The tensors this structure has, name -> shape."""
        shapes = {"soft_prompt": (self.prompt_len, self.hidden_size), "logit_scale": ()}
        if self.item_bias:
            shapes["item_bias"] = (self.num_items,)
        if self.item_tokens:
            shapes["item_delta"] = (self.num_items, self.hidden_size)
        if self.causal:
            shapes["personal_gate"] = ()
        if self.query_gate:
            shapes["query_gate"] = ()
        if self.lora_rank:
            adapted = (self.user_layers, len(LORA_TARGETS))
            shapes["lora_a"] = (*adapted, self.lora_rank, self.hidden_size)
            shapes["lora_b"] = (*adapted, self.hidden_size, self.lora_rank)
        return shapes

    def differences(self, other: PromptStructure, names: tuple[str, ...] | None = None
                    ) -> list[str]:
        """'field mine vs other' for each field (of `names`, default all) that differs."""
        names = names or tuple(f.name for f in dataclasses.fields(self))
        return [f"{n} {getattr(self, n)} vs {getattr(other, n)}" for n in names
                if getattr(self, n) != getattr(other, n)]

    def to_metadata(self) -> dict[str, str]:
        """{METADATA_KEY: one JSON string}: one key, because safetensors writes several
        in a random order, and equal weights should give equal bytes (checksums)."""
        fields = {"format": FORMAT, **dataclasses.asdict(self)}
        return {METADATA_KEY: json.dumps(fields, sort_keys=True)}

    @classmethod
    def from_metadata(cls, meta: dict[str, str] | None) -> PromptStructure:
        try:
            fields = json.loads((meta or {})[METADATA_KEY])
        except (KeyError, ValueError):
            raise BadPromptWeights(
                f"no {METADATA_KEY!r} metadata: weights written before versions recorded "
                "their structure are not read") from None
        if not isinstance(fields, dict) or fields.pop("format", None) != FORMAT:
            raise BadPromptWeights(f"structure metadata is not {FORMAT}: {meta}")
        types = {f.name: f.type for f in dataclasses.fields(cls)}  # "int" / "bool" / "str"
        fields = {**{k: v for k, v in LEGACY_DEFAULTS.items() if k not in fields}, **fields}
        if set(fields) != set(types) or any(
                type(v).__name__ != types[k] for k, v in fields.items()):
            raise BadPromptWeights(f"bad structure metadata {fields}: need {types}")
        try:
            return cls(**fields)
        except ValueError as err:
            raise BadPromptWeights(f"bad structure metadata {fields}: {err}") from None


@dataclass(frozen=True, eq=False)
class PromptWeights:
    """One prompt version: its structure and its tensors (shapes in the module docstring).
    Decoded versions may be shared (services/decoded.py): treat the tensors as read-only
    and derive new versions with `dataclasses.replace`."""

    structure: PromptStructure
    soft_prompt: torch.Tensor
    logit_scale: torch.Tensor
    item_bias: torch.Tensor | None = None
    item_delta: torch.Tensor | None = None
    personal_gate: torch.Tensor | None = None
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    query_gate: torch.Tensor | None = None
    item_ids: tuple[str, ...] | None = None  # the rows' items (None: the catalog's order)

    @classmethod
    def plain(cls, soft_prompt: torch.Tensor, logit_scale: torch.Tensor) -> PromptWeights:
        """A version with no optional parts: soft_prompt [P, H], logit_scale []."""
        structure = PromptStructure(prompt_len=soft_prompt.shape[0],
                                    hidden_size=soft_prompt.shape[1])
        return cls(structure, soft_prompt=soft_prompt, logit_scale=logit_scale)

    @property
    def has_item_weights(self) -> bool:
        return self.structure.has_item_weights

    def tensors(self) -> dict[str, torch.Tensor]:
        """name -> tensor, for the tensors that are set."""
        return {n: getattr(self, n) for n in TENSOR_NAMES if getattr(self, n) is not None}

    def to_bytes(self) -> bytes:
        """One safetensors blob with the structure in its metadata; not checked here (the
        reader checks, so refusals can be tested)."""
        tensors = {k: v.detach().cpu().contiguous().float() for k, v in self.tensors().items()}
        if self.item_ids is not None and self.has_item_weights:
            ids = json.dumps(list(self.item_ids), separators=(",", ":")).encode()
            tensors[ITEM_IDS] = torch.frombuffer(bytearray(ids), dtype=torch.uint8)
        return st_save(tensors, metadata=self.structure.to_metadata())

    def check(self, hidden_size: int | None = None, num_items: int | None = None,
              config: ModelConfig | None = None) -> PromptWeights:
        """Raise `BadPromptWeights` unless the tensors are the structure's, of its shapes,
        fit what the caller expects (`check_fits`) and are finite; -> self."""
        shapes = self.structure.tensor_shapes()
        tensors = self.tensors()
        if set(tensors) != set(shapes):
            raise BadPromptWeights(f"tensors {sorted(tensors)}: the structure {self.structure} "
                                   f"has {sorted(shapes)}")
        for name, shape in shapes.items():
            if tuple(tensors[name].shape) != shape:
                raise BadPromptWeights(f"{name} shape {tuple(tensors[name].shape)}, the "
                                       f"structure says {shape}")
        self.check_fits(hidden_size, num_items, config)
        if not all(torch.isfinite(t).all() for t in tensors.values()):
            raise BadPromptWeights("non-finite values")
        return self

    def check_fits(self, hidden_size: int | None = None, num_items: int | None = None,
                   config: ModelConfig | None = None) -> None:
        """Raise `BadPromptWeights` unless the version fits a backbone of `hidden_size`, a
        catalog of `num_items` (when it has per-item weights) and the model `config`."""
        s = self.structure
        if hidden_size is not None and s.hidden_size != hidden_size:
            raise BadPromptWeights(f"soft_prompt shape {tuple(self.soft_prompt.shape)}: "
                                   f"hidden size {s.hidden_size}, the backbone {hidden_size}")
        if self.item_ids is not None and len(self.item_ids) != s.num_items:
            raise BadPromptWeights(f"{len(self.item_ids)} item ids for {s.num_items} rows")
        # Rows keyed by item id fit any catalog (`aligned_to`); positional ones one size.
        if num_items is not None and s.has_item_weights and self.item_ids is None \
                and s.num_items != num_items:
            name = "item_bias" if s.item_bias else "item_delta"
            raise BadPromptWeights(f"{name} has {s.num_items} items, the catalog {num_items}")
        if config is not None:
            wanted = PromptStructure.of(config, s.hidden_size, s.num_items or 1)
            if diff := s.differences(wanted, CONFIG_FIELDS):
                raise BadPromptWeights(f"weights of another model config ({', '.join(diff)})")


def decode_weights(blob: bytes, hidden_size: int | None = None, num_items: int | None = None,
                   config: ModelConfig | None = None) -> PromptWeights:
    """Parse and check a blob (see `PromptWeights.check`); raise `BadPromptWeights` rather
    than serve garbage."""
    try:
        tensors = st_load(blob)
        header_len = int.from_bytes(blob[:8], "little")  # safetensors: u64 LE, then JSON
        meta = json.loads(blob[8:8 + header_len]).get("__metadata__")
    except Exception as err:  # safetensors raises several types for corrupt input
        raise BadPromptWeights(f"not a safetensors blob: {err}") from None
    structure = PromptStructure.from_metadata(meta)
    item_ids = None
    if ITEM_IDS in tensors:
        try:
            item_ids = tuple(json.loads(tensors.pop(ITEM_IDS).numpy().tobytes()))
        except ValueError as err:
            raise BadPromptWeights(f"{ITEM_IDS} is not a JSON list: {err}") from None
        if not all(isinstance(i, str) for i in item_ids):
            raise BadPromptWeights(f"{ITEM_IDS} must be a list of text")
    known = set(structure.tensor_shapes())
    if not set(tensors) <= known:
        raise BadPromptWeights(f"tensors {sorted(tensors)}: the structure {structure} has "
                               f"{sorted(known)}")
    # A missing tensor stays None, and check() names it.
    weights = PromptWeights(structure, **{n: tensors.get(n) for n in TENSOR_NAMES},
                            item_ids=item_ids)
    return weights.check(hidden_size, num_items, config)


def init_soft_prompt(tokenizer, encoder: nn.Module, config: ModelConfig) -> torch.Tensor:
    """Token embeddings of `prompt_init_text`, repeated/cut to `prompt_len` -> [P, H]."""
    ids = tokenizer(config.prompt_init_text, add_special_tokens=False)["input_ids"] or [0]
    ids = (ids * math.ceil(config.prompt_len / len(ids)))[: config.prompt_len]
    table = encoder.get_input_embeddings().weight
    return table[torch.tensor(ids)].detach().clone()


# The untrained version's personal-prompt gate. Above 0 the personal prompt (a recency
# average of the user's item vectors) counts before any round: on ML-100K validation the
# untrained version's NDCG@10 was 0.0198 with gate 0, 0.0215 with 0.5, 0.0206 with 1.0.
INITIAL_PERSONAL_GATE = 0.5


def initial_weights(tokenizer, encoder: nn.Module, config: ModelConfig,
                    num_items: int = 0, item_ids: list[str] | None = None) -> PromptWeights:
    """A first version of the structure `config` gives: the soft prompt from the task
    text, temperature 20, zero item weights (rows for `item_ids`, or `num_items`
    positional ones), the personal gate `INITIAL_PERSONAL_GATE`, adapters that change
    nothing yet (`services.lora.initial_adapters`)."""
    prompt = init_soft_prompt(tokenizer, encoder, config)  # [P, H]
    num_items = len(item_ids) if item_ids is not None else num_items
    s = PromptStructure.of(config, prompt.shape[1], num_items)
    lora_a, lora_b = initial_adapters(s.user_layers, s.lora_rank, s.hidden_size) \
        if s.lora_rank else (None, None)
    return PromptWeights(
        s, soft_prompt=prompt, logit_scale=torch.tensor(math.log(20.0)),
        item_bias=torch.zeros(s.num_items) if s.item_bias else None,
        item_delta=torch.zeros(s.num_items, s.hidden_size) if s.item_tokens else None,
        personal_gate=torch.tensor(INITIAL_PERSONAL_GATE) if s.causal else None,
        lora_a=lora_a, lora_b=lora_b, query_gate=torch.tensor(0.0) if s.query_gate else None,
        item_ids=tuple(item_ids) if item_ids is not None and s.has_item_weights else None)
