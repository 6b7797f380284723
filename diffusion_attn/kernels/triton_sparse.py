"""Triton block-sparse attention (forward) for GPUs: visits only the tiles a pattern keeps.

The sequence (grid *and* text tokens, as laid out by a :class:`~diffusion_attn.TokenLayout`) is cut into
``block`` x ``block`` tiles. :func:`build_triton_layout` lists, per query block, the key blocks to visit
(from :func:`~diffusion_attn.kernels.flex.block_occupancy`, the same occupancy the flex backend uses) in
two compressed-sparse-row lists:

* **full** tiles: every in-range pair allowed; computed without any per-element mask;
* **partial** tiles: computed with their exact element mask, bit-packed once per layout (on the CPU or
  the target device) from the pattern's ``allowed_fn``: ``block * block / 8`` bytes per partial tile
  (2 KiB at ``block=128``, 512 B at 64), never an S x S tensor.

Text tokens are dense, as everywhere in the pack: text columns are visible to every query and text rows
see every key, so text tiles are simply full (or partial where a tile straddles the text/grid boundary)
and text queries run through the same kernel (one softmax and one log-sum-exp per row, which is what a
backward needs). The optional key-padding mask over text keys is applied in the kernel on the tiles
that intersect the text range only, so the layout stays batch-independent and cacheable per layout.

``triton`` is imported lazily (the layout builder is plain torch and works without it); the kernels are
defined on first use. The kernel runs on CUDA GPUs (written for sm_80+, compiled offline for sm_90 in
the tests; ROCm untested), or on CPU tensors under ``TRITON_INTERPRET=1`` (slow; what the tests use).
The interpreter must be switched on before triton is first imported in the process: triton decorates
its own library functions then (a mismatch raises a clear error here). Interpreter quirk: its bf16
``tl.dot`` multiplies bit patterns (triton-lang/triton#11584), so under the interpreter only bf16
operands are upcast exactly to fp32 before the dots; compiled kernels run bf16 dots.

Backward (not implemented yet; the forward is structured for it):

* saved tensors: ``q, k, v, out`` and the per-row log-sum-exp ``lse`` (B, heads, S) fp32 that
  :func:`triton_pattern_attention` returns with ``return_lse=True`` (natural log of the sum of
  ``exp(scale * q.k)`` over the allowed keys), plus the layout and the (B, text_len) padding;
* ``delta = (dout * out).sum(-1)`` per row (a small pre-kernel, as in FlashAttention-2);
* dQ: the same row-wise CSR lists as the forward (``P = exp(scale * q.k - lse)`` recomputed per tile,
  ``dS = P * (dout.v - delta)``, ``dQ += scale * dS @ k``);
* dK / dV: a column-wise walk: per key block, the query blocks whose tiles touch it.
  :meth:`TritonBlockLayout.columns` gives exactly that (full tiles, partial tiles with the index of their
  bit mask in ``part_bits``, so the masks are shared, not stored twice: a (keys x queries) step reads
  word ``part_bits[t, q_row, k_col // 32]``, bit ``k_col % 32``); the key-padding mask and the
  partial last block are handled as in the forward (padded keys get zero dK / dV). Same tile sizes
  and int32 offset limits as the forward. Alternatively one kernel over the row layout with atomic
  dK / dV adds, at the price of non-deterministic sums.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, fields, replace

import torch

from ..layout import TokenLayout
from .backend import Backend
from .capabilities import grid_pattern_of
from .flex import block_occupancy, sequence_mask_mod

__all__ = [
    "TritonBlockLayout",
    "TritonColumnLayout",
    "build_triton_layout",
    "compile_kernel",
    "default_config",
    "reset_kernels",
    "triton_available",
    "triton_pattern_attention",
]

_INSTALL_HINT = 'the Triton block-sparse kernel needs triton: pip install "diffusion-attn[kernels]"'

#: head dims the kernel accepts (powers of two run unmasked; others are padded to the next power of two)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


def _import_triton():
    try:
        import triton
        import triton.language  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT} ({e})") from None
    return triton


def triton_available(device_type: str = "cuda") -> bool:
    """Whether the kernel can run on ``device_type``: triton imports and, outside the interpreter
    (``TRITON_INTERPRET=1``, any device), the device is a GPU torch sees."""
    try:
        _import_triton()
    except ImportError:
        return False
    if _interpreting():
        return True
    return device_type == "cuda" and torch.cuda.is_available()


def _interpreting() -> bool:
    """Whether ``triton.jit`` would give the interpreter now (``TRITON_INTERPRET``)."""
    try:
        from triton import knobs  # triton >= 3.4
    except ImportError:
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
    return bool(knobs.runtime.interpret)


# ----------------------------------------------------------------------------------------------------
# the block layout (plain torch, no triton needed)
# ----------------------------------------------------------------------------------------------------


@dataclass
class TritonColumnLayout:
    """Column-wise view of a :class:`TritonBlockLayout`, for a dK / dV backward kernel.

    Per key block ``j``: query blocks of its full tiles ``full_idx[full_ptr[j]:full_ptr[j+1]]`` and of
    its partial tiles ``part_idx[part_ptr[j]:part_ptr[j+1]]``, whose bit masks are
    ``part_bits[part_tile[...]]`` of the row layout (rows = queries, bits = keys, as in the forward).
    """

    full_ptr: torch.Tensor
    full_idx: torch.Tensor
    part_ptr: torch.Tensor
    part_idx: torch.Tensor
    part_tile: torch.Tensor

    def to(self, device) -> "TritonColumnLayout":
        return TritonColumnLayout(*(getattr(self, f.name).to(device) for f in fields(self)))


@dataclass
class TritonBlockLayout:
    """Which ``block`` x ``block`` tiles of the whole sequence the kernel visits, and how.

    Row-wise CSR over the ``num_blocks = ceil(S / block)`` query blocks (int32 tensors):

    * ``full_ptr`` (num_blocks + 1,), ``full_idx``: key blocks of the full tiles of query block ``i``
      are ``full_idx[full_ptr[i]:full_ptr[i+1]]``;
    * ``part_ptr``, ``part_idx``: the same for partial tiles; ``part_bits`` (num_partial, block,
      block // 32) int32: bit ``c % 32`` of word ``part_bits[t, r, c // 32]`` says whether row ``r``
      of partial tile ``t`` (its position in ``part_idx``) may see column ``c`` of the tile.
      Out-of-range rows and columns (past ``seq_len``) are 0.

    The index tensors always hold at least one element (a 0 sentinel where a list is empty), so they
    can be passed to a kernel as pointers; the counts are ``full_ptr[-1]`` / ``part_ptr[-1]``.
    ``text_start`` / ``text_stop``: the text token range (key padding applies there only).
    The layout depends on the pattern and the :class:`TokenLayout` only (not on the batch, heads, dtype
    or padding): cache it per layout and device.
    """

    block: int
    seq_len: int
    text_start: int
    text_stop: int
    full_ptr: torch.Tensor
    full_idx: torch.Tensor
    part_ptr: torch.Tensor
    part_idx: torch.Tensor
    part_bits: torch.Tensor
    allowed_pairs: int = -1  # exact (query, key) pairs the sequence mask allows, text included; -1 unknown

    @property
    def num_blocks(self) -> int:
        return self.full_ptr.numel() - 1

    @property
    def num_full(self) -> int:
        return int(self.full_ptr[-1])

    @property
    def num_partial(self) -> int:
        return int(self.part_ptr[-1])

    @property
    def device(self) -> torch.device:
        return self.full_ptr.device

    @property
    def bytes_per_partial_tile(self) -> int:
        return self.block * self.block // 8

    @property
    def nbytes(self) -> int:
        """Memory the layout holds (index lists and bit masks)."""
        return sum(t.numel() * t.element_size() for t in (self.full_ptr, self.full_idx, self.part_ptr, self.part_idx, self.part_bits))

    @property
    def visited_density(self) -> float:
        """In-range pairs of the visited tiles / S^2: the work the kernel does relative to dense attention
        (``visited_density / density`` is what the tiling wastes)."""
        full, part = self.tiles()
        sizes = torch.full((self.num_blocks,), self.block, dtype=torch.float64)
        sizes[-1] = self.seq_len - self.block * (self.num_blocks - 1)
        visited = (sizes[:, None] * sizes[None, :] * (full | part)).sum()
        return float(visited) / float(self.seq_len) ** 2

    @property
    def density(self) -> float:
        """Allowed pairs / S^2 (text included), or NaN when unknown."""
        return self.allowed_pairs / float(self.seq_len) ** 2 if self.allowed_pairs >= 0 else float("nan")

    def to(self, device) -> "TritonBlockLayout":
        device = torch.device(device)
        if self.device == device:
            return self
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)

    def tiles(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(full, partial): (num_blocks, num_blocks) booleans over the tiles (CPU)."""
        nb = self.num_blocks
        out = []
        for ptr, idx in ((self.full_ptr, self.full_idx), (self.part_ptr, self.part_idx)):
            ptr, idx = ptr.cpu().long(), idx.cpu().long()
            m = torch.zeros(nb, nb, dtype=torch.bool)
            rows = torch.repeat_interleave(torch.arange(nb), ptr[1:] - ptr[:-1])
            m[rows, idx[: int(ptr[-1])]] = True
            out.append(m)
        return out[0], out[1]

    def unpack_bits(self, tiles: torch.Tensor | None = None) -> torch.Tensor:
        """(n, block, block) boolean element masks of partial tiles ``tiles`` (default: all; CPU)."""
        words = self.part_bits.cpu()[: self.num_partial] if tiles is None else self.part_bits.cpu()[tiles]
        shifts = torch.arange(32, dtype=torch.int32)
        bits = (words[..., None] >> shifts) & 1
        return bits.reshape(*words.shape[:-1], self.block).bool()

    def dense_mask(self) -> torch.Tensor:
        """The (S, S) mask the layout encodes (text padding not included). Small sizes only: for tests."""
        S, bs, nb = self.seq_len, self.block, self.num_blocks
        out = torch.zeros(nb * bs, nb * bs, dtype=torch.bool)
        full, _ = self.tiles()
        view = out.view(nb, bs, nb, bs)
        for i, j in torch.nonzero(full).tolist():
            view[i, :, j, :] = True
        ptr, idx = self.part_ptr.cpu().long(), self.part_idx.cpu().long()
        masks = self.unpack_bits()
        for i in range(nb):
            for t in range(int(ptr[i]), int(ptr[i + 1])):
                view[i, :, int(idx[t]), :] = masks[t]
        return out[:S, :S]

    def columns(self) -> "TritonColumnLayout":
        """The column-wise (per key block) lists a dK / dV backward walks (see the module docstring)."""
        nb = self.num_blocks
        out = []
        for ptr, idx in ((self.full_ptr, self.full_idx), (self.part_ptr, self.part_idx)):
            ptr, idx = ptr.cpu().long(), idx.cpu().long()
            n = int(ptr[-1])
            rows = torch.repeat_interleave(torch.arange(nb), ptr[1:] - ptr[:-1])
            cols = idx[:n]
            order = torch.argsort(cols * nb + rows)  # by key block, then query block
            counts = torch.bincount(cols, minlength=nb)
            cptr = torch.zeros(nb + 1, dtype=torch.long)
            cptr[1:] = torch.cumsum(counts, 0)
            out.append((cptr, rows[order], order))
        (fptr, fidx, _), (pptr, pidx, ptile) = out
        i32 = lambda t: _nonempty(t.to(torch.int32))  # noqa: E731
        col = TritonColumnLayout(fptr.to(torch.int32), i32(fidx), pptr.to(torch.int32), i32(pidx), i32(ptile))
        return col.to(self.device)


def _nonempty(t: torch.Tensor) -> torch.Tensor:
    return t if t.numel() else torch.zeros((1,) + tuple(t.shape[1:]), dtype=t.dtype)


def _csr(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    counts = m.sum(1)
    ptr = torch.zeros(m.shape[0] + 1, dtype=torch.int32)
    ptr[1:] = torch.cumsum(counts, 0)
    idx = torch.nonzero(m)[:, 1].to(torch.int32)  # row-major: sorted by query block, then key block
    return ptr, idx


def _pack_bits(m: torch.Tensor) -> torch.Tensor:
    """(..., n) bool, n % 32 == 0 -> (..., n // 32) int32 words, bit j of word w = element 32 w + j."""
    lead, n = m.shape[:-1], m.shape[-1]
    if sys.byteorder != "little":
        words = (m.reshape(*lead, n // 32, 32).to(torch.int64) << torch.arange(32, device=m.device)).sum(-1)
        return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    shifts = torch.arange(8, dtype=torch.uint8, device=m.device)
    octets = (m.reshape(*lead, n // 8, 8).to(torch.uint8) << shifts).sum(-1, dtype=torch.uint8)
    return octets.reshape(*lead, n // 32, 4).view(torch.int32).reshape(*lead, n // 32)


def build_triton_layout(
    pattern,
    layout: TokenLayout,
    block: int = 128,
    *,
    occupancy: tuple[torch.Tensor, torch.Tensor] | None = None,
    device=None,
    tiles_per_chunk: int | None = None,
) -> TritonBlockLayout:
    """The tile layout of ``pattern`` (a BoxPattern or BlockPattern on ``layout.grid``) on ``layout``.

    ``block``: tile size, a multiple of 32 (64 or 128; the kernel may split it further, see
    :func:`triton_pattern_attention`). ``occupancy``: a cached ``block_occupancy(pattern, layout, block)``
    (the flex backend caches the same thing for ``block=128``). ``device``: where the result goes; the
    partial tiles' masks are evaluated there too (much faster on a GPU for box patterns).

    Cost: the occupancy (cheap for block patterns; S^2 mask evaluations in row chunks for box patterns)
    plus ``block^2`` mask evaluations per partial tile, done ``tiles_per_chunk`` tiles at a time.
    Memory: ``block^2 / 8`` bytes per partial tile plus the index lists.
    """
    if block < 32 or block % 32:
        raise ValueError(f"block must be a positive multiple of 32, got {block}")
    if getattr(pattern, "grid", None) is not None and tuple(pattern.grid) != tuple(layout.grid):
        raise ValueError(f"pattern grid {tuple(pattern.grid)} does not match the layout grid {layout.grid}")
    S = layout.num_tokens
    nb = -(-S // block)
    any_, all_ = occupancy if occupancy is not None else block_occupancy(pattern, layout, block)
    if tuple(any_.shape) != (nb, nb) or tuple(all_.shape) != (nb, nb):
        raise ValueError(f"occupancy must be ({nb}, {nb}) for {S} tokens in blocks of {block}, got {tuple(any_.shape)}")
    any_, all_ = any_.cpu().bool(), all_.cpu().bool()
    full = any_ & all_
    partial = any_ & ~all_
    if not bool(any_.any(1).all()):
        raise ValueError("a query block has no key block to visit; every query needs at least one key")
    full_ptr, full_idx = _csr(full)
    part_ptr, part_idx = _csr(partial)

    P = part_idx.numel()
    words = block // 32
    dev = torch.device(device) if device is not None else torch.device("cpu")
    bits = torch.zeros(max(P, 1), block, words, dtype=torch.int32, device=dev)
    if P:
        mod = sequence_mask_mod(pattern, layout, device=dev)
        rows_of = torch.repeat_interleave(torch.arange(nb), (part_ptr[1:] - part_ptr[:-1]).long()).to(dev)
        cols_of = part_idx.long().to(dev)
        ar = torch.arange(block, device=dev)
        chunk = tiles_per_chunk or max(1, (1 << 22) // (block * block))
        for t0 in range(0, P, chunk):
            t1 = min(P, t0 + chunk)
            r = rows_of[t0:t1, None] * block + ar  # (c, block) sequence rows
            c = cols_of[t0:t1, None] * block + ar
            ok = mod(None, None, r.clamp(max=S - 1)[:, :, None], c.clamp(max=S - 1)[:, None, :])
            ok = ok & (r < S)[:, :, None] & (c < S)[:, None, :]
            bits[t0:t1] = _pack_bits(ok)
    allowed = -1
    if hasattr(pattern, "allowed_pairs"):
        n, t = layout.num_image, layout.text_len
        allowed = int(pattern.allowed_pairs()) + t * S + n * t
    tl_layout = TritonBlockLayout(
        block=block, seq_len=S, text_start=layout.text_slice.start, text_stop=layout.text_slice.stop,
        full_ptr=full_ptr.to(dev), full_idx=_nonempty(full_idx).to(dev), part_ptr=part_ptr.to(dev),
        part_idx=_nonempty(part_idx).to(dev), part_bits=bits, allowed_pairs=allowed,
    )
    return tl_layout


# ----------------------------------------------------------------------------------------------------
# the kernel (defined on first use)
# ----------------------------------------------------------------------------------------------------

_KERNELS = None


def reset_kernels() -> None:
    """Forget the defined kernels; the next call defines them again."""
    global _KERNELS
    _KERNELS = None


def _kernels():
    """Define the Triton kernels (once per interpreter setting: ``triton.jit`` decides between the
    compiler and the interpreter when it decorates). They are module globals so that every triton
    version resolves the helper called from the kernel body."""
    global _KERNELS, tl, _attend_tile, _block_sparse_fwd
    if _KERNELS is not None and _KERNELS[2] == _interpreting():
        return _KERNELS[:2]
    triton = _import_triton()
    import triton.language as tl  # noqa: F811 (a module global, read by the kernel bodies)

    _check_interpreter_mode(triton, tl)

    @triton.jit
    def _attend_tile(
        acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
        kstart, S, kpm_base, text_start, text_stop, bits_base, col_off, qk_scale,
        offs_m_in, offs_n, offs_d,
        BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        USE_BITS: tl.constexpr, HAS_KPM: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        # one BLOCK_M x BLOCK_N tile: online softmax update of (acc, m_i, l_i); scores in log2 units
        cols = kstart + offs_n
        col_ok = cols < S
        if HEAD_DIM == BLOCK_D:
            kt_mask = col_ok[None, :]
            v_mask = col_ok[:, None]
        else:
            kt_mask = col_ok[None, :] & (offs_d[:, None] < HEAD_DIM)
            v_mask = col_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        kt = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None] * stride_kd, mask=kt_mask, other=0.0)
        if DOT_F32:  # exact upcast; only under the interpreter, whose bf16 tl.dot is broken
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N) fp32
        if USE_BITS:
            wcol = col_off + offs_n
            words = tl.load(bits_base + offs_m_in[:, None] * (BLOCK // 32) + (wcol // 32)[None, :])
            keep = ((words >> (wcol % 32)[None, :]) & 1) != 0
            s = tl.where(keep, s, float("-inf"))
        if kstart + BLOCK_N > S:  # the partial last block
            s = tl.where(col_ok[None, :], s, float("-inf"))
        if HAS_KPM:
            if (kstart < text_stop) & (kstart + BLOCK_N > text_start):
                in_text = (cols >= text_start) & (cols < text_stop)
                real = tl.load(kpm_base + (cols - text_start), mask=in_text, other=1)
                s = tl.where((real != 0)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet stay at 0
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=v_mask, other=0.0)
        p = p.to(v.dtype)  # P @ V in the input dtype, as FlashAttention does
        if DOT_F32:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        return acc, m_new, l_i

    @triton.jit
    def _block_sparse_fwd(
        Q, K, V, O, LSE, KPM,
        full_ptr, full_idx, part_ptr, part_idx, part_bits,
        stride_qb, stride_qs, stride_qh, stride_qd,
        stride_kb, stride_ks, stride_kh, stride_kd,
        stride_vb, stride_vs, stride_vh, stride_vd,
        stride_ob, stride_os, stride_oh, stride_od,
        stride_kpm_b,
        H, S, text_start, text_stop, qk_scale,
        BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_KPM: tl.constexpr, WRITE_LSE: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        row0 = pid_m * BLOCK_M
        qb = row0 // BLOCK  # the layout's query block
        row_in = row0 - qb * BLOCK  # this program's first row inside it
        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_m_in = row_in + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < S
        if HEAD_DIM == BLOCK_D:
            q_mask = row_ok[:, None]
        else:
            q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)

        q_base = Q + b * stride_qb + h * stride_qh
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        kpm_base = KPM + b * stride_kpm_b
        q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        # full tiles (no element mask), then partial tiles (bit-packed element mask); each layout tile is
        # BLOCK // BLOCK_N steps of BLOCK_N keys, walked in one flat loop (no unrolling, one pipeline)
        SUB: tl.constexpr = BLOCK // BLOCK_N
        lo = tl.load(full_ptr + qb)
        hi = tl.load(full_ptr + qb + 1)
        for t in range(lo * SUB, hi * SUB):
            kb = tl.load(full_idx + t // SUB)
            col_off = (t % SUB) * BLOCK_N
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                kb * BLOCK + col_off, S, kpm_base, text_start, text_stop, part_bits, col_off,
                qk_scale, offs_m_in, offs_n, offs_d,
                BLOCK, BLOCK_N, HEAD_DIM, BLOCK_D, False, HAS_KPM, PRECISION, DOT_F32,
            )
        lo = tl.load(part_ptr + qb)
        hi = tl.load(part_ptr + qb + 1)
        for t in range(lo * SUB, hi * SUB):
            tile = t // SUB
            kb = tl.load(part_idx + tile)
            col_off = (t % SUB) * BLOCK_N
            # int32 offsets: the launcher checks part_bits has < 2**31 words
            bits_base = part_bits + tile * (BLOCK * (BLOCK // 32))
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                kb * BLOCK + col_off, S, kpm_base, text_start, text_stop, bits_base, col_off,
                qk_scale, offs_m_in, offs_n, offs_d,
                BLOCK, BLOCK_N, HEAD_DIM, BLOCK_D, True, HAS_KPM, PRECISION, DOT_F32,
            )

        has = l_i > 0.0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        o_base = O + b * stride_ob + h * stride_oh
        tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od, out.to(O.dtype.element_ty), mask=q_mask)
        if WRITE_LSE:
            lse = tl.where(has, (m_i + tl.math.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
            tl.store(LSE + (b * H + h) * S + offs_m, lse, mask=row_ok)

    _KERNELS = (triton, _block_sparse_fwd, _interpreting())
    return _KERNELS[:2]


def _check_interpreter_mode(triton, tl) -> None:
    """``triton.language``'s own jit functions (``tl.zeros``, ``tl.sum``, ...) are compiled or interpreted
    as decided when triton was first imported; a kernel defined in the other mode cannot call them."""
    lib = getattr(tl, "zeros", None)
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return
    lib_interpreted = isinstance(lib, InterpretedFunction)
    lib_compiled = isinstance(lib, triton.runtime.JITFunction)
    if _interpreting() and lib_compiled or not _interpreting() and lib_interpreted:
        raise RuntimeError("TRITON_INTERPRET was changed after triton was imported; set it before the first "
                           "`import triton` of the process (e.g. run interpreted tests in a subprocess)")


def compile_kernel(dtype: torch.dtype = torch.float16, head_dim: int = 128, block: int = 128, *,
                   key_padding: bool = True, return_lse: bool = True, arch: int = 90, **config):
    """Compile the kernel for a CUDA target without a GPU (ptxas ships with triton): a developer check
    that the kernel builds for real hardware, which the interpreter does not show. ``config``: overrides
    of :func:`default_config` (``block_m``, ``block_n``, ``num_warps``, ``num_stages``). Returns triton's
    compiled kernel (``.asm["ptx"]``, ``.asm["cubin"]``, ``.metadata.shared``)."""
    triton, kernel = _kernels()
    if _interpreting():
        raise RuntimeError("compile_kernel needs TRITON_INTERPRET unset")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = {**default_config(block, head_dim, dtype), **config}
    ty = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    pointers = {"Q": ty, "K": ty, "V": ty, "O": ty, "LSE": "fp32", "KPM": "i8", "full_ptr": "i32", "full_idx": "i32",
                "part_ptr": "i32", "part_idx": "i32", "part_bits": "i32"}
    constexprs = dict(BLOCK=block, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], HEAD_DIM=head_dim,
                      BLOCK_D=_padded_head_dim(head_dim), HAS_KPM=key_padding, WRITE_LSE=return_lse,
                      PRECISION="ieee", DOT_F32=False)
    signature = {}
    for name in kernel.arg_names:
        if name in pointers:
            signature[name] = "*" + pointers[name]
        elif name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
    src = ASTSource(kernel, signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})


def default_config(block: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch settings used when not given: ``block_m`` query rows and ``block_n`` key
    columns per step (both divide ``block``), ``num_warps``, ``num_stages``.

    Chosen offline for sm_90 (H100 / H200) from ptxas register reports (no spills for head dims 64 and
    128: fp16 / bf16 128 x 64 tiles, 8 warps; fp32 64 x 32, 8 warps); not yet timed on a GPU, see
    benchmarks/bench_triton.py --sweep for the run there."""
    d = _padded_head_dim(head_dim)
    wide = dtype == torch.float32 or d > 128
    block_m = min(block, 64 if wide else 128)
    block_n = min(block, 32 if wide else 64)
    small = not wide and block_m * d <= 64 * 64
    return {"block_m": block_m, "block_n": block_n, "num_warps": 4 if small else 8, "num_stages": 2}


def _padded_head_dim(head_dim: int) -> int:
    return 1 << max(4, (head_dim - 1).bit_length())


def _text_padding(key_padding_mask, layout: TokenLayout, B: int, device):
    """(B, text_len) int8 contiguous, or None when there is nothing to mask."""
    if key_padding_mask is None or layout.text_len == 0:
        return None
    kpm = key_padding_mask.to(device=device).bool()
    if kpm.dim() != 2 or kpm.shape[0] not in (1, B):
        raise ValueError(f"key_padding_mask must be (B, S) or (B, text_len), got {tuple(kpm.shape)}")
    if kpm.shape[1] == layout.num_tokens:
        if not bool(kpm[:, layout.image_slice].all()):
            raise ValueError("key_padding_mask may only mask text tokens")
        kpm = kpm[:, layout.text_slice]
    elif kpm.shape[1] != layout.text_len:
        raise ValueError(f"key_padding_mask must have {layout.num_tokens} (sequence) or {layout.text_len} "
                         f"(text) columns, got {kpm.shape[1]}")
    if bool(kpm.all()):
        return None
    return kpm.expand(B, -1).to(torch.int8).contiguous()


def triton_pattern_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tl_layout: TritonBlockLayout,
    layout: TokenLayout,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    return_lse: bool = False,
    allow_tf32: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
):
    """Block-sparse attention of ``q, k, v`` (B, S, heads, head_dim) by the tile layout ``tl_layout``
    (from :func:`build_triton_layout` for the same ``layout``). Equals
    ``masked_attention(q, k, v, pattern.dense_mask(), layout, key_padding_mask, scale)``.

    * dtypes fp16 / bf16 / fp32 (accumulation in fp32; fp32 matmuls in IEEE precision unless
      ``allow_tf32``); head dims 16..256 (powers of two unpadded); any sequence length; any strides
      (the last dim need not be contiguous, though it is fastest when it is).
    * ``key_padding_mask``: (B, S) or (B, text_len) bool, True = real token; only text keys may be padded.
    * ``scale``: softmax scale, default ``1 / sqrt(head_dim)``.
    * ``return_lse``: also return the per-row log-sum-exp (B, heads, S) fp32 (natural log; what a
      backward needs).
    * ``block_m`` / ``block_n``: query rows / key columns per step, powers of two >= 16 dividing
      ``tl_layout.block`` (default :func:`default_config`); ``num_warps`` / ``num_stages``: launch settings.
    """
    triton, kernel = _kernels()
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3] or v.shape[3] != q.shape[3]:
        raise ValueError(f"q, k, v must be (B, S, heads, head_dim) of one shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q, k, v must share one dtype among float16, bfloat16, float32; got {q.dtype}, {k.dtype}, {v.dtype}")
    B, S, H, D = q.shape
    if S != layout.num_tokens or tl_layout.seq_len != S:
        raise ValueError(f"sequence length {S}, layout {layout.describe()} ({layout.num_tokens} tokens) and tile "
                         f"layout ({tl_layout.seq_len} tokens) must agree")
    if (tl_layout.text_start, tl_layout.text_stop) != (layout.text_slice.start, layout.text_slice.stop):
        raise ValueError("the tile layout was built for another text placement than the layout")
    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in {MIN_HEAD_DIM}..{MAX_HEAD_DIM}, got {D}")
    tl_layout = tl_layout.to(q.device)
    if tl_layout.part_bits.numel() >= 2**31:
        raise ValueError("the tile layout has too many partial tiles for int32 offsets; use a smaller block")
    if max(abs(t.stride(1)) for t in (q, k, v)) * S >= 2**31:
        raise ValueError("sequence offsets exceed int32 (sequence length x token stride >= 2**31)")
    block = tl_layout.block
    cfg = default_config(block, D, q.dtype)
    bm, bn = block_m or cfg["block_m"], block_n or cfg["block_n"]
    for name, val in (("block_m", bm), ("block_n", bn)):
        if val < 16 or val & (val - 1) or block % val:
            raise ValueError(f"{name} must be a power of two >= 16 dividing the layout block {block}, got {val}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    kpm = _text_padding(key_padding_mask, layout, B, q.device)

    if q.device.type == "cpu" and not _interpreting():
        raise RuntimeError("the Triton kernel runs on GPU tensors; on CPU set TRITON_INTERPRET=1 (slow, for tests) "
                           "or use another backend")
    out = torch.empty(B, S, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device) if return_lse else out
    kpm_arg = kpm if kpm is not None else tl_layout.full_ptr  # any valid pointer; unused without padding
    grid = (triton.cdiv(S, bm), B * H)
    kernel[grid](
        q, k, v, out, lse, kpm_arg,
        tl_layout.full_ptr, tl_layout.full_idx, tl_layout.part_ptr, tl_layout.part_idx, tl_layout.part_bits,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        kpm.stride(0) if kpm is not None else 0,
        H, S, tl_layout.text_start, tl_layout.text_stop, scale * 1.4426950408889634,
        BLOCK=block, BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=D, BLOCK_D=_padded_head_dim(D),
        HAS_KPM=kpm is not None, WRITE_LSE=return_lse,
        PRECISION="tf32" if allow_tf32 and q.dtype == torch.float32 else "ieee",  # no effect on 16-bit inputs
        # the interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584): upcast there
        DOT_F32=q.dtype == torch.bfloat16 and _interpreting(),
        num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"],
    )
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------------
# the backend declaration (timing: benchmarks/bench_triton.py)
# ----------------------------------------------------------------------------------------------------


def _available(device_type: str):
    if triton_available(device_type):
        return None
    return (f"backend='triton' needs triton (pip install \"diffusion-attn[kernels]\") and a CUDA device, "
            f"got {device_type}")


def _prepare(request):
    pattern = grid_pattern_of(request.pattern) or request.pattern
    occupancy = block_occupancy(pattern, request.layout)
    return build_triton_layout(pattern, request.layout, occupancy=occupancy, device=request.device)


def _run(q, k, v, request, prepared, key_padding_mask, scale):
    tl_layout = prepared if prepared is not None else _prepare(request)
    return triton_pattern_attention(q, k, v, tl_layout, request.layout, key_padding_mask, scale)


BACKEND = Backend(
    "triton", "the Triton block-sparse kernel (CUDA; opt-in until validated and timed on a GPU; forward only)",
    _run, handles=frozenset({"dynamic"}),
    dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}), head_dims=(MIN_HEAD_DIM, MAX_HEAD_DIM),
    value_dim=False, autograd=False, available=_available, prepare=_prepare,
)
