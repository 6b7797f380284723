"""Every fast path equals the dense-mask reference (fp32, tight tolerance)."""

import random

import pytest
import torch

from diffusion_attn import TokenLayout, kernels
from diffusion_attn.kernels import registry
from diffusion_attn.kernels.backend import Request
from diffusion_attn.kernels import block_schedule, build_schedule, choose_backend, full_mask, masked_attention, pattern_attention, sdpa
from diffusion_attn.patterns import neighborhood_pattern, radial_pattern, shifted_window_pattern

from test_patterns import random_gna_config

ATOL = 2e-6


def qkv(layout, batch=2, heads=3, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, layout.num_tokens, heads, dim, generator=g) for _ in range(3)]


class CountingCache:
    """A dict-backed ``cached(key, build)`` for ``prepared_attention`` that records the kind (``key[0]``) of
    everything it builds."""

    def __init__(self):
        self.store, self.builds = {}, []

    def __call__(self, key, build):
        if key not in self.store:
            self.builds.append(key[0])
            self.store[key] = build()
        return self.store[key]


def padding(layout, batch, rng):
    kpm = torch.ones(batch, layout.num_tokens, dtype=torch.bool)
    if layout.text_len > 1:
        for b in range(batch):
            n_pad = rng.randint(0, layout.text_len - 1)
            if n_pad:
                kpm[b, layout.text_slice.stop - n_pad : layout.text_slice.stop] = False
    return kpm


def random_gna_case(seed):
    """A random GNA pattern (rank 1-3, any stride / dilation) on a layout with random text and padding,
    inputs and the dense-mask reference: ``(rng, pattern, layout, (q, k, v), kpm, ref)``."""
    rng = random.Random(seed)
    pattern = neighborhood_pattern(*random_gna_config(rng, rng.choice([1, 2, 3])))
    layout = TokenLayout(pattern.grid, rng.choice([0, 1, 5, 17]), rng.choice(["first", "last"]))
    q, k, v = qkv(layout, batch=rng.choice([1, 2]), seed=seed)
    kpm = padding(layout, q.shape[0], rng)
    return rng, pattern, layout, (q, k, v), kpm, masked_attention(q, k, v, pattern.dense_mask(), layout, kpm)


@pytest.mark.parametrize("seed", range(16))
def test_gather_equals_reference_gna(seed):
    rng, pattern, layout, (q, k, v), kpm, ref = random_gna_case(seed)
    tile = tuple(rng.randint(1, g) for g in pattern.grid)
    out = pattern_attention(q, k, v, pattern, layout, key_padding_mask=kpm, backend="gather", schedule=build_schedule(pattern, tile))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)
    auto = pattern_attention(q, k, v, pattern, layout, key_padding_mask=kpm, backend="gather")
    torch.testing.assert_close(auto, ref, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("grid,decay,sink,text", [((5, 6, 20), 0.2, True, 0), ((7, 8, 9), 0.95, False, 13), ((3, 10, 30), 1.0, True, 4)])
def test_gather_equals_reference_radial(grid, decay, sink, text):
    pattern = radial_pattern(grid, decay, sink)
    layout = TokenLayout(grid, text, "last")
    q, k, v = qkv(layout)
    kpm = padding(layout, 2, random.Random(0))
    ref = masked_attention(q, k, v, pattern.dense_mask(), layout, kpm)
    for rows in (1, 2, 4):
        out = pattern_attention(q, k, v, pattern, layout, key_padding_mask=kpm, backend="gather", schedule=block_schedule(pattern, rows))
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("grid", [(8, 12), (7, 9)])
def test_gather_equals_reference_shifted_windows(grid):
    layout = TokenLayout(grid)
    q, k, v = qkv(layout)
    for choice in range(4):
        p = shifted_window_pattern(grid, choice)
        ref = masked_attention(q, k, v, p.dense_mask(), layout)
        torch.testing.assert_close(pattern_attention(q, k, v, p, layout, backend="gather"), ref, atol=ATOL, rtol=1e-5)


def test_full_pattern_is_plain_sdpa():
    layout = TokenLayout((4, 6), 5, "first")
    q, k, v = qkv(layout)
    p = neighborhood_pattern((4, 6), (4, 6))
    assert choose_backend(p, layout) == "dense"
    assert torch.equal(pattern_attention(q, k, v, p, layout), sdpa(q, k, v))


def test_backend_errors():
    layout = TokenLayout((4, 6))
    p = neighborhood_pattern((4, 6), 3)
    q, k, v = qkv(layout)
    with pytest.raises(ValueError, match="unknown backend"):
        pattern_attention(q, k, v, p, layout, backend="flash")
    with pytest.raises(ValueError, match="only valid when the pattern is full"):
        pattern_attention(q, k, v, p, layout, backend="dense")
    with pytest.raises(ValueError, match="does not match the layout"):
        pattern_attention(q[:, :-1], k[:, :-1], v[:, :-1], p, layout)


def test_low_precision_close_to_reference():
    layout = TokenLayout((6, 8), 4, "first")
    p = neighborhood_pattern((6, 8), (3, 4), (1, 2))
    q, k, v = qkv(layout)
    ref = masked_attention(q, k, v, p.dense_mask(), layout)
    out = pattern_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), p, layout, backend="gather")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


# -- the backend registry ------------------------------------------------------------------------------


class CircularWindow:
    """A generic pattern (neither box nor block: no fast tiled kernel knows it), defined on the whole
    sequence like the open pattern protocol: grid tokens see the grid tokens within ``radius``
    (Euclidean, in grid cells), text rows and columns are dense."""

    def __init__(self, layout, radius, with_mask_mod=True):
        self.layout, self.radius = layout, radius
        if not with_mask_mod:  # a dense mask only
            self.mask_mod = None

    def is_full(self):
        return False

    def mask_mod(self, b, h, qi, ki):
        lay = self.layout
        off, n, w = lay.image_slice.start, lay.num_image, lay.grid[-1]
        qg, kg = qi - off, ki - off
        inside = lambda g: (g >= 0) & (g < n)  # noqa: E731
        dy, dx = qg // w - kg // w, qg % w - kg % w
        return (dy * dy + dx * dx <= self.radius**2) | ~inside(qg) | ~inside(kg)

    def dense_mask(self):
        return circular_reference_mask(self.layout, self.radius)


def circular_reference_mask(layout, radius):
    """The circular window's (S, S) mask, from coordinates (independent of the kernels and of mask_mod)."""
    h, w = layout.grid
    yx = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2).float()
    grid = torch.cdist(yx, yx) <= radius + 1e-6
    m = torch.ones(layout.num_tokens, layout.num_tokens, dtype=torch.bool)
    m[layout.image_slice, layout.image_slice] = grid
    return m


def reference_sdpa(q, k, v, mask, kpm=None):
    """Independent reference: torch SDPA with the explicit (S, S) boolean mask (and key padding)."""
    m = mask[None, None]
    if kpm is not None:
        m = m & kpm[:, None, None, :]
    o = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=m)
    return o.transpose(1, 2)


def no_flex(monkeypatch):
    monkeypatch.setattr("diffusion_attn.kernels.flex.flex_available", lambda device_type="cpu": False)


@pytest.mark.parametrize("with_mask_mod", [True, False])
def test_generic_pattern_above_2048_tokens(monkeypatch, with_mask_mod):
    """B3: a circular window (neither box nor block) at 2,320 tokens: auto used to pick gather, which
    raised TypeError in tiling.py. Without flex it now runs the chunked reference, exactly."""
    no_flex(monkeypatch)
    layout = TokenLayout((48, 48), 16, "first")
    pattern = CircularWindow(layout, 5.5, with_mask_mod)
    assert layout.num_tokens > 2048
    assert kernels.capabilities_of(pattern) == (frozenset({"mask_mod"}) if with_mask_mod else frozenset())
    assert kernels.choose_backend(pattern, layout) == "chunked"
    q, k, v = qkv(layout, batch=2, heads=2, dim=8)
    kpm = padding(layout, 2, random.Random(5))
    ref = reference_sdpa(q, k, v, circular_reference_mask(layout, 5.5), kpm)
    out = pattern_attention(q, k, v, pattern, layout, key_padding_mask=kpm)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)
    cached = CountingCache()
    for _ in range(2):
        out = kernels.prepared_attention(q, k, v, pattern, layout, cached=cached, key="circle", key_padding_mask=kpm)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)
    assert cached.builds == ["chunked"]
    for name in ("gather", "strips", "windows"):  # the tiled kernels refuse it by name, clearly
        with pytest.raises(ValueError, match=f"backend='{name}' runs .*; backends that can: auto, .*chunked"):
            kernels.choose_backend(pattern, layout, name)


def test_chunked_small_chunks_and_head_dependent():
    """The chunked reference in many small chunks, and a head-dependent predicate (each head its own
    radius), against SDPA with an explicit per-head mask."""
    layout = TokenLayout((9, 11), 5, "last")

    class PerHead(CircularWindow):
        capabilities = frozenset({"mask_mod", "head_dependent"})

        def mask_mod(self, b, h, qi, ki):
            lay = self.layout
            n, w = lay.num_image, lay.grid[-1]
            inside = lambda g: (g >= 0) & (g < n)  # noqa: E731
            dy, dx = qi // w - ki // w, qi % w - ki % w
            return (dy * dy + dx * dx <= (1.5 + h) ** 2) | ~inside(qi) | ~inside(ki)

    pattern = PerHead(layout, None)
    q, k, v = qkv(layout, batch=2, heads=3, dim=8)
    mask = torch.stack([circular_reference_mask(layout, 1.5 + h) for h in range(3)])  # (H, S, S)
    o = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[None])
    ref = o.transpose(1, 2)
    from diffusion_attn.kernels.chunked import chunked_attention

    req = Request.make(pattern, layout, q=q, k=k, v=v)
    torch.testing.assert_close(chunked_attention(q, k, v, req, max_chunk_bytes=1), ref, atol=ATOL, rtol=1e-5)
    for backend in ("auto", "reference", "chunked"):
        torch.testing.assert_close(pattern_attention(q, k, v, pattern, layout, backend=backend), ref, atol=ATOL, rtol=1e-5)
    with pytest.raises(ValueError, match="does not run head-dependent patterns"):
        pattern_attention(q, k, v, pattern, layout, backend="flex")


def test_auto_rule_for_todays_patterns(monkeypatch):
    """The documented rule picks what the old if-chain picked for today's patterns."""
    no_flex(monkeypatch)
    big3 = (8, 32, 40)  # 10,240 tokens
    cases = [
        (neighborhood_pattern((4, 6), (4, 6)), TokenLayout((4, 6), 3), "dense"),
        (neighborhood_pattern(big3, (2, 8, 8), (2, 8, 8)), TokenLayout(big3), "windows"),
        (shifted_window_pattern((9, 7), 2), TokenLayout((9, 7)), "windows"),
        (neighborhood_pattern((4, 6, 8), 3), TokenLayout((4, 6, 8), 7), "reference"),
        (radial_pattern((3, 8, 8), 0.2, True), TokenLayout((3, 8, 8)), "reference"),
        (neighborhood_pattern(big3, (3, 9, 9)), TokenLayout(big3), "sliding"),  # sliding axes
        (neighborhood_pattern(big3, (3, 9, 9), (1, 9, 9)), TokenLayout(big3), "sliding"),  # on 1 axis
        (neighborhood_pattern(big3, (3, 9, 9), (3, 3, 3)), TokenLayout(big3), "strips"),  # strided everywhere
        (radial_pattern(big3, 0.2, True), TokenLayout(big3), "gather"),  # no flex here
    ]
    for pattern, layout, want in cases:
        assert kernels.choose_backend(pattern, layout) == want
    assert kernels.choose_backend(neighborhood_pattern(big3, (3, 9, 9)), TokenLayout(big3), device="meta") == "gather"
    monkeypatch.setattr("diffusion_attn.kernels.flex.flex_available", lambda device_type="cpu": True)
    assert kernels.choose_backend(radial_pattern(big3, 0.2, True), TokenLayout(big3)) == "flex"
    assert kernels.choose_backend(radial_pattern((8, 24, 40), 0.2, True), TokenLayout((8, 24, 40))) == "gather"  # < 8192


def test_auto_skips_backends_without_backward(monkeypatch):
    """Inputs that require grad never go to a backend that declares no backward; without grad they do."""
    import dataclasses

    no_backward = tuple(dataclasses.replace(b, autograd=False) if b.name == "strips" else b for b in registry.REGISTRY)
    monkeypatch.setattr(registry, "REGISTRY", no_backward)
    pattern, layout = neighborhood_pattern((6, 30, 26), (3, 15, 13), (3, 5, 13)), TokenLayout((6, 30, 26), 8)
    q, k, v = qkv(layout, batch=1, heads=1, dim=8)
    assert registry.resolve(Request.make(pattern, layout, q=q, k=k, v=v)).name == "strips"
    q.requires_grad_()
    req = Request.make(pattern, layout, q=q, k=k, v=v)
    assert registry.resolve(req).name == "gather"
    with pytest.raises(ValueError, match="backend='strips' has no backward"):
        registry.resolve(req, "strips")
    with torch.no_grad():
        assert registry.resolve(Request.make(pattern, layout, q=q, k=k, v=v)).name == "strips"
    # FlexAttention has no CPU backward: a long radial call under autograd goes to gather instead
    monkeypatch.setattr("diffusion_attn.kernels.flex.flex_available", lambda device_type="cpu": True)
    radial, big = radial_pattern((8, 32, 40), 0.2, True), TokenLayout((8, 32, 40))
    assert kernels.choose_backend(radial, big) == "flex"
    x = torch.empty(1, big.num_tokens, 1, 8, requires_grad=True)
    assert registry.resolve(Request.make(radial, big, q=x, k=x, v=x)).name == "gather"


def test_check_backend_without_a_layout():
    """What apply() can ask before any grid or tensor."""
    assert kernels.check_backend("auto", {"box"}, "cpu") is None
    assert kernels.check_backend("gather", {"box"}, "cpu") is None
    assert kernels.check_backend("strips", {"box", "partition"}, "cpu") is None
    assert kernels.check_backend("dense", {"block"}, "cpu") is None  # runs whenever the pattern is full
    assert kernels.check_backend("chunked", {"mask_mod", "head_dependent"}, "cpu") is None
    reason = kernels.check_backend("strips", {"block"}, "cpu")
    assert "runs box patterns" in reason and "backends that can: auto, " in reason and "gather" in reason
    assert "strips" not in reason.split("backends that can:")[1]
    assert "partition" in kernels.check_backend("windows", {"box"}, "cpu")
    assert "gather" not in kernels.check_backend("gather", {"mask_mod"}, "cpu").split("backends that can:")[1]
    assert "cuda" in kernels.check_backend("xformers", {"box", "partition"}, "cpu")
    assert "head-dependent" in kernels.check_backend("gather", {"box", "head_dependent"}, "cpu")
    assert "unknown backend 'flash'" in kernels.check_backend("flash", {"box"})
    assert "unknown pattern capabilities" in kernels.check_backend("gather", {"circle"})


def test_every_backend_is_registered_once():
    names = [b.name for b in registry.REGISTRY]
    assert len(set(names)) == len(names) and kernels.BACKENDS == ("auto", *names)
    for b in registry.REGISTRY:
        assert b.summary and callable(b.run)


# -- B5: caches are keyed by everything they depend on -----------------------------------------------


@pytest.mark.parametrize("backend", ["gather", "strips", "windows", "chunked", "reference"])
def test_cache_keys_follow_the_text_length(backend):
    """Two layouts with the same grid and different text lengths (Mochi's per-sample text) through one
    cache and one pattern key: each call is exact; artefacts are built per layout."""
    grid = (3, 8, 12)
    pattern = neighborhood_pattern(grid, (1, 4, 4), (1, 4, 4))  # a partition: every tiled kernel runs it
    cached = CountingCache()
    for text in (1, 7, 1):
        layout = TokenLayout(grid, text, "last")
        q, k, v = qkv(layout, batch=1, seed=text)
        ref = reference_sdpa(q, k, v, full_mask(pattern.dense_mask(), layout))
        out = kernels.prepared_attention(q, k, v, pattern, layout, cached=cached, key=("gna", grid), backend=backend)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)
    prepares = kernels.get_backend(backend).prepare is not None
    assert cached.builds == ([backend, backend] if prepares else [])


def test_cache_key_is_derived_from_every_request_field():
    grid = (3, 8, 12)
    pattern = neighborhood_pattern(grid, 3)
    b = kernels.get_backend("gather")
    base = Request.make(pattern, TokenLayout(grid, 4, "last"), pattern_key="p")
    others = [
        Request.make(pattern, TokenLayout(grid, 5, "last"), pattern_key="p"),
        Request.make(pattern, TokenLayout(grid, 4, "first"), pattern_key="p"),
        Request.make(pattern, TokenLayout(grid, 4, "last"), pattern_key="q"),
        Request.make(pattern, TokenLayout(grid, 4, "last"), pattern_key="p", device="meta"),
    ]
    keys = {b.cache_key(r) for r in [base, *others]}
    assert len(keys) == 5
    assert b.cache_key(base) == b.cache_key(Request.make(pattern, TokenLayout(grid, 4, "last"), pattern_key="p"))


# -- B7: values with another head size; gradients ------------------------------------------------------


def cpu_backends():
    return [b.name for b in registry.REGISTRY if b.environment_reason("cpu") is None]


def b7_case(name):
    grid = (3, 6, 8)
    if name == "dense":
        pattern = neighborhood_pattern(grid, grid)
    else:  # blocked GNA with a border (a partition, a box, a GNA): every backend's pattern kind
        pattern = neighborhood_pattern(grid, (3, 4, 3), (3, 4, 3))
    return pattern, TokenLayout(grid, 5, "first")


@pytest.mark.parametrize("name", [n for n in kernels.BACKENDS if n != "auto"])
def test_value_head_size_differs(name):
    """B7: values with another head size than queries and keys: every backend that runs on CPU equals
    the reference, text padding included; the others refuse it in ``supports`` (auto then skips them)."""
    backend = kernels.get_backend(name)
    pattern, layout = b7_case(name)
    g = torch.Generator().manual_seed(7)
    q, k = (torch.randn(2, layout.num_tokens, 2, 16, generator=g) for _ in range(2))
    v = torch.randn(2, layout.num_tokens, 2, 24, generator=g)
    req = Request.make(pattern, layout, q=q, k=k, v=v)
    if not backend.value_dim:  # refused by its declaration, whatever the machine; auto never picks it
        import dataclasses

        assert "head size" in dataclasses.replace(backend, available=None, devices=None, check=None).supports(req)
        return
    if name not in cpu_backends():
        pytest.skip(f"backend={name!r} does not run on CPU here")
    if name == "flex" and not kernels.flex_available("cpu"):
        pytest.skip("compiled FlexAttention does not run on this machine")
    kpm = padding(layout, 2, random.Random(2))
    ref = reference_sdpa(q, k, v, full_mask(pattern.dense_mask(), layout), kpm)
    out = pattern_attention(q, k, v, pattern, layout, key_padding_mask=kpm, backend=name)
    assert out.shape == v.shape
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)
    bare = TokenLayout(layout.grid)  # no text: the grid kernels' paths without extra keys
    n = bare.num_tokens
    q, k, v = q[:, :n], k[:, :n], v[:, :n]
    out = pattern_attention(q, k, v, pattern, bare, backend=name)
    torch.testing.assert_close(out, reference_sdpa(q, k, v, pattern.dense_mask()), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("name", [n for n in kernels.BACKENDS if n != "auto"])
def test_gradients_equal_reference(name, device):
    """Every backend that declares a backward: q, k, v gradients equal the reference's (fp32), on every
    device it runs on here. A backend whose backward is missing on a device refuses inputs that require
    grad there (``supports``), so ``auto`` skips it."""
    backend = kernels.get_backend(name)
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not backend.autograd:
        pytest.skip(f"backend={name!r} declares no backward (auto never picks it under autograd)")
    if backend.environment_reason(device) is not None:
        pytest.skip(f"backend={name!r} does not run on {device} here")
    pattern, layout = b7_case(name)
    q, k, v = (t.to(device) for t in qkv(layout, batch=1, heads=2, dim=32, seed=11))
    reason = backend.supports(Request.make(pattern, layout, q=q.requires_grad_(), k=k, v=v))
    q.requires_grad_(False)
    if reason is not None:
        assert device == "cpu" and name in ("flex", "natten") and "no backward on CPU" in reason, reason
        pytest.skip(reason)
    weights = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device)
    mask = full_mask(pattern.dense_mask(), layout).to(device)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        (fn(*leaves) * weights).sum().backward()
        return [t.grad for t in leaves]

    got = grads(lambda q_, k_, v_: pattern_attention(q_, k_, v_, pattern, layout, backend=name))
    want = grads(lambda q_, k_, v_: reference_sdpa(q_, k_, v_, mask))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# -- the pattern protocol of diffusion_attn.patterns (grid patterns, MaskMods, dynamic patterns) ------


def test_protocol_circular_window_above_2048_tokens(monkeypatch):
    """B3 with the package's own CircularWindow (a refined box: its bounding square and the circle as a
    predicate), as it is and as a sequence MaskMod: auto runs it (sliding on CPU), equal to SDPA with the
    explicit mask."""
    from diffusion_attn.patterns import CircularWindow, as_sequence_pattern

    no_flex(monkeypatch)
    layout = TokenLayout((48, 48), 16, "last")
    grid_pattern = CircularWindow((48, 48), 5.0)
    q, k, v = qkv(layout, batch=1, heads=2, dim=8)
    h, w = layout.grid
    yx = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2).float()
    mask = torch.ones(layout.num_tokens, layout.num_tokens, dtype=torch.bool)
    mask[layout.image_slice, layout.image_slice] = ((yx[:, None] - yx[None]) ** 2).sum(-1) < 25.0
    ref = reference_sdpa(q, k, v, mask)
    for pattern in (grid_pattern, as_sequence_pattern(grid_pattern, layout)):
        assert kernels.choose_backend(pattern, layout) == "sliding"
        torch.testing.assert_close(pattern_attention(q, k, v, pattern, layout), ref, atol=ATOL, rtol=1e-5)


def test_protocol_text_dense_box_runs_the_grid_kernels():
    """A box pattern handed over as a sequence MaskMod (``as_sequence_pattern``) picks the same backend
    and gives bit-identical output to the box pattern itself."""
    from diffusion_attn.patterns import as_sequence_pattern

    for pattern, layout in [
        (neighborhood_pattern((6, 30, 26), (3, 15, 13), (1, 5, 13)), TokenLayout((6, 30, 26), 8, "first")),
        (neighborhood_pattern((6, 30, 26), (3, 15, 13), (3, 15, 13)), TokenLayout((6, 30, 26), 8, "last")),
        (radial_pattern((4, 8, 8), 0.5, True), TokenLayout((4, 8, 8), 5)),
    ]:
        seq = as_sequence_pattern(pattern, layout)
        assert kernels.choose_backend(seq, layout) == kernels.choose_backend(pattern, layout)
        q, k, v = qkv(layout, batch=1, heads=1, dim=8)
        assert torch.equal(pattern_attention(q, k, v, seq, layout), pattern_attention(q, k, v, pattern, layout))


def test_protocol_dynamic_pattern_is_resolved_per_call():
    """A dynamic pattern (top-k key blocks chosen from q and k, head- and batch-dependent) is resolved
    per call and never cached; equals SDPA with the resolved pattern's explicit mask."""
    from diffusion_attn.patterns import TopKKeyBlocks

    layout = TokenLayout((6, 10), 4, "first")
    pattern = TopKKeyBlocks(block_size=8, top_k=2)
    q, k, v = qkv(layout, batch=2, heads=2, dim=8)
    mask = pattern.resolve(q, k, layout).dense_mask(batch=2, heads=2)
    o = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    ref = o.transpose(1, 2)
    torch.testing.assert_close(pattern_attention(q, k, v, pattern, layout), ref, atol=ATOL, rtol=1e-5)
    cached = CountingCache()
    out = kernels.prepared_attention(q, k, v, pattern, layout, cached=cached, key="topk", backend="chunked")
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)
    assert cached.builds == []
    with pytest.raises(ValueError, match="runs box patterns .*; backends that can: auto, reference, chunked$"):
        kernels.choose_backend(pattern, layout, "gather")
