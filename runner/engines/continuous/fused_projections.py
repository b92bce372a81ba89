"""One matrix product where a layer reads one input through several projections: attention's q, k
and v, a gated MLP's gate and up. At load their weights are joined into one `nn.Linear` per group
(packed for oneDNN like any other on a CPU); the first projection called with an input computes
the joined product, and each projection returns its columns of it, so the model's own code runs
unchanged. One product instead of three streams the input once and launches one kernel; on a
CPU with oneDNN the results are the same bits (tests/test_engine.py checks the logits). A GPU's
BLAS picks its kernel by the product's shape, so there the last bits can differ.

Only groups of plain `nn.Linear` layers that share dtype, device and input width are joined
(quantized, offloaded or differently placed ones stay as they are).
"""

from __future__ import annotations

from typing import Any

import torch

from runner.engines.continuous.cpu_linear import file_mappings, release_pages

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class JoinedProduct(torch.nn.Module):
    """The joined projection of a group, and its latest product, which the group's members share."""

    def __init__(self, members: list[torch.nn.Linear]):
        super().__init__()
        weights = [member.weight.detach() for member in members]
        biases = [member.bias for member in members]
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        # On the meta device: the weights below replace what a plain Linear would allocate and fill.
        self.joined = torch.nn.Linear(
            weights[0].shape[1], sum(w.shape[0] for w in weights), bias is not None, device="meta"
        )
        self.joined.weight = torch.nn.Parameter(torch.cat(weights), requires_grad=False)
        if bias is not None:
            self.joined.bias = torch.nn.Parameter(bias, requires_grad=False)
        self.bounds = [0]
        for weight in weights:
            self.bounds.append(self.bounds[-1] + weight.shape[0])
        self.input: torch.Tensor | None = None
        self.product: torch.Tensor | None = None
        self.taken = 0

    def columns(self, index: int, inputs: torch.Tensor) -> torch.Tensor:
        """Member `index`'s output: its columns of the joined product of `inputs` (computed by the
        first member that asks; let go once every member has taken its share)."""
        if inputs is not self.input:
            self.input, self.product, self.taken = inputs, self.joined(inputs), 0
        share = self.product[..., self.bounds[index] : self.bounds[index + 1]]
        self.taken += 1
        if self.taken == len(self.bounds) - 1:
            self.input = self.product = None
        return share


class Share(torch.nn.Module):
    """Stands where one projection of a joined group was."""

    def __init__(self, product: JoinedProduct, index: int):
        super().__init__()
        self.index = index
        self.__dict__["product"] = product  # not a submodule: the group's parent holds it once

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.product.columns(self.index, inputs)


def join_projections(model: Any) -> int:
    """Join every q/k/v and gate/up group of plain linear layers; returns how many groups."""
    mapped = file_mappings()
    joined = 0
    for module in list(model.modules()):
        for names in GROUPS:
            members = [getattr(module, name, None) for name in names]
            if not _joinable(members):
                continue
            product = JoinedProduct(members)
            for member in members:
                if member.weight.device.type == "cpu":
                    release_pages(member.weight, mapped)
            module.add_module("_".join(names), product)
            for index, name in enumerate(names):
                setattr(module, name, Share(product, index))
            joined += 1
    return joined


def _joinable(members: list[Any]) -> bool:
    if not all(type(member) is torch.nn.Linear and not hasattr(member, "_hf_hook") for member in members):
        return False
    first = members[0].weight
    return all(
        m.weight.dtype == first.dtype
        and m.weight.device == first.device
        and m.weight.shape[1] == first.shape[1]
        and (m.bias is None) == (members[0].bias is None)
        for m in members
    )
