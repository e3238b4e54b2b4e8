"""The GRU4Rec network (Hidasi et al. 2016/2018) as a plain ``nn.Module``: parameters and arithmetic, no I/O.

The module is written so training can work on *rows* of the item tables: the caller gathers the rows it
needs (the inputs of a step, the in-batch targets and the shared negative samples) and passes them in, so
the output layer is only ever evaluated on those items and the item tables get sparse, row-wise updates.
``forward`` is the convenient full form used by evaluation and prediction.

Input modes (``GRU4RecConfig``):
- constrained (shared) embedding: the input embedding of an item IS its row of the output matrix ``Wy``;
- a separate input embedding ``E`` of size ``embedding``;
- none: the item's one-hot vector goes straight into the first GRU layer, whose input weights then are an
  item table ``Wx0`` (``n_items x 3*layers[0]``) read row by row.
Every item also has an output bias ``By``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

Hidden = list[Tensor]


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout with DROP probability ``p`` (kept units are scaled by 1 / (1 - p)).

    Same semantics as ``F.dropout``; drawing the mask with ``rand`` is several times faster on CPU than
    the per-element Bernoulli sampler ``F.dropout`` uses there.
    """
    if not training or p == 0.0:
        return x
    keep = (torch.rand_like(x) >= p).to(x.dtype)
    return x * keep.mul_(1.0 / (1.0 - p))


def glorot_(weight: Tensor, fan_in: int, fan_out: int) -> Tensor:
    """Glorot/Xavier uniform init in place: U(-sqrt(6/(fan_in+fan_out)), +sqrt(6/(fan_in+fan_out)))."""
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


class GRULayer(nn.Module):
    """One GRU layer as a single-step cell: h' = (1 - z) * h + z * n (the GRU4Rec orientation of z).

    The reset gate scales the hidden projection (r * (W_hn h + b_hn)), the cuDNN/``nn.GRUCell`` form the
    PyTorch reference uses, so the hidden state needs one fused matrix product per step. Gate blocks are
    stored side by side (reset | update | candidate); each block gets its own Glorot init, biases start at 0.
    ``w_ih`` is None when the layer reads precomputed input projections (one-hot input mode).
    """

    def __init__(self, n_in: int | None, n_hidden: int) -> None:
        super().__init__()
        self.n_hidden = n_hidden
        self.w_ih = nn.Parameter(torch.empty(n_in, 3 * n_hidden)) if n_in is not None else None
        self.w_hh = nn.Parameter(torch.empty(n_hidden, 3 * n_hidden))
        self.bias = nn.Parameter(torch.zeros(3 * n_hidden))  # input side
        self.bias_hh = nn.Parameter(torch.zeros(3 * n_hidden))  # hidden side (b_hn sits inside r * (...))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        h = self.n_hidden
        for gate in range(3):
            if self.w_ih is not None:
                glorot_(self.w_ih.data[:, gate * h : (gate + 1) * h], self.w_ih.shape[0], h)
            glorot_(self.w_hh.data[:, gate * h : (gate + 1) * h], h, h)
        nn.init.zeros_(self.bias)
        nn.init.zeros_(self.bias_hh)

    def input_projection(self, x: Tensor) -> Tensor:
        assert self.w_ih is not None
        return torch.addmm(self.bias, x, self.w_ih)

    def cell(self, gx: Tensor, h: Tensor) -> Tensor:
        """One step from the input projection ``gx`` (bias included) and the previous state ``h``."""
        n = self.n_hidden
        gh = torch.addmm(self.bias_hh, h, self.w_hh)
        rz = torch.sigmoid(gx[:, : 2 * n] + gh[:, : 2 * n])
        r, z = rz[:, :n], rz[:, n:]
        cand = torch.tanh(gx[:, 2 * n :] + r * gh[:, 2 * n :])
        return torch.lerp(h, cand, z)  # (1 - z) * h + z * cand


class GRU4Rec(nn.Module):
    """GRU4Rec: item input -> (dropout) -> stacked GRU layers (dropout after each) -> item scores."""

    def __init__(
        self,
        n_items: int,
        layers: Sequence[int] = (100,),
        *,
        constrained_embedding: bool = True,
        embedding: int = 0,
        dropout_p_embed: float = 0.0,
        dropout_p_hidden: float = 0.0,
    ) -> None:
        super().__init__()
        if n_items < 1 or not layers or min(layers) < 1:
            raise ValueError(f"GRU4Rec needs n_items >= 1 and positive layer sizes, got {n_items}, {layers}")
        for name, p in (("dropout_p_embed", dropout_p_embed), ("dropout_p_hidden", dropout_p_hidden)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} is a drop probability in [0, 1), got {p}")
        self.n_items = n_items
        self.layers = tuple(int(n) for n in layers)
        self.constrained_embedding = constrained_embedding
        self.embedding = 0 if constrained_embedding else int(embedding)
        self.dropout_p_embed = float(dropout_p_embed)
        self.dropout_p_hidden = float(dropout_p_hidden)

        self.Wy = nn.Parameter(torch.empty(n_items, self.layers[-1]))
        self.By = nn.Parameter(torch.zeros(n_items))
        self.E: nn.Parameter | None = None
        self.Wx0: nn.Parameter | None = None
        if constrained_embedding:
            n_in: int | None = self.layers[-1]
        elif self.embedding:
            self.E = nn.Parameter(torch.empty(n_items, self.embedding))
            n_in = self.embedding
        else:  # one-hot input: the first layer's input weights are an item table
            self.Wx0 = nn.Parameter(torch.empty(n_items, 3 * self.layers[0]))
            n_in = None
        grus = []
        for size in self.layers:
            grus.append(GRULayer(n_in, size))
            n_in = size
        self.gru = nn.ModuleList(grus)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        glorot_(self.Wy.data, self.n_items, self.layers[-1])
        nn.init.zeros_(self.By)
        if self.E is not None:
            glorot_(self.E.data, self.n_items, self.embedding)
        if self.Wx0 is not None:
            h = self.layers[0]
            for gate in range(3):
                glorot_(self.Wx0.data[:, gate * h : (gate + 1) * h], self.n_items, h)
        for layer in self.gru:
            layer.reset_parameters()

    # -- pieces used by the training step (row-wise) -------------------------------------------------

    @property
    def input_table(self) -> nn.Parameter:
        """The item table whose rows are the inputs: Wy (shared), E (separate) or Wx0 (one-hot)."""
        if self.constrained_embedding:
            return self.Wy
        return self.E if self.E is not None else self.Wx0  # type: ignore[return-value]

    def init_hidden(self, batch_size: int, device: torch.device | str | None = None) -> Hidden:
        return [torch.zeros(batch_size, n, device=device or self.Wy.device) for n in self.layers]

    def step(self, x_rows: Tensor, hidden: Hidden) -> tuple[Tensor, Hidden]:
        """Advance every session by one item, given the gathered rows of ``input_table`` for its items.

        Dropout (drop probability, training mode only) hits the input embedding and each layer's output;
        the dropped-out output is also the state carried to the next step, as in the original.
        Returns the last layer's output and the new hidden state (one tensor per layer).
        """
        new_hidden: Hidden = []
        if self.Wx0 is not None:
            x = self.gru[0].cell(x_rows + self.gru[0].bias, hidden[0])
            x = dropout(x, self.dropout_p_hidden, self.training)
            new_hidden.append(x)
            rest = range(1, len(self.gru))
        else:
            x = dropout(x_rows, self.dropout_p_embed, self.training)
            rest = range(len(self.gru))
        for i in rest:
            layer = self.gru[i]
            x = layer.cell(layer.input_projection(x), hidden[i])
            x = dropout(x, self.dropout_p_hidden, self.training)
            new_hidden.append(x)
        return x, new_hidden

    @staticmethod
    def score(out: Tensor, w_rows: Tensor, b_rows: Tensor) -> Tensor:
        """Scores of the given output rows only: out @ w_rows.T + b_rows (shape batch x len(rows))."""
        return torch.addmm(b_rows, out, w_rows.t())

    # -- the full form -------------------------------------------------------------------------------

    def forward(self, items: Tensor, hidden: Hidden, targets: Tensor | None = None) -> tuple[Tensor, Hidden]:
        """Scores after feeding ``items``: for ``targets`` only when given, else for the whole catalogue."""
        out, hidden = self.step(self.input_table[items], hidden)
        if targets is None:
            return self.score(out, self.Wy, self.By), hidden
        return self.score(out, self.Wy[targets], self.By[targets]), hidden
