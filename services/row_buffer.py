"""Tensors that grow by rows without copying the rows they have.

A live catalog grows a few items at a time, and each catalog version is immutable (a
request that read one finishes on it). Copying the whole [N, H] table for each version
cost ~40 ms at 100,000 items in every process that follows the catalog; appending into
spare rows of one buffer costs the new rows only. A version is a view of the buffer's
first N rows: rows past N are never read by it, so writing them is safe, and only the
newest view may be extended in place (an older one is copied first).
"""

from __future__ import annotations

import torch

GROWTH = 1.5  # capacity multiple on each re-allocation: appends cost O(1) amortised


class RowBuffer:
    def __init__(self, rows: torch.Tensor):
        capacity = max(16, int(rows.shape[0] * GROWTH))
        self.buffer = torch.empty((capacity, *rows.shape[1:]), dtype=rows.dtype)
        self.buffer[: rows.shape[0]] = rows
        self.used = rows.shape[0]

    def view(self) -> torch.Tensor:
        return self.buffer[: self.used]

    def owns(self, view: torch.Tensor) -> bool:
        """`view` is this buffer's newest version (so it may be extended in place)."""
        return (view.shape[0] == self.used and view.data_ptr() == self.buffer.data_ptr()
                and view.shape[1:] == self.buffer.shape[1:])


def appended(view: torch.Tensor, rows: torch.Tensor, buffer: RowBuffer | None
             ) -> tuple[torch.Tensor, RowBuffer]:
    """view [N, ...] + rows [k, ...] -> ([N + k, ...], the buffer behind it). `view` and
    every earlier view keep their values."""
    if buffer is not None and buffer.owns(view) and \
            buffer.used + rows.shape[0] <= buffer.buffer.shape[0]:
        buffer.buffer[buffer.used: buffer.used + rows.shape[0]] = rows
        buffer.used += rows.shape[0]
        return buffer.view(), buffer
    grown = RowBuffer(torch.cat([view, rows.to(view.dtype)]))
    return grown.view(), grown


def with_rows(view: torch.Tensor, rows: list[int], values: torch.Tensor,
              appended_rows: torch.Tensor, buffer: RowBuffer | None
              ) -> tuple[torch.Tensor, RowBuffer | None]:
    """`view` with `rows` set to `values` and `appended_rows` added at the end. Setting
    rows copies the table (earlier views must not change); appending alone does not."""
    if rows:
        table = torch.cat([view, appended_rows.to(view.dtype)]) if len(appended_rows) \
            else view.clone()
        table[torch.tensor(rows, dtype=torch.long)] = values.to(view.dtype)
        grown = RowBuffer(table)
        return grown.view(), grown
    if len(appended_rows):
        return appended(view, appended_rows, buffer)
    return view, buffer
