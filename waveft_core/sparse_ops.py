"""Activation-side WaveFT: ``x dW^T`` and the coefficient gradient without a dense ``dW`` or dense gradient.

With ``dW = s * S_r^T B S_c`` (see :mod:`waveft_core.functional`) and activations ``x`` (``T x in``)::

    x dW^T        = s * ((S_r^T (B (S_c x^T))))^T          three sparse-times-dense products
    g dW          = s * (S_c^T (B^T (S_r g^T)))^T
    dL/dc_k       = s * sum_t (S_r g^T)[r_k, t] * (S_c x^T)[c_k, t]    (a sampled product, one dot per coefficient)

Everything runs "features-major" (``features x tokens``): CPU sparse kernels (CSR times dense, sampled
products) are an order of magnitude faster on contiguous rows than on strided columns, so a transpose of
``x`` and of ``g`` buys the cheap kernels. The transpose is done per block of 64 tokens (a whole-sequence
one is three times slower on CPU), and the blocks of a chunk go through block-diagonal copies of the
factors in one call each. Costs are O(tokens * (p + L * features)) instead of O(tokens * out * in). The
maths is kept in float32 whatever the activations' dtype.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field

import torch

from .geometry import LayerPlan, patch_layout
from .wavelets import synthesis_filters


def _synthesis_matrix(n: int, half: int, wavelet: str, device: torch.device) -> torch.Tensor:
    """CSR ``S`` (``2 half x n``) of one level of 1-D inverse DWT: ``S[b half + k, 2k - (L-2) + t] = f_b[t]``."""
    filters = synthesis_filters(wavelet, device)
    length = filters.shape[1]
    band = torch.arange(2, device=device)[:, None, None]
    k = torch.arange(half, device=device)[None, :, None]
    taps = torch.arange(length, device=device)[None, None, :]
    cols = (2 * k - (length - 2) + taps).expand(2, half, length)
    rows = (band * half + k).expand(2, half, length)
    values = filters[:, None, :].expand(2, half, length)
    keep = (cols >= 0) & (cols < n)
    indices = torch.stack([rows[keep], cols[keep]])
    coo = torch.sparse_coo_tensor(indices, values[keep], (2 * half, n), check_invariants=False)
    return _coo_to_csr(coo)


def _coo_to_csr(coo: torch.Tensor) -> torch.Tensor:
    rows, cols = coo.coalesce().indices()
    crow, col, order = _csr_structure(rows, cols, coo.shape[0])
    return _csr(crow, col, coo.coalesce().values()[order], tuple(coo.shape))


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    # int32 indices where they fit: MKL's CSR kernels take only those, and torch would convert int64 ones
    # on every product (a copy, and a kernel launch on a GPU)
    if max(shape) < 2**31 and col.numel() < 2**31:
        crow, col = crow.to(torch.int32), col.to(torch.int32)
    return _quiet_csr(crow, col, values, shape)


_CSR_WARNED = False


def _quiet_csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    global _CSR_WARNED
    if _CSR_WARNED:  # torch warns once per process, so only the first construction needs the (slow) filter
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)
    # that warning says CSR support is "beta": noise in a host's console, not a user problem
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        tensor = torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)
    _CSR_WARNED = True
    return tensor


@functools.lru_cache(maxsize=64)
def _synthesis_pair(n: int, half: int, wavelet: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    matrix = _synthesis_matrix(n, half, wavelet, device)
    return matrix, _coo_to_csr(matrix.to_sparse_coo().t())


def _csr_structure(rows: torch.Tensor, cols: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, ...]:
    """Row pointers, column indices and the permutation that sorts ``(rows, cols)`` into CSR order."""
    order = torch.argsort(rows * (int(cols.max()) + 1) + cols)
    counts = torch.bincount(rows, minlength=n_rows)
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    torch.cumsum(counts, 0, out=crow[1:])
    return crow, cols[order].contiguous(), order


def _block_diagonal(csr: torch.Tensor, blocks: int) -> torch.Tensor:
    """CSR ``blockdiag(M, ..., M)`` of ``blocks`` copies of CSR ``M``."""
    if blocks == 1:
        return csr
    crow, col = csr.crow_indices(), csr.col_indices()
    rows, cols = csr.shape
    offsets = torch.arange(blocks, device=col.device)[:, None]
    crow_blocks = torch.cat([(crow[:-1][None] + offsets * col.numel()).reshape(-1), crow[-1:] * blocks])
    col_blocks = (col[None] + offsets * cols).reshape(-1)
    return _csr(crow_blocks, col_blocks, csr.values().repeat(blocks), (blocks * rows, blocks * cols))


def _with_values(pattern: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return _quiet_csr(pattern.crow_indices(), pattern.col_indices(), values, tuple(pattern.shape))


@dataclass
class BlockFactors:
    """A plan's factors repeated block-diagonally, to apply them to ``blocks`` token blocks in one call."""

    blocks: int
    synth_rows: torch.Tensor
    synth_rows_t: torch.Tensor
    synth_cols: torch.Tensor
    synth_cols_t: torch.Tensor
    pattern: torch.Tensor  # B's sparsity pattern with unit values: the mask of the sampled gradient product
    pattern_t: torch.Tensor  # B^T's

    def b_matrix(self, values: torch.Tensor) -> torch.Tensor:
        """Block-diagonal ``B`` from its values in CSR order (the structure is reused: a GPU pays per kernel)."""
        return _with_values(self.pattern, values.repeat(self.blocks) if self.blocks > 1 else values)

    def bt_matrix(self, values: torch.Tensor) -> torch.Tensor:
        return _with_values(self.pattern_t, values.repeat(self.blocks) if self.blocks > 1 else values)


@dataclass
class SparsePlan(LayerPlan):
    """Sparse factors of one layer's ``dW`` (fixed positions, shape and wavelet) on one device."""

    synth_rows: torch.Tensor  # S_r, CSR (2 H2 x out)
    synth_rows_t: torch.Tensor  # S_r^T, CSR (out x 2 H2)
    synth_cols: torch.Tensor  # S_c, CSR (2 W2 x in)
    synth_cols_t: torch.Tensor  # S_c^T, CSR (in x 2 W2)
    b_unit: torch.Tensor  # B's pattern, CSR with unit values; CSR slot j holds coefficient b_order[j]
    b_order: torch.Tensor
    bt_unit: torch.Tensor  # B^T's pattern, slot j holds coefficient bt_order[j]
    bt_order: torch.Tensor
    _blocked: dict[int, BlockFactors] = field(default_factory=dict, repr=False, compare=False)

    def b_values(self, coef: torch.Tensor, scaling: float) -> torch.Tensor:
        return coef.to(torch.float32)[self.b_order] * scaling

    def bt_values(self, coef: torch.Tensor, scaling: float) -> torch.Tensor:
        return coef.to(torch.float32)[self.bt_order] * scaling

    def blocked(self, blocks: int) -> BlockFactors:
        """The factors for ``blocks`` token blocks at once (cached: a sequence needs at most three counts)."""
        if blocks not in self._blocked:
            factors = [self.synth_rows, self.synth_rows_t, self.synth_cols, self.synth_cols_t, self.b_unit, self.bt_unit]
            self._blocked[blocks] = BlockFactors(blocks, *[_block_diagonal(f, blocks) for f in factors])
        return self._blocked[blocks]


def build_plan(positions: torch.Tensor, shape: tuple[int, int], wavelet: str, device: torch.device) -> SparsePlan:
    """Precompute the sparse factors for coefficients at flat ``positions`` of an ``(out, in)`` weight."""
    layout = patch_layout(positions.to(device), shape, wavelet)
    g = layout.geometry
    s_r, s_r_t = _synthesis_pair(g.out_features, g.half_rows, wavelet, torch.device(device))
    s_c, s_c_t = _synthesis_pair(g.in_features, g.half_cols, wavelet, torch.device(device))
    rows, cols = layout.synth_row, layout.synth_col
    b_shape = (2 * g.half_rows, 2 * g.half_cols)
    b_unit, b_order = _unit_csr(rows, cols, b_shape)
    bt_unit, bt_order = _unit_csr(cols, rows, b_shape[::-1])
    return SparsePlan(layout, wavelet, s_r, s_r_t, s_c, s_c_t, b_unit, b_order, bt_unit, bt_order)


def dense_delta(coef: torch.Tensor, plan: SparsePlan, scaling: float) -> torch.Tensor:
    """``dW = s * S_r^T B S_c`` as a dense float32 ``(out, in)`` matrix, from the sparse factors.

    ``O(L * out * in)`` work and two weights' worth of memory, where scattering the ``p L^2`` taps needs an
    index of ``p L^2`` entries: the way to build ``dW`` for long filters (coif17: 27 M taps per SDXL layer).
    """
    g = plan.layout.geometry
    b_t = torch.zeros(2 * g.half_cols, 2 * g.half_rows, dtype=torch.float32, device=plan.b_order.device)
    b_t[plan.layout.synth_col, plan.layout.synth_row] = coef.detach().to(b_t) * float(scaling)
    b_s_c = _spmm(plan.synth_cols_t, b_t).t().contiguous()  # (S_c^T B^T)^T = B S_c, 2 H2 x in
    return _spmm(plan.synth_rows_t, b_s_c)


def _unit_csr(rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR with ones at ``(rows, cols)``, and the order that maps its slots to the entries given."""
    crow, col, order = _csr_structure(rows, cols, shape[0])
    return _csr(crow, col, torch.ones(col.numel(), device=col.device), shape), order


def _spmm(csr: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``csr @ dense`` for a contiguous dense operand; ``beta=0`` ignores the unset buffer (no zero fill)."""
    out = torch.empty(csr.shape[0], dense.shape[1], dtype=dense.dtype, device=dense.device)
    return torch.addmm(out, csr, dense, beta=0.0, out=out)


BLOCK_TOKENS = 64
CHUNK_ELEMENTS = 1 << 19  # CPU: a chunk's temporaries stay in cache
DEVICE_CHUNK_ELEMENTS = 1 << 23  # GPUs: few, large kernels; 32 MB temporaries are small next to a UNet step


@dataclass(frozen=True)
class TokenChunk:
    """``blocks`` consecutive blocks of ``block`` tokens from token ``start`` on."""

    start: int
    blocks: int
    block: int

    @property
    def rows(self) -> slice:
        return slice(self.start, self.start + self.blocks * self.block)


def token_chunks(tokens: int, plan: SparsePlan, device: torch.device | None = None) -> tuple[TokenChunk, ...]:
    """Chunks of whole ``BLOCK_TOKENS`` blocks holding ~``CHUNK_ELEMENTS`` values each, then the remainder.

    Chunking keeps the extra peak (blocked copies and analyses, memory the frozen base does not need) to a
    few MB whatever the resolution; blocks keep each transposed copy small enough to stay in cache. Off
    the CPU the budget is ``DEVICE_CHUNK_ELEMENTS``: there each chunk costs a dozen kernel launches.
    """
    g = plan.layout.geometry
    widest = max(2 * g.half_rows, 2 * g.half_cols, g.out_features, g.in_features)
    budget = CHUNK_ELEMENTS if device is None or device.type == "cpu" else DEVICE_CHUNK_ELEMENTS
    return _chunks(tokens, max(1, budget // (widest * BLOCK_TOKENS)), BLOCK_TOKENS)


@functools.lru_cache(maxsize=1024)
def _chunks(tokens: int, per_chunk: int, block: int) -> tuple[TokenChunk, ...]:
    chunks, start = [], 0
    while tokens - start >= block:
        blocks = min(per_chunk, (tokens - start) // block)
        chunks.append(TokenChunk(start, blocks, block))
        start += blocks * block
    if start < tokens:
        chunks.append(TokenChunk(start, 1, tokens - start))
    return tuple(chunks)


def to_blocks(t: torch.Tensor, chunk: TokenChunk) -> torch.Tensor:
    """Tokens-major ``(T, F)`` rows of ``chunk`` as float32 ``(blocks F) x block``: each block features-major.

    A whole-sequence transpose strides its writes by ``T`` and runs at a third of copy speed on CPU; block
    by block, reads and writes stay in cache.
    """
    features = t.shape[1]
    blocked = torch.empty(chunk.blocks, features, chunk.block, dtype=torch.float32, device=t.device)
    blocked.copy_(t[chunk.rows].reshape(chunk.blocks, chunk.block, features).transpose(1, 2))
    return blocked.view(chunk.blocks * features, chunk.block)


def from_blocks(blocked: torch.Tensor, out: torch.Tensor, chunk: TokenChunk) -> None:
    """Write a ``(blocks F) x block`` result into the tokens-major rows ``chunk`` of ``out``."""
    features = out.shape[1]
    rows = out[chunk.rows].view(chunk.blocks, chunk.block, features)
    rows.copy_(blocked.view(chunk.blocks, features, chunk.block).transpose(1, 2))


def delta_forward(
    x: torch.Tensor, coef: torch.Tensor, plan: SparsePlan, scaling: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``x dW^T`` (``(T, out)``) for activations ``x`` flattened to ``(T, in)``: computed in float32, rounded
    once to ``dtype`` as it is written out."""
    g = plan.layout.geometry
    out = torch.empty(x.shape[0], g.out_features, dtype=dtype, device=x.device)
    b_values = plan.b_values(coef, scaling)
    for chunk in token_chunks(x.shape[0], plan, x.device):
        factors = plan.blocked(chunk.blocks)
        analysed = _spmm(factors.synth_cols, to_blocks(x, chunk))
        delta = _spmm(factors.synth_rows_t, _spmm(factors.b_matrix(b_values), analysed))
        from_blocks(delta, out, chunk)
    return out


def delta_backward(
    grad: torch.Tensor, x: torch.Tensor, coef: torch.Tensor, plan: SparsePlan, scaling: float, input_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``dL/dc`` (float32 ``[p]``) and, if ``input_grad``, ``g dW`` (``(T, in)`` in ``x``'s dtype, computed in
    float32).

    ``grad`` and ``x`` are flattened to ``(T, out)`` and ``(T, in)``. Per block of tokens:
    ``dL/dc_k += s * sum_t (S_r g^T)[r_k, t] (S_c x^T)[c_k, t]`` -- one sampled dot product per coefficient,
    all blocks of a chunk in one call through block-diagonal factors.
    """
    g = plan.layout.geometry
    p = plan.b_order.numel()
    sampled = torch.zeros(p, dtype=torch.float32, device=x.device)
    grad_x = torch.empty(x.shape[0], g.in_features, dtype=x.dtype, device=x.device) if input_grad else None
    bt_values = plan.bt_values(coef, scaling) if input_grad else None
    for chunk in token_chunks(x.shape[0], plan, x.device):
        factors = plan.blocked(chunk.blocks)
        g_analysed = _spmm(factors.synth_rows, to_blocks(grad, chunk))
        x_analysed = _spmm(factors.synth_cols, to_blocks(x, chunk))
        products = torch.sparse.sampled_addmm(factors.pattern, g_analysed, x_analysed.t(), beta=0.0)
        sampled += products.values().view(chunk.blocks, p).sum(0)
        del x_analysed, products
        if grad_x is not None:
            grad_x_blocks = _spmm(factors.synth_cols_t, _spmm(factors.bt_matrix(bt_values), g_analysed))
            from_blocks(grad_x_blocks, grad_x, chunk)
    grad_coef = torch.empty_like(sampled)
    grad_coef[plan.b_order] = sampled * scaling
    return grad_coef, grad_x


def kernels_work(device: torch.device) -> tuple[bool, str]:
    """``(works, reason)``: whether ``device`` runs the CSR product and the sampled product used here, and
    gets them right. Checked on a 2 x 3 problem against the dense result: backends without sparse CSR support
    raise (MPS: "Could not run 'new_compressed_tensor'"), and a wrong answer counts as no support."""
    try:
        pattern = _csr(
            torch.tensor([0, 2, 3], device=device), torch.tensor([0, 2, 1], device=device),
            torch.tensor([1.0, 2.0, 3.0], device=device), (2, 3),
        )
        dense = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
        rhs = torch.arange(12.0).reshape(3, 4)
        product = _spmm(pattern, rhs.to(device)).cpu()
        lhs = torch.arange(8.0).reshape(2, 4)
        sampled = torch.sparse.sampled_addmm(pattern, lhs.to(device), rhs.t().to(device), beta=0.0).values().cpu()
        expected = (lhs @ rhs.t())[dense != 0]
        return bool(torch.allclose(product, dense @ rhs) and torch.allclose(sampled, expected)), "wrong results"
    except (RuntimeError, NotImplementedError, TypeError) as error:  # what a backend without a kernel raises
        return False, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
