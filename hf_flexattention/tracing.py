"""`FlexTrace`: what each FlexAttention layer saw and selected, recorded on request (pictures, hit rates).

Pass a `FlexTrace` as `flex_trace=` to a patched model's forward (or to `generate`, which hands it to every
forward call). It is still the list that a plain `flex_trace=[]` receives, `(layer, selected count per row)` per
selection, and it also keeps, per selection, the low-res attention map and the selected high-res mask of every
high-res row, on the CPU. Recording reads tensors on the host, so it is for inspection, not for timing; without a
trace the model records nothing and pays nothing.

    >>> trace = FlexTrace()
    >>> output = model.generate(**inputs, max_new_tokens=8, flex_trace=trace)
    >>> trace.selections_for(position=inputs["input_ids"].shape[1] - 1)  # the row that predicts the first new token
"""

from dataclasses import dataclass

import torch


@dataclass
class SelectionRecord:
    """One layer's selection for the high-res rows of one forward call.

    Attributes:
        layer: the FlexAttention layer that uses the selection (it was computed from layer `layer - 1`'s attention).
        low_res_map: `(batch, rows, N)` float32: each row's plain attention over the `g x g` low-res image tokens
            (row-major), summed over heads, zero in the padding margin; the map the selection is made from.
        selected: `(batch, rows, M)` bool: the high-res tokens (row-major over the `G x G` grid) each row selected.
        positions: `(batch, rows)` long: each row's position in its sequence (row `t` predicts token `t + 1`).
        valid: `(batch, rows)` bool: rows that are real high-res rows (the others are padding and select nothing).
    """

    layer: int
    low_res_map: torch.Tensor
    selected: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor


class FlexTrace(list):
    """A `flex_trace` list that also records the attention maps and selections (`records`, `SelectionRecord`s)."""

    def __init__(self):
        super().__init__()
        self.records: list[SelectionRecord] = []

    def record_selection(self, layer: int, call, low_res_map: torch.Tensor, selected: torch.Tensor) -> None:
        """Called by the attention function (only when tracing): `low_res_map` `(batch, rows, N)`, `selected`
        `(batch, rows, M)` for the rows of `call` (a `state.FlexCall`)."""
        batch, rows = selected.shape[0], selected.shape[1]
        positions = call.row_positions().detach().cpu().long().expand(batch, rows)
        valid = call.row_valid
        valid = (
            torch.ones(batch, rows, dtype=torch.bool) if valid is None else valid.detach().cpu().expand(batch, rows)
        )
        self.records.append(
            SelectionRecord(
                layer=layer,
                low_res_map=low_res_map.detach().float().cpu(),
                selected=selected.detach().cpu(),
                positions=positions.clone(),
                valid=valid.clone(),
            )
        )

    @property
    def layers(self) -> list[int]:
        """The FlexAttention layers that recorded a selection, ascending."""
        return sorted({record.layer for record in self.records})

    def selections_for(self, position: int, sequence: int = 0) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """`{layer: (low_res_map (N,), selected (M,))}` of the row at sequence `position` of batch entry `sequence`.

        Raises:
            ValueError: if no recorded call holds that row (e.g. a position before the answer, or no image).
        """
        found = {}
        for record in self.records:
            hits = ((record.positions[sequence] == position) & record.valid[sequence]).nonzero()
            if len(hits):
                row = int(hits[0, 0])
                found[record.layer] = (record.low_res_map[sequence, row], record.selected[sequence, row])
        if not found:
            recorded = sorted({int(p) for r in self.records for p in r.positions[sequence][r.valid[sequence]]})
            raise ValueError(
                f"No high-res row at position {position} of sequence {sequence} was recorded (recorded rows: "
                f"{recorded}). Rows that predict answer tokens select: the prompt's last row and each decode step."
            )
        return found


__all__ = ["FlexTrace", "SelectionRecord"]
