"""One prompt version held active on the live catalog: `ActivePrompt` (immutable, what a
request reads) and `PromptSlot`, which builds the next one when the version or the
catalog changes. A replica has two slots: the serving version's and a canary's."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from services.catalog import Catalog
from services.item_weights import CatalogRows
from services.prompt_model import PromptRecModel
from services.row_buffer import RowBuffer, with_rows
from services.weights import PromptWeights


@dataclass(frozen=True)
class ActivePrompt:
    version: int
    sha256: str
    model: PromptRecModel
    items: torch.Tensor  # [N, H] the item vectors this version reads and ranks
    catalog: Catalog  # the catalog version they are of (names, filters, masks)
    swap_ms: float  # weights received -> this reference built
    publish_to_live_ms: float | None  # registry made it serving -> live here (None at start-up)

    @property
    def catalog_version(self) -> int:
        return self.catalog.version


class PromptSlot:
    """`active`: this slot's version on the catalog it was last built on (None: empty).

    Not thread-safe on its own: PromptSwap builds under one lock for both slots.
    """

    def __init__(self, encoder):
        self.encoder = encoder
        self.active: ActivePrompt | None = None
        self.prompt: tuple[dict, PromptWeights] | None = None  # entry (no blob), weights
        self._rows: CatalogRows | None = None  # the version's rows on the catalog
        self._table_buffer: RowBuffer | None = None  # spare rows of the active item table

    @property
    def version(self) -> int:
        return self.active.version if self.active else 0

    def load(self, entry: dict, weights: PromptWeights, catalog: Catalog,
             started: float, live_ms: float | None) -> None:
        self.prompt = ({k: v for k, v in entry.items() if k != "blob"}, weights)
        self.build(catalog, started)
        self.active = dataclasses.replace(self.active, publish_to_live_ms=live_ms)

    def clear(self) -> None:
        self.active = self.prompt = self._rows = self._table_buffer = None

    def build(self, catalog: Catalog, started: float) -> None:
        """This slot's version on `catalog`, made active (nothing when empty). For a
        catalog changed from the active one, only the changed rows are computed."""
        if self.prompt is None:
            return
        entry, weights = self.prompt
        if self._rows is None or self._rows.weights is not weights:
            self._rows = CatalogRows(weights)
        model = PromptRecModel(self.encoder, self._rows.on(catalog))
        with torch.inference_mode():
            items = self._item_table(model, entry, catalog)
        swap_ms = round((time.perf_counter() - started) * 1000, 2)
        publish_ms = self.active.publish_to_live_ms if self.active else None
        self.active = ActivePrompt(entry["version"], entry["sha256"], model, items, catalog,
                                   swap_ms, publish_ms)

    def _item_table(self, model: PromptRecModel, entry: dict, catalog: Catalog
                    ) -> torch.Tensor:
        """[N, H] the item vectors `model` ranks: once per version, never per request; the
        changed rows only when the catalog changed from the active one's."""
        active = self.active
        if model.item_delta is None:
            return catalog.vectors
        if active is None or active.sha256 != entry["sha256"] or \
                catalog.parent_version != active.catalog.version or \
                catalog.parent_size != len(active.catalog):
            self._table_buffer = None
            return model.item_table(catalog.vectors)
        replaced = list(catalog.replaced)
        fresh = model.item_table(catalog.vectors, torch.tensor(
            [*replaced, *range(catalog.parent_size, len(catalog))], dtype=torch.long))
        table, self._table_buffer = with_rows(active.items, replaced, fresh[:len(replaced)],
                                              fresh[len(replaced):], self._table_buffer)
        return table
