"""KeyMap: how a transformers state dict and Starling's hold the same tensors, one table read both ways."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KeyMap:
    """renamed: Starling key -> transformers key, for tensors stored alike (but for `reordered`).
    fused: Starling key -> the transformers keys whose tensors it concatenates along dim 0, each with
    its number of rows (Starling fuses q, k and v into one projection, and gate with up).
    reordered: Starling key (one of `renamed`) -> the order in which Starling holds the transformers
    tensor's rows, ours = theirs[order] (BLOOM interleaves q, k and v per head; Starling stacks them)."""

    renamed: dict[str, str] = field(default_factory=dict)
    fused: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    reordered: dict[str, torch.Tensor] = field(default_factory=dict)

    def from_hf(self, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Starling's state dict from a transformers one."""
        out = {ours: hf[theirs] for ours, theirs in self.renamed.items()}
        for ours, parts in self.fused.items():
            out[ours] = torch.cat([hf[theirs] for theirs, _ in parts])
        for ours, order in self.reordered.items():
            out[ours] = out[ours][order]
        return out

    def to_hf(self, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A transformers state dict from Starling's."""
        ours = {**ours, **{key: ours[key][order.argsort()] for key, order in self.reordered.items()}}
        out = {theirs: ours[mine] for mine, theirs in self.renamed.items()}
        for mine, parts in self.fused.items():
            names, rows = zip(*parts)
            out.update(zip(names, ours[mine].split(list(rows))))
        return out
