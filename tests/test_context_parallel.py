"""Context parallelism (diffusers' ``enable_parallelism``) with the pack's methods: two gloo processes on
CPU against one process, same seed, fp32.

One launch of two processes (this file run as a script with torchrun's environment variables) runs every
scenario of :data:`SCENARIOS` and saves rank 0's results; the test process computes the one-process
reference of each scenario itself and compares. The reference never goes through the parallel code:
it is the plain pipeline with the method applied (itself tested against the dense oracle in the method
tests) and, for the "stock" scenarios, the plain pipeline.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = 2
TOL = dict(rtol=1e-4, atol=1e-5)

#: name -> (model, method or None, params, mode, order, placement heads)
#: order "enable-first": enable_context_parallel then apply; "apply-first": apply then enable_context_parallel;
#: "bare-enable": apply then the model's own enable_parallelism (diffusers' plan, or the family's, no hooks);
#: "apply-remove": apply, enable_context_parallel, remove: the stock parallel model
Z = dict(dense_layers=0, dense_steps=0)
SCENARIOS = {
    "wan-gna-ulysses": ("tiny-wan-random", "gna", dict(window=(3, 5, 5), **Z), "ulysses", "enable-first", None),
    # first layer and first step dense: the placement's dense path runs through the parallel op too
    "wan-radial-ulysses": ("tiny-wan-random", "radial", dict(decay_factor=0.3, dense_layers=1, dense_steps=1),
                           "ulysses", "apply-first", None),
    "wan-stock-ulysses-removed": ("tiny-wan-random", "gna", dict(window=(3, 5, 5), **Z), "ulysses", "apply-remove", None),
    "flux-gna-ulysses": ("tiny-flux-random", "gna", dict(window=(5, 5), **Z), "ulysses", "bare-enable", None),
    # the method on head 1 only: rank 1 holds it, and must know its head is the model's head 1
    "flux-gna-ulysses-head1": ("tiny-flux-random", "gna", dict(window=(5, 5)), "ulysses", "enable-first", (1,)),
    "flux-gna-ring": ("tiny-flux-random", "gna", dict(window=(5, 5), **Z), "ring", "enable-first", None),
    "hunyuan-gna-ulysses": ("tiny-hunyuanvideo", "gna", dict(window=(3, 5, 5), **Z), "ulysses", "enable-first", None),
    # without the family's mask hook: the processors get the whole-sequence text mask and order it themselves
    "hunyuan-radial-ulysses": ("tiny-hunyuanvideo", "radial", dict(decay_factor=0.3, **Z), "ulysses", "bare-enable", None),
    # the stock processors too: the text-padding mask is cut per rank by the family's hook
    "hunyuan-stock-ulysses-removed": ("tiny-hunyuanvideo", "gna", dict(window=(3, 5, 5), **Z), "ulysses", "apply-remove", None),
    # dual path (window + full branch in the batch), cross-attention override, cache mode: per rank
    "wan-freeswim-ulysses": ("tiny-wan-random", "freeswim", dict(native_height=32, native_width=32, mode="cache", cache_steps=2),
                             "ulysses", "enable-first", None),
    # CLEAR's circle plus the pooled key segment (E4a) of the down-sampled variant, per rank
    "flux-clear-ulysses": ("tiny-flux-random", "clear", dict(radius=2, down_factor=2), "ulysses", "enable-first", None),
    "hunyuan-radial-ring": ("tiny-hunyuanvideo", "radial", dict(decay_factor=0.3, **Z), "ring", "apply-first", None),
}


def _pipe(name):
    from diffusion_attn.models import build_pipeline

    pipe = build_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, name):
    from diffusion_attn.models import default_call_kwargs

    kw = default_call_kwargs(name, num_inference_steps=STEPS, output_type="latent")
    out = pipe(prompt="a red ball", generator=torch.Generator().manual_seed(0), **kw)
    return (out.frames if hasattr(out, "frames") else out.images).float()


def _apply(pipe, method, params, heads):
    import diffusion_attn as da
    from diffusion_attn.placement import Placement

    if heads is None:
        return da.apply(pipe, method, **params)
    return da.apply(pipe, method, placement=Placement(heads=heads), **params)


def _reference(name):
    model, method, params, _, order, heads = SCENARIOS[name]
    pipe = _pipe(model)
    if order == "apply-remove":
        return _generate(pipe, model)
    with _apply(pipe, method, params, heads):
        return _generate(pipe, model)


# ------------------------------------------------------------------------------------------------------
# the two-process side
# ------------------------------------------------------------------------------------------------------
def _parallel(name):
    from diffusers import ContextParallelConfig
    from diffusion_attn import parallel

    model, method, params, mode, order, heads = SCENARIOS[name]
    pipe = _pipe(model)
    degree = dict(ulysses_degree=2) if mode == "ulysses" else dict(ring_degree=2)
    if order == "enable-first":
        parallel.enable_context_parallel(pipe, **degree)
        handle = _apply(pipe, method, params, heads)
    elif order == "apply-first":
        handle = _apply(pipe, method, params, heads)
        parallel.enable_context_parallel(pipe, **degree)
    elif order == "bare-enable":
        handle = _apply(pipe, method, params, heads)
        from diffusion_attn.adapters import family_of

        plan = None if pipe.transformer._cp_plan is not None else family_of(pipe.transformer).cp_plan
        with parallel._accelerator_count_for_cpu():  # (diffusers' device choice divides by 0 on CPU-only machines)
            pipe.transformer.enable_parallelism(config=ContextParallelConfig(**degree), cp_plan=plan)
    elif order == "apply-remove":  # applied, made parallel, removed: the stock parallel model
        before = dict(pipe.transformer.attn_processors)
        handle = _apply(pipe, method, params, heads)
        parallel.enable_context_parallel(pipe, **degree)
        handle.remove()
        handle = None
        after = pipe.transformer.attn_processors
        assert all(after[n] is p for n, p in before.items()), "remove() did not restore the processors"
    out = _generate(pipe, model)
    if handle is not None:
        handle.remove()
    return out


def _errors() -> dict:
    """Messages of the refusals that need a process group."""
    import diffusion_attn as da
    from diffusion_attn import parallel
    from diffusion_attn.processors.base import PatternProcessor

    found = {}
    pipe = _pipe("tiny-sd15-random")  # a UNet (HiDiffusion's family): no plan in diffusers
    handle = da.apply(pipe, "hidiffusion")
    procs = dict(pipe.unet.attn_processors)
    try:
        parallel.enable_context_parallel(pipe, ulysses_degree=2)
    except Exception as e:  # noqa: BLE001 - reported to the test
        found["unet"] = f"{type(e).__name__}: {e}"
    found["unet_untouched"] = pipe.unet._parallel_config is None and all(
        pipe.unet.attn_processors[n] is p for n, p in procs.items())
    handle.remove()
    # a method on a model made parallel under a mode it does not declare: hidiffusion has no DiT; use a
    # processor overriding an extension point under ring (first-call check)
    pipe = _pipe("tiny-flux-random")
    parallel.enable_context_parallel(pipe, ring_degree=2)

    class Seg(PatternProcessor):
        method = "seg-test"
        context_parallel = ("ulysses", "ring")  # declares ring, but its extra_kv needs the whole sequence

        def pattern(self, layout):
            return None

        def extra_kv(self, q, k, v, layout):
            return []

    procs = {n: Seg() for n in pipe.transformer.attn_processors}
    pipe.transformer.set_attn_processor(procs)
    da.attach(pipe.transformer)
    try:
        _generate(pipe, "tiny-flux-random")
    except Exception as e:  # noqa: BLE001
        found["ring_hook"] = f"{type(e).__name__}: {e}"
    return found


def _worker(out_path: str) -> None:
    import torch.distributed as dist

    from diffusion_attn.cli import main

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {name: _parallel(name) for name in SCENARIOS}
    results["errors"] = _errors()
    # the CLI under the same two processes (as torchrun -m diffusion_attn generate ... would run it)
    cli_out = Path(out_path).with_name("cli")
    results["cli_rc"] = main(["generate", "--model", "tiny-flux-random", "--method", "gna", "--window", "5,5",
                              "--steps", "1", "--context-parallel", "ulysses", "--no-progress", "-o", str(cli_out)])
    if rank == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------
# the tests
# ------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def parallel_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp") / "results.pt"
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen([sys.executable, __file__, str(out)], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    if any(p.returncode for p in procs):
        pytest.fail("context-parallel workers failed:\n" + "\n----\n".join(log[-4000:] for log in logs))
    return torch.load(out)


_STOCK = {}


def _stock(model):
    if model not in _STOCK:
        _STOCK[model] = _generate(_pipe(model), model)
    return _STOCK[model]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_match_one_process(parallel_results, name):
    ref = _reference(name)
    got = parallel_results[name]
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, **TOL)
    model, method, *_, order, _ = SCENARIOS[name]
    if order != "apply-remove":  # the method changes the result: the comparison is not stock vs stock
        assert (ref - _stock(model)).abs().max() > 1e-3


def test_parallel_refusals(parallel_results):
    errors = parallel_results["errors"]
    # a UNet (HiDiffusion's family): no plan in diffusers; refused before anything changes
    assert "ContextParallelError" in errors["unet"] and "no context-parallel plan" in errors["unet"]
    assert "'hidiffusion' is applied" in errors["unet"] and "one generation per process" in errors["unet"]
    assert errors["unet_untouched"]
    # a processor declaring ring but overriding an extension point that needs the whole sequence
    assert "overrides extra_kv" in errors["ring_hook"] and "ulysses_degree=N" in errors["ring_hook"]


def test_cli_generate_under_torchrun_writes_once(parallel_results, tmp_path_factory):
    import json

    assert parallel_results["cli_rc"] == 0
    folder = next(p for p in tmp_path_factory.getbasetemp().glob("cp*") if (p / "results.pt").exists())
    sidecar = json.loads((folder / "cli.json").read_text())
    assert sidecar["method"] == "gna" and sidecar["family"] == "flux"
    assert len([p for p in folder.iterdir() if p.stem == "cli"]) == 2  # the image and its sidecar, once


# ------------------------------------------------------------------------------------------------------
# one-process checks (no process group needed)
# ------------------------------------------------------------------------------------------------------
def _fake_parallel(model, **degree):
    """A model marked context-parallel as enable_parallelism marks it (config only, no mesh): what the
    apply-time checks read."""
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

    model._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(**degree))


def test_gathered_order_is_each_ranks_chunk_of_each_stream():
    from diffusion_attn.layout import TokenLayout
    from diffusion_attn.parallel import gathered_order

    # Flux-like: text first. Rank 0 holds text 0-1 and image 4-6, rank 1 text 2-3 and image 7-9.
    assert gathered_order(TokenLayout((2, 3), 4, "first"), 2).tolist() == [0, 1, 4, 5, 6, 2, 3, 7, 8, 9]
    # HunyuanVideo-like: video first; unequal chunks as tensor_split cuts them (ulysses_anything)
    assert gathered_order(TokenLayout((1, 5), 3, "last"), 2).tolist() == [0, 1, 2, 5, 6, 3, 4, 7]
    assert gathered_order(TokenLayout((2, 4)), 4).tolist() == list(range(8))  # Wan: grid only


def test_shift_heads_reads_global_head_indices():
    from diffusion_attn.parallel import shift_heads
    from diffusion_attn.patterns.mask_mod import heads_in

    pattern = heads_in({1})
    zero, h0 = torch.zeros((), dtype=torch.long), torch.tensor(0)
    assert bool(shift_heads(pattern, 1).bind(None, None)(zero, h0, zero, zero))  # rank 1's head 0 is head 1
    assert not bool(pattern.bind(None, None)(zero, h0, zero, zero))
    assert shift_heads(pattern, 0) is pattern


def test_method_declarations():
    from diffusion_attn.registry import MethodSpec, get_method

    assert get_method("gna").context_parallel == ("ulysses", "ring")
    assert get_method("radial").context_parallel == ("ulysses", "ring")
    assert get_method("freeswim").context_parallel == get_method("clear").context_parallel == ("ulysses",)
    assert get_method("hidiffusion").context_parallel == get_method("agent").context_parallel == ()
    assert "context_parallel" in get_method("gna").describe()
    with pytest.raises(TypeError, match="context_parallel"):
        MethodSpec(name="x", summary="", paper="", families=("wan",), kind="k", install=lambda *a: [],
                   context_parallel=("tensor",))


def test_apply_on_a_parallel_model_checks_first():
    import diffusion_attn as da
    from diffusion_attn import registry
    from diffusion_attn.parallel import ContextParallelError

    pipe = _pipe("tiny-flux-random")
    model = pipe.transformer
    before = dict(model.attn_processors)
    # ulysses degree that does not divide the 2 heads
    _fake_parallel(model, ulysses_degree=4)
    with pytest.raises(ContextParallelError, match="2 attention heads.*ulysses_degree=4.*ulysses_anything"):
        da.apply(pipe, "gna", window=(5, 5))
    # a method that does not declare ring
    _fake_parallel(model, ring_degree=2)
    spec = registry.get_method("gna")
    object.__setattr__(spec, "context_parallel", ("ulysses",))  # as a method declaring Ulysses only
    try:
        with pytest.raises(ContextParallelError, match="cannot run under ring.*supports ulysses"):
            da.apply(pipe, "gna", window=(5, 5))
    finally:
        object.__setattr__(spec, "context_parallel", ("ulysses", "ring"))
    # ring and ulysses together
    _fake_parallel(model, ring_degree=2, ulysses_degree=2)
    with pytest.raises(ContextParallelError, match="both ring_degree.*alone"):
        da.apply(pipe, "gna", window=(5, 5))
    assert all(model.attn_processors[n] is p for n, p in before.items())  # nothing touched
    # a supported mode: the new processors take the model's parallel config; remove() restores everything
    _fake_parallel(model, ulysses_degree=2)
    handle = da.apply(pipe, "gna", window=(5, 5))
    assert all(p._parallel_config is model._parallel_config for p in model.attn_processors.values())
    handle.remove()
    assert all(model.attn_processors[n] is p for n, p in before.items())


def test_enable_needs_a_process_group():
    from diffusion_attn import parallel

    with pytest.raises(RuntimeError, match="torch.distributed is not initialised.*torchrun"):
        parallel.enable_context_parallel(_pipe("tiny-wan-random"), ulysses_degree=2)


def test_cpu_device_count_is_restored():
    from diffusion_attn import parallel

    before = torch.accelerator.device_count
    with parallel._accelerator_count_for_cpu():
        assert torch.accelerator.device_count() >= 1
    assert torch.accelerator.device_count is before


if __name__ == "__main__":
    _worker(sys.argv[1])


def test_cli_context_parallel_outside_torchrun(capsys, monkeypatch, tmp_path):
    from diffusion_attn.cli import main

    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    rc = main(["generate", "--model", "tiny-wan-random", "--method", "gna", "--window", "3,5,5",
               "--context-parallel", "ulysses", "--no-progress", "-o", str(tmp_path / "x")])
    assert rc != 0
    assert "launch with `torchrun --nproc-per-node N" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
