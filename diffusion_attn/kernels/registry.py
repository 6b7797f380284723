"""The backend registry and the ``auto`` rule.

Every backend is one file that ends with a ``BACKEND = Backend(...)`` declaration (:mod:`.backend`): what
pattern capabilities, devices, dtypes and head sizes it runs, whether values may have another head size,
whether it has a backward, its per-layout ``prepare`` and its ``run``. A new backend is that file plus
one line in :data:`REGISTRY`.

**The auto rule.** ``auto`` walks :data:`REGISTRY` in order and takes the first backend that prefers the
call (its ``auto`` predicate) and supports it (:meth:`Backend.supports`: capabilities, device,
environment, dtype, head sizes, ``Dv != D``, autograd). In order:

1. ``dense``: the pattern allows everything;
2. ``windows``: its windows partition the grid (blocked GNA, HiDiffusion's shifted windows);
3. ``reference``: up to :data:`~.reference.SMALL_SEQUENCE` (2,048) tokens;
4. ``flex``: block patterns from :data:`~.flex.FLEX_MIN_TOKENS` (8,192) tokens, and generic patterns
   (neither box nor block: a ``mask_mod`` or a dense mask only) past 2,048, where compiled FlexAttention
   runs;
5. ``sliding``: box patterns on CPU with a sliding axis (stride 1 inside the borders), where it was
   measured 1.15-2.5x faster than ``strips`` (issue 11, ``benchmarks/results/sliding.md``), refined boxes
   included (CLEAR's circle in its bounding square: 1.0-1.6x ``strips``, 2-4x ``flex``,
   ``benchmarks/results/clear.md``); no backward, so autograd goes on to ``strips``;
6. ``strips``: box patterns on CPU (windows strided or blocked on every axis);
7. ``gather``: box and block patterns;
8. ``chunked``: anything else (the reference by chunks of query rows).

A refined box (capability ``"refined"``) runs only on backends that declare it in ``handles`` (gather,
strips, sliding, flex, reference, chunked). ``triton``, ``natten`` and ``xformers`` are opt-in (``backend=`` by name). A pattern that allows every
pair always runs ``dense``, whatever backend was named.
"""

from __future__ import annotations

from . import chunked, dense, flex, gather, natten_adapter, reference, sliding, strips, triton_sparse, windows, xformers_adapter
from .backend import Backend, Request
from .capabilities import CAPABILITIES

__all__ = ["AUTO", "BACKENDS", "REGISTRY", "check_backend", "get_backend", "resolve"]

#: every backend, in the order ``auto`` considers them
REGISTRY: tuple[Backend, ...] = (
    dense.BACKEND,
    windows.BACKEND,
    reference.BACKEND,
    flex.BACKEND,
    sliding.BACKEND,
    strips.BACKEND,
    gather.BACKEND,
    chunked.BACKEND,
    triton_sparse.BACKEND,
    natten_adapter.BACKEND,
    xformers_adapter.BACKEND,
)

#: what ``backend=`` accepts: "auto" and every registered name (the CLI, UI and ComfyUI offer these)
BACKENDS: tuple[str, ...] = ("auto", *(b.name for b in REGISTRY))

AUTO = "auto"


def get_backend(name: str) -> Backend:
    """The registered backend called ``name``; ValueError listing the accepted names otherwise."""
    for b in REGISTRY:
        if b.name == name:
            return b
    raise ValueError(f"unknown backend {name!r}; accepted: {', '.join(BACKENDS)}")


def _able(request: Request) -> list[str]:
    return [b.name for b in REGISTRY if b.supports(request) is None]


def resolve(request: Request, backend: str = AUTO) -> Backend:
    """The backend that runs ``request``: ``backend`` itself (checked), or the ``auto`` rule's choice.

    Errors: ValueError for an unknown name or a backend that cannot run this pattern / these tensors,
    RuntimeError for one the environment or device cannot run; both name the backends that can."""
    if backend != AUTO:
        chosen = get_backend(backend)
    if request.is_full:
        return get_backend("dense")
    if backend == AUTO:
        for b in REGISTRY:
            if b.auto is not None and b.auto(request) and b.supports(request) is None:
                return b
        raise ValueError(f"no backend can run this pattern ({', '.join(sorted(request.capabilities)) or 'a mask only'}) "
                         f"on {request.device_type}")
    reason = chosen.supports(request)
    if reason is None:
        return chosen
    able = [n for n in _able(request) if n != "dense"]
    hint = f"; backends that can: {', '.join(['auto'] + able)}" if able else ""
    environment = chosen.environment_reason(request.device_type) is not None
    raise (RuntimeError if environment else ValueError)(reason + hint)


def check_backend(backend: str, capabilities, device_type: str = "cpu") -> str | None:
    """Whether ``backend`` can ever run a pattern with ``capabilities`` on ``device_type``, known before
    any grid, layout or tensor (at ``apply`` time): None if it may, else the reason (one sentence that
    names the backends that can). ``"auto"`` always may; ``"dense"`` may (it runs whenever the pattern
    turns out full). Checks the name, the environment (installed packages, compile), the device and the
    pattern capabilities; dtype, head sizes, autograd and the pattern's details are checked per call."""
    if backend == AUTO:
        return None
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}"
    caps = frozenset(capabilities)
    unknown = caps - CAPABILITIES
    if unknown:
        return f"unknown pattern capabilities {sorted(unknown)}; known: {sorted(CAPABILITIES)}"
    chosen = get_backend(backend)
    if chosen.full_only:
        return None
    reason = chosen.static_reason(caps, device_type)
    if reason is None:
        return None
    able = [b.name for b in REGISTRY if not b.full_only and b.static_reason(caps, device_type) is None]
    return reason + (f"; backends that can: {', '.join(['auto'] + able)}" if able else "")
