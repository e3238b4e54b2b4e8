"""The GRU4Rec network (Hidasi et al. 2016/2018) as a plain ``nn.Module``: parameters and arithmetic, no I/O.

The module is written so training can work on *rows* of the item tables: the caller gathers the rows it
needs (the inputs of a step, the in-batch targets and the shared negative samples) and passes them in, so
the output layer is only ever evaluated on those items and the item tables get sparse, row-wise updates.
``forward`` is the convenient full form used by evaluation and prediction.

Training does not build an autograd graph: ``train_forward`` runs one step and keeps what its backward needs,
``train_backward`` returns the gradients in closed form (the GRU cell's derivative is short, and since the
hidden state is detached after every step nothing flows back in time). That halves the operations of a
step; tests compare both against autograd.

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
from typing import NamedTuple

import torch
from torch import Tensor, nn

from pipeline.model.products import FLOAT32, Products

Hidden = list[Tensor]


class LayerCache(NamedTuple):
    """What one GRU layer's backward needs from its forward."""

    x: Tensor | None  # the layer's input (None: one-hot input, the gathered rows were the projection)
    h: Tensor  # previous state
    w_ih: Tensor | None  # the input weights as multiplied (None: one-hot input)
    gh_n: Tensor  # W_hn h + b_hn
    rz: Tensor  # reset and update gates side by side
    cand: Tensor  # candidate state
    diff: Tensor  # cand - h
    mask: Tensor | None  # dropout mask of the layer output (already scaled by 1 / (1 - p))


class StepCache(NamedTuple):
    layers: list[LayerCache]
    embed_mask: Tensor | None  # dropout mask of the input embedding


class StepMasks(NamedTuple):
    """The dropout masks of one training step (None where nothing is dropped), drawn before the step so
    that parts of a batch can run on other threads without changing the random stream."""

    embed: Tensor | None
    layers: list[Tensor | None]

    def rows(self, lo: int, hi: int) -> StepMasks:
        """The masks of batch rows lo..hi-1."""
        return StepMasks(
            None if self.embed is None else self.embed[lo:hi], [None if m is None else m[lo:hi] for m in self.layers]
        )


def dropout_mask(like: Tensor, p: float, training: bool) -> Tensor | None:
    """The inverted-dropout multiplier for ``like`` (None when nothing is dropped)."""
    if not training or p == 0.0:
        return None
    return torch.rand_like(like).ge_(p).mul_(1.0 / (1.0 - p))  # 1/(1-p) where kept, else 0; no dtype cast


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout with DROP probability ``p`` (kept units are scaled by 1 / (1 - p)).

    Same semantics as ``F.dropout``; drawing the mask with ``rand`` is several times faster on CPU than
    the per-element Bernoulli sampler ``F.dropout`` uses there.
    """
    mask = dropout_mask(x, p, training)
    return x if mask is None else x * mask


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

    def cell_train(self, gx: Tensor, gh: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``cell`` from both projections (``gh`` = W_hh h + b_hh) keeping its intermediates: (new state, gh_n,
        rz, cand, cand - h)."""
        n = self.n_hidden
        rz = gx[:, : 2 * n].add(gh[:, : 2 * n]).sigmoid_()
        gh_n = gh[:, 2 * n :]
        cand = torch.addcmul(gx[:, 2 * n :], rz[:, :n], gh_n).tanh_()
        diff = cand - h
        return torch.addcmul(h, rz[:, n:], diff), gh_n, rz, cand, diff

    def cell_backward(self, c: LayerCache, d_new: Tensor, products: Products = FLOAT32) -> tuple[Tensor, list[Tensor]]:
        """Gradient of the layer's input (of the input projection ``gx`` for one-hot input) and of this layer's
        dense parameters (``dense_parameters`` order), given the gradient of the new state. Nothing flows into
        ``h``. The operands in the cache are already cast for ``products``."""
        n = self.n_hidden
        r = c.rz[:, :n]
        d_pre_n = d_new * c.rz[:, n:]
        d_pre_n.mul_(1.0 - c.cand * c.cand)  # through tanh
        d_rz = torch.cat([d_pre_n * c.gh_n, d_new * c.diff], dim=1)
        d_rz.mul_(torch.addcmul(c.rz, c.rz, c.rz, value=-1.0))  # through sigmoid: rz (1 - rz)
        d_gx = torch.cat([d_rz, d_pre_n], dim=1)
        d_gh = torch.cat([d_rz, d_pre_n.mul_(r)], dim=1)
        d_gx_op = products.cast(d_gx)  # an operand of two products
        grads = [] if c.x is None else [products.mm(c.x.t(), d_gx_op)]
        grads += [products.mm(c.h.t(), d_gh), d_gx.sum(0), d_gh.sum(0)]
        return (d_gx if c.w_ih is None else products.mm(d_gx_op, c.w_ih.t())), grads

    def dense_parameters(self) -> list[nn.Parameter]:
        """The layer's parameters in the order ``cell_backward`` returns their gradients."""
        return ([] if self.w_ih is None else [self.w_ih]) + [self.w_hh, self.bias, self.bias_hh]


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
        grus: list[GRULayer] = []
        for size in self.layers:
            grus.append(GRULayer(n_in, size))
            n_in = size
        self.gru = nn.ModuleList(grus)
        self.cells: list[GRULayer] = grus  # the same layers, typed (the ModuleList registers them)
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
        for layer in self.cells:
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
            x = self.cells[0].cell(x_rows + self.cells[0].bias, hidden[0])
            x = dropout(x, self.dropout_p_hidden, self.training)
            new_hidden.append(x)
            rest = range(1, len(self.cells))
        else:
            x = dropout(x_rows, self.dropout_p_embed, self.training)
            rest = range(len(self.cells))
        for i in rest:
            layer = self.cells[i]
            x = layer.cell(layer.input_projection(x), hidden[i])
            x = dropout(x, self.dropout_p_hidden, self.training)
            new_hidden.append(x)
        return x, new_hidden

    def draw_masks(self, x_rows: Tensor) -> StepMasks:
        """The dropout masks of a step on ``x_rows``, in the order ``train_forward`` would draw them."""
        embed = None if self.Wx0 is not None else dropout_mask(x_rows, self.dropout_p_embed, self.training)
        b = x_rows.shape[0]
        like = [x_rows.new_empty(b, n) for n in self.layers]  # rand_like reads only shape, dtype and device
        return StepMasks(embed, [dropout_mask(t, self.dropout_p_hidden, self.training) for t in like])

    def train_forward(
        self, x_rows: Tensor, hidden: Hidden, masks: StepMasks | None = None, products: Products = FLOAT32
    ) -> tuple[Tensor, Hidden, StepCache]:
        """``step`` in training mode, without autograd, keeping what ``train_backward`` needs.

        ``masks`` (from ``draw_masks``) are the dropout masks to apply; without them they are drawn here,
        in the same order. ``products`` says how the matrix products compute (``pipeline.model.products``).
        """
        layers: list[LayerCache] = []
        new_hidden: Hidden = []
        embed_mask = None
        if self.Wx0 is not None:
            x: Tensor | None = None
            gx = x_rows + self.cells[0].bias
        else:
            embed_mask = dropout_mask(x_rows, self.dropout_p_embed, self.training) if masks is None else masks.embed
            x = x_rows if embed_mask is None else x_rows * embed_mask
        # Product operands are cast once (a no-op for float32) and kept in the cache for the backward products
        for i, layer in enumerate(self.cells):
            w_ih = None
            if x is not None:  # (None: one-hot input, gx is the gathered rows plus bias)
                assert layer.w_ih is not None
                x, w_ih = products.cast(x), products.cast(layer.w_ih)
                gx = products.addmm(layer.bias, x, w_ih)
            h = products.cast(hidden[i])
            gh = products.addmm(layer.bias_hh, h, layer.w_hh)
            new, gh_n, rz, cand, diff = layer.cell_train(gx, gh, hidden[i])
            mask = dropout_mask(new, self.dropout_p_hidden, self.training) if masks is None else masks.layers[i]
            out = new if mask is None else new * mask
            layers.append(LayerCache(x, h, w_ih, gh_n, rz, cand, diff, mask))
            new_hidden.append(out)
            x = out
        return out, new_hidden, StepCache(layers, embed_mask)

    def train_backward(
        self, cache: StepCache, d_out: Tensor, products: Products = FLOAT32
    ) -> tuple[list[Tensor], Tensor]:
        """Gradients of ``dense_parameters()`` and of the gathered input rows, given d loss / d output."""
        grads: list[list[Tensor]] = []
        d = d_out
        for layer, c in zip(reversed(self.cells), reversed(cache.layers), strict=True):
            d, g = layer.cell_backward(c, d if c.mask is None else d * c.mask, products)
            grads.append(g)
        if cache.embed_mask is not None:
            d = d * cache.embed_mask
        return [t for g in reversed(grads) for t in g], d

    def dense_parameters(self) -> list[nn.Parameter]:
        """The GRU weights (everything but the item tables), in ``train_backward``'s order."""
        return [p for layer in self.cells for p in layer.dense_parameters()]

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
