"""Triton block-sparse kernel: the tile layout (plain torch, always runs) and the kernel, run by Triton's
interpreter (``TRITON_INTERPRET=1``) on CPU tensors at small sizes, against the dense-mask reference.

The interpreter must be on before triton is first imported in a process (``triton.language``'s own jit
functions are decorated then), so the kernel cases run together in one subprocess started with
``TRITON_INTERPRET=1`` (this file, ``--interpreted-worker``), and each case reports as its own test here;
the pytest process itself never switches the interpreter on. Argument checks and a compile of the kernel
for sm_90 (bundled ptxas, no GPU needed) run in-process. Kernel tests skip when triton is not installed
(``pip install "diffusion-attn[kernels]"``); the layout tests are plain torch and always run.
"""

import importlib.util
import os
import random
import sys

import pytest
import torch

from diffusion_attn import TokenLayout
from diffusion_attn.kernels import full_mask, masked_attention
from diffusion_attn.kernels.flex import block_occupancy
from diffusion_attn.kernels.triton_sparse import (
    build_triton_layout,
    compile_kernel,
    default_config,
    reset_kernels,
    triton_pattern_attention,
)
from diffusion_attn.patterns import BlockPattern, neighborhood_pattern, radial_pattern

from test_kernels import CountingCache, padding

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason='triton is not installed (pip install "diffusion-attn[kernels]")')

TOL = {torch.float32: (2e-6, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def random_block_pattern(grid, block_size, seed, density=0.35):
    n = 1
    for g in grid:
        n *= g
    nb = -(-n // block_size)
    g = torch.Generator().manual_seed(seed)
    m = (torch.rand(nb, nb, generator=g) < density) | torch.eye(nb, dtype=torch.bool)
    return BlockPattern(grid, m, block_size)


def cases():
    """(name, pattern, layout): radial (BlockPattern), random block masks, GNA (BoxPattern); text none /
    first / last; lengths that leave a partial last tile for blocks 32, 64 and 128."""
    radial = (5, 8, 9)  # 360 grid tokens, radial blocks of 128
    gna3 = (4, 9, 10)
    return {
        "radial-text-first": (radial_pattern(radial, 0.5, True), TokenLayout(radial, 21, "first")),
        "radial-text-last": (radial_pattern(radial, 0.2, False), TokenLayout(radial, 9, "last")),
        "radial-no-text": (radial_pattern((3, 10, 30), 1.0, True), TokenLayout((3, 10, 30))),
        "block24-no-text": (random_block_pattern((7, 40), 24, 0), TokenLayout((7, 40))),
        "block16-text-first": (random_block_pattern((10, 19), 16, 1), TokenLayout((10, 19), 30, "first")),
        "gna3d-text-last": (neighborhood_pattern(gna3, (3, 5, 5), (1, 2, 2)), TokenLayout(gna3, 9, "last")),
        "gna2d-dilated-text-first": (neighborhood_pattern((12, 20), (3, 7), 1, (2, 2)), TokenLayout((12, 20), 5, "first")),
        "gna1d-no-text": (neighborhood_pattern((150,), 17, 4), TokenLayout((150,))),
    }


# ------------------------------------------------------------------------------------------------
# the layout: plain torch
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(cases()))
@pytest.mark.parametrize("block", [32, 64, 128])
def test_layout_encodes_the_sequence_mask(name, block):
    pattern, layout = cases()[name]
    tl_layout = build_triton_layout(pattern, layout, block)
    ref = full_mask(pattern.dense_mask(), layout)
    assert torch.equal(tl_layout.dense_mask(), ref)
    # tiles: visited = occupied, full = entirely allowed; partial tiles keep 1 bit per element
    any_, all_ = block_occupancy(pattern, layout, block)
    full, part = tl_layout.tiles()
    assert torch.equal(full | part, any_) and torch.equal(full, all_ & any_) and not bool((full & part).any())
    assert tuple(tl_layout.part_bits.shape) == (max(tl_layout.num_partial, 1), block, block // 32)
    assert tl_layout.bytes_per_partial_tile == block * block // 8
    assert tl_layout.allowed_pairs == int(ref.sum())
    assert tl_layout.visited_density >= tl_layout.density


def test_layout_columns_for_backward():
    pattern, layout = cases()["gna3d-text-last"]
    tl_layout = build_triton_layout(pattern, layout, 64)
    col = tl_layout.columns()
    full, part = tl_layout.tiles()
    nb = tl_layout.num_blocks
    masks = tl_layout.unpack_bits()
    ptr, idx = tl_layout.part_ptr.long(), tl_layout.part_idx.long()
    for j in range(nb):
        f = col.full_idx[int(col.full_ptr[j]) : int(col.full_ptr[j + 1])].long()
        assert torch.equal(f, torch.nonzero(full[:, j]).flatten())
        p0, p1 = int(col.part_ptr[j]), int(col.part_ptr[j + 1])
        rows = col.part_idx[p0:p1].long()
        assert torch.equal(rows, torch.nonzero(part[:, j]).flatten())
        for i, t in zip(rows.tolist(), col.part_tile[p0:p1].tolist()):
            assert int(ptr[i]) <= t < int(ptr[i + 1]) and int(idx[t]) == j  # the row layout's tile (i, j)
            assert masks[t].shape == (64, 64)


def test_layout_reuse_and_errors():
    pattern, layout = cases()["radial-text-first"]
    occ = block_occupancy(pattern, layout, 128)
    a = build_triton_layout(pattern, layout, occupancy=occ)
    b = build_triton_layout(pattern, layout, 128)
    for f in ("full_ptr", "full_idx", "part_ptr", "part_idx", "part_bits"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    assert a.to("cpu") is a
    assert a.nbytes < layout.num_tokens**2 // 8  # block-level memory, never S x S
    with pytest.raises(ValueError, match="multiple of 32"):
        build_triton_layout(pattern, layout, 48)
    with pytest.raises(ValueError, match="does not match the layout grid"):
        build_triton_layout(pattern, TokenLayout((5, 8, 10)), 64)
    with pytest.raises(ValueError, match="occupancy must be"):
        build_triton_layout(pattern, layout, 64, occupancy=occ)


def test_missing_triton_names_the_extra(monkeypatch):
    pattern, layout = cases()["gna1d-no-text"]
    tl_layout = build_triton_layout(pattern, layout, 64)
    q = torch.randn(1, layout.num_tokens, 1, 16)
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    reset_kernels()
    try:
        with pytest.raises(ImportError, match=r'pip install "diffusion-attn\[kernels\]"'):
            triton_pattern_attention(q, q, q, tl_layout, layout)
    finally:
        reset_kernels()


def test_default_config_divides_the_block():
    for block in (32, 64, 128):
        for d in (16, 64, 80, 128, 256):
            for dt in (torch.float16, torch.bfloat16, torch.float32):
                c = default_config(block, d, dt)
                assert block % c["block_m"] == 0 and block % c["block_n"] == 0 and c["block_n"] >= 16


# ------------------------------------------------------------------------------------------------
# the kernel, under the interpreter, in one subprocess
# ------------------------------------------------------------------------------------------------


def qkv(layout, batch=2, heads=2, dim=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, layout.num_tokens, heads, dim, generator=g).to(dtype) for _ in range(3)]


def check(name, *, block=64, dim=64, dtype="float32", padded=False, heads=1, **kw):
    """Kernel output and log-sum-exp against the reference (fp32, on the same rounded inputs)."""
    dtype = getattr(torch, dtype)
    pattern, layout = cases()[name]
    tl_layout = build_triton_layout(pattern, layout, block)
    assert tl_layout.num_partial > 0
    q, k, v = qkv(layout, heads=heads, dim=dim, dtype=dtype, seed=block + dim)
    kpm = padding(layout, 2, random.Random(1)) if padded else None
    assert kpm is None or not bool(kpm.all())
    out, lse = triton_pattern_attention(q, k, v, tl_layout, layout, kpm, return_lse=True, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    ref = masked_attention(q.float(), k.float(), v.float(), pattern.dense_mask(), layout, kpm, kw.get("scale"))
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)
    scale = kw.get("scale") or dim**-0.5
    mask = full_mask(pattern.dense_mask(), layout)[None, None]
    if kpm is not None:
        mask = mask & kpm[:, None, None, :]
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    ref_lse = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), -1)
    torch.testing.assert_close(lse, ref_lse, atol=max(atol, 1e-5), rtol=rtol)


def check_strided_odd_head_dim():
    """Views of a fused projection (not contiguous), head dim 40 (padded to 64 in the kernel), text
    padding given as (B, text_len)."""
    pattern, layout = cases()["block16-text-first"]
    tl_layout = build_triton_layout(pattern, layout, 64)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, layout.num_tokens, 3, 2, 40, generator=g).unbind(2)
    assert not q.is_contiguous()
    kpm = padding(layout, 2, random.Random(2))
    out = triton_pattern_attention(q, k, v, tl_layout, layout, kpm[:, layout.text_slice])
    ref = masked_attention(q, k, v, pattern.dense_mask(), layout, kpm)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def check_backend_wiring():
    """``pattern_attention(..., backend="triton")`` and ``prepared_attention`` (layout cached per layout and
    device, padding applied per call), once the backend is wired into ``diffusion_attn.kernels``."""
    from diffusion_attn import kernels

    if "triton" not in kernels.BACKENDS:
        return "backend='triton' is not wired into diffusion_attn.kernels yet"
    pattern, layout = cases()["block16-text-first"]
    q, k, v = qkv(layout, heads=1, dim=16)
    cached = CountingCache()
    builds = cached.builds

    for padded in (False, True):
        kpm = padding(layout, 2, random.Random(1)) if padded else None
        ref = masked_attention(q, k, v, pattern.dense_mask(), layout, kpm)
        out = kernels.pattern_attention(q, k, v, pattern, layout, key_padding_mask=kpm, backend="triton")
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
        out = kernels.prepared_attention(q, k, v, pattern, layout, cached=cached, key="block16", key_padding_mask=kpm,
                                         backend="triton")
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    assert builds == ["triton"]  # the tile layout, padding applied per call
    assert kernels.choose_backend(pattern, layout, "auto", "cpu") != "triton"  # auto: CUDA only


def check_cache_follows_text_length():
    """B5: one cache and one pattern key, the same grid with two text lengths: the tile layout is built
    per layout (it used to be cached per grid and was refused: 'must agree')."""
    from diffusion_attn import kernels

    grid = (5, 8, 9)
    pattern = radial_pattern(grid, 0.5, True)
    cached = CountingCache()
    for text in (21, 30, 21):
        layout = TokenLayout(grid, text, "first")
        q, k, v = qkv(layout, heads=1, dim=16)
        out = kernels.prepared_attention(q, k, v, pattern, layout, cached=cached, key=("radial", grid), backend="triton")
        torch.testing.assert_close(out, masked_attention(q, k, v, pattern.dense_mask(), layout), atol=2e-6, rtol=1e-5)
    assert cached.builds == ["triton", "triton"]


#: case id -> check() arguments. fp32: tight tolerance; fp16 / bf16: looser. Block 64 with text first
#: misaligns every tile (partial tiles everywhere); block_m / block_n below the block walk a tile in
#: several steps and row groups.
KERNEL_CASES = {
    "fp32-radial-text-first-padded": dict(name="radial-text-first", padded=True, heads=2),
    "fp32-radial-text-last-d128-b128-split": dict(name="radial-text-last", block=128, dim=128, block_m=64, block_n=32),
    "fp32-block24-no-text": dict(name="block24-no-text"),
    "fp32-gna3d-text-last-padded-bn32": dict(name="gna3d-text-last", padded=True, block_n=32, heads=2),
    "fp32-gna2d-text-first-d128-b128-scale": dict(name="gna2d-dilated-text-first", block=128, dim=128, scale=0.3),
    "fp32-gna1d-no-text-d32-b32": dict(name="gna1d-no-text", block=32, dim=32, block_m=16, block_n=16),
    "fp16-gna3d-text-last-padded": dict(name="gna3d-text-last", dtype="float16", padded=True),
    "bf16-radial-text-first-padded-d128": dict(name="radial-text-first", dtype="bfloat16", dim=128, padded=True, heads=2),
    "fp16-block16-text-first-d128": dict(name="block16-text-first", dtype="float16", dim=128),
    "bf16-gna2d-text-first": dict(name="gna2d-dilated-text-first", dtype="bfloat16"),
}
OTHER_CASES = {"fp32-strided-head-dim-40": check_strided_odd_head_dim, "backend-wiring": check_backend_wiring,
               "cache-follows-text-length": check_cache_follows_text_length}


def run_cases(ids):
    import time
    import traceback

    results = {}
    for case in ids:
        t0 = time.perf_counter()
        try:
            skipped = OTHER_CASES[case]() if case in OTHER_CASES else check(**KERNEL_CASES[case])
            results[case] = {"ok": True, "skipped": skipped}
        except Exception:
            results[case] = {"ok": False, "error": traceback.format_exc()}
        results[case]["seconds"] = round(time.perf_counter() - t0, 2)
    return results


@pytest.fixture(scope="module")
def interpreted():
    """Runs every kernel case once in a subprocess started with TRITON_INTERPRET=1: the interpreter has to
    be on before triton is first imported (its library functions are decorated then), which a test
    process that may already have imported triton (torch.compile does) cannot guarantee."""
    import json
    import os
    import subprocess
    import tempfile
    from pathlib import Path

    here = Path(__file__).resolve().parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(here.parent), str(here)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        proc = subprocess.run([sys.executable, __file__, "--interpreted-worker", str(out)], env=env,
                              capture_output=True, text=True, timeout=900)
        if proc.returncode or not out.exists():
            pytest.fail(f"interpreter worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return json.loads(out.read_text())


@needs_triton
@pytest.mark.parametrize("case", list(KERNEL_CASES) + list(OTHER_CASES))
def test_kernel_equals_reference_interpreted(interpreted, case):
    result = interpreted[case]
    if not result["ok"]:
        pytest.fail(f"{case}:\n{result['error']}", pytrace=False)
    if result.get("skipped"):
        pytest.skip(result["skipped"])


# ------------------------------------------------------------------------------------------------
# in this process (no kernel launch)
# ------------------------------------------------------------------------------------------------

compiled_mode = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="runs with the interpreter off"
)


@needs_triton
def test_kernel_argument_errors():
    pattern, layout = cases()["gna1d-no-text"]
    tl_layout = build_triton_layout(pattern, layout, 64)
    q = torch.randn(1, layout.num_tokens, 1, 16)
    with pytest.raises(ValueError, match="must agree"):
        triton_pattern_attention(q[:, :-1], q[:, :-1], q[:, :-1], tl_layout, layout)
    with pytest.raises(TypeError, match="one dtype"):
        triton_pattern_attention(q, q.half(), q, tl_layout, layout)
    with pytest.raises(ValueError, match="block_n must be"):
        triton_pattern_attention(q, q, q, tl_layout, layout, block_n=128)
    p, lay = cases()["gna3d-text-last"]
    tl_lay = build_triton_layout(p, lay, 64)
    qq = torch.randn(1, lay.num_tokens, 1, 16)
    with pytest.raises(ValueError, match="text placement"):
        triton_pattern_attention(qq, qq, qq, tl_lay, TokenLayout(lay.grid, lay.text_len, "first"))
    kpm = torch.ones(1, lay.num_tokens, dtype=torch.bool)
    kpm[0, 0] = False
    with pytest.raises(ValueError, match="only mask text tokens"):
        triton_pattern_attention(qq, qq, qq, tl_lay, lay, kpm)


@needs_triton
@compiled_mode
def test_cpu_tensors_need_the_interpreter():
    pattern, layout = cases()["gna1d-no-text"]
    q = torch.randn(1, layout.num_tokens, 1, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        triton_pattern_attention(q, q, q, build_triton_layout(pattern, layout, 64), layout)


def _has_cuda_compiler():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception:
        return False
    return True


@needs_triton
@compiled_mode
@pytest.mark.skipif(HAS_TRITON and not _has_cuda_compiler(), reason="triton has no CUDA backend here")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("dtype,head_dim,block", [(torch.float16, 128, 128), (torch.bfloat16, 64, 64)])
def test_kernel_compiles_for_sm90(dtype, head_dim, block, monkeypatch, tmp_path):
    """The compiler path the interpreter skips (types of loop-carried values, runtime branches, dot
    shapes): lower the kernel to a cubin for sm_90 with triton's bundled ptxas; no GPU needed."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    kernel = compile_kernel(dtype, head_dim, block)
    assert kernel.asm["cubin"] and kernel.metadata.shared <= 227 * 1024


if __name__ == "__main__" and "--interpreted-worker" in sys.argv:
    import json
    from pathlib import Path

    assert os.environ.get("TRITON_INTERPRET") == "1"
    res = run_cases(list(KERNEL_CASES) + list(OTHER_CASES))
    for case, r in res.items():
        print(f"{case}: {'FAILED' if not r['ok'] else 'skipped' if r.get('skipped') else 'ok'} {r['seconds']} s")
    Path(sys.argv[sys.argv.index("--interpreted-worker") + 1]).write_text(json.dumps(res, indent=1))
