"""B8 / B10: every parameter error that can be known at ``apply`` is raised there, with a message that
says what was wrong and what is accepted, and leaves the pipeline untouched; values are checked
strictly (NaN, non-int tuple entries, explicit None); TokenLayout refuses non-int sizes."""


import re

import pytest
import torch

import diffusion_attn as da
from diffusion_attn.processors.install import get_processors
from pipes import pipe_cache


pipe_for = pipe_cache()


def snapshot(pipe):
    return {id(m): (get_processors(m), dict(getattr(getattr(m, "_diffusers_hook", None), "hooks", {}) or {}),
                    set(m.__dict__), dict(m.forward.__dict__) if hasattr(m.forward, "__dict__") else None)
            for m in da.denoisers(pipe)}


def assert_untouched(pipe, before):
    after = snapshot(pipe)
    assert after.keys() == before.keys()
    for key, (procs_b, hooks_b, attrs_b, _) in before.items():
        procs_a, hooks_a, attrs_a, _ = after[key]
        assert procs_a.keys() == procs_b.keys() and all(procs_a[n] is procs_b[n] for n in procs_b)
        assert hooks_a.keys() == hooks_b.keys() and attrs_a == attrs_b


def rejected(pipe, method, match, **params):
    """``apply`` raises a ValueError matching ``match`` and the pipeline is left as it was."""
    before = snapshot(pipe)
    with pytest.raises(ValueError, match=match):
        da.apply(pipe, method, **params)
    assert_untouched(pipe, before)
    assert not da.remove(pipe)


# ---------------------------------------------------------------------------------------------------
# B8: known at apply
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("params, match", [
    (dict(window=(3, 4), stride=(4, 1)), r"stride must be <= window on every axis .* window=\(3, 4\), stride=\(4, 1\)"),
    (dict(window=3, stride=4), r"stride must be <= window"),
    (dict(window=(3, 3, 3)), r"'window'=\(3, 3, 3\) has 3 entries, but flux models have a 2-D token grid \(H, W\): "
                             r"give 2 entries or one int that broadcasts"),
    (dict(window=3, dilation=(1, 1, 1)), r"'dilation'=\(1, 1, 1\) has 3 entries, but flux models"),
    (dict(window=(3, 3), stride=(1, 1, 1)), r"window, stride and dilation must have the same number of entries"),
    (dict(window=3, backend=None), r"'backend' does not take None \(its default is 'auto'\); omit it"),
])
def test_gna_errors_known_at_apply_on_an_image_model(params, match):
    rejected(pipe_for("tiny-flux-random"), "gna", match, **params)


def test_grid_rank_on_a_video_model_and_broadcasting():
    pipe = pipe_for("tiny-wan-random")
    rejected(pipe, "gna", r"'window'=\(3, 4\) has 2 entries, but wan models have a 3-D token grid \(T, H, W\)",
             window=(3, 4))
    with da.applied(pipe, "gna", window=(3,), stride=1) as h:  # a 1-tuple broadcasts
        assert h.params["window"] == (3,)
    with da.applied(pipe, "gna", window=(3, 4, 4), stride=(1, 2, 2)):
        pass


@pytest.mark.parametrize("backend, needs", [("windows", "partition the grid"), ("strips", "box patterns"),
                                            ("natten", "box patterns"), ("xformers", "partition the grid")])
def test_radial_refuses_backends_that_can_never_run_it(backend, needs):
    rejected(pipe_for("tiny-wan-random"), "radial", rf"backend='{backend}' cannot run radial: it runs .*{needs}.*; "
                                             r"accepted: auto, dense, reference, flex, gather, chunked, triton",
             backend=backend)


def test_backends_this_machine_cannot_run_are_refused_at_apply(monkeypatch):
    """triton and xformers need CUDA: on a CPU-only torch they are refused at apply, not at the first call;
    sliding GNA (stride < window) never partitions the grid, so backend='windows' is refused too."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    pipe = pipe_for("tiny-wan-random")
    rejected(pipe, "radial", r"backend='triton' cannot run radial on this machine \(cpu\): .*", backend="triton")
    rejected(pipe, "gna", r"backend='xformers' cannot run gna on this machine \(cpu\)", window=3, stride=3, backend="xformers")
    rejected(pipe, "gna", r"backend='windows' cannot run gna: it runs patterns whose windows partition the grid",
             window=3, stride=1, backend="windows")
    with da.applied(pipe, "gna", window=(3, 4, 4), stride=(3, 4, 4), backend="windows"):
        pass


def test_radial_backend_none_and_nan():
    pipe = pipe_for("tiny-wan-random")
    rejected(pipe, "radial", r"'backend' does not take None", backend=None)
    rejected(pipe, "radial", r"'decay_factor' must be a finite number, got nan", decay_factor=float("nan"))
    rejected(pipe, "radial", r"'decay_factor' must be a finite number, got inf", decay_factor=float("inf"))
    # None for a parameter whose default is None means that default (here: Wan's per-model value)
    with da.applied(pipe, "radial", decay_factor=None, sink=None) as h:
        assert (h.params["decay_factor"], h.params["sink"]) == (0.2, True)


# ---------------------------------------------------------------------------------------------------
# B10: strict values
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window, match", [
    ((2.5, 3), r"'window' entries must be ints, got 2\.5 in \(2\.5, 3\)"),
    ((True, 3), r"'window' entries must be ints, got True in \(True, 3\)"),
    ((), r"'window' must not be empty"),
    ("3,,8", r"'window' must be an int or a tuple of ints"),
    (2.0, r"'window' must be an int or a tuple of ints"),
])
def test_tuple_entries_must_be_ints(window, match):
    rejected(pipe_for("tiny-flux-random"), "gna", match, window=window)
    with pytest.raises(ValueError, match=match):
        da.GNAProcessor(window=window)


def test_hidiffusion_nan_and_none():
    pipe = pipe_for("tiny-sd15-random")
    rejected(pipe, "hidiffusion", r"'t1_ratio' must be a finite number, got nan", t1_ratio=float("nan"))
    rejected(pipe, "hidiffusion", r"'shift' must be int, got 1\.5", shift=1.5)
    rejected(pipe, "hidiffusion", r"'apply_raunet' does not take None \(its default is True\)", apply_raunet=None)
    rejected(pipe, "hidiffusion", r"'model_variant' must be a string, got 3", model_variant=3)
    with da.applied(pipe, "hidiffusion", seed=None, apply_raunet=False) as h:  # seed=None is documented
        assert h.params["seed"] is None


def test_numbers_accept_integral_numpy_values_and_reject_strings():
    import numpy as np

    assert da.RadialConfig(dense_steps=np.int64(3)).dense_steps == 3
    assert da.RadialConfig(decay_factor=np.float32(0.5)).decay_factor == 0.5
    with pytest.raises(ValueError, match="'dense_steps' must be int, got '3'"):
        da.RadialConfig(dense_steps="3")
    with pytest.raises(ValueError, match="'sink' must be True or False, got 1"):
        da.RadialConfig(sink=1)


@pytest.mark.parametrize("name", [None, 3, ["gna"]])
def test_get_method_with_a_non_name(name):
    listed = re.escape(", ".join(sorted(da.methods())))
    with pytest.raises(ValueError, match=rf"method must be a method name \(one of {listed}\) or a method config, got"):
        da.get_method(name)
    with pytest.raises(ValueError, match="method must be a method name"):
        da.apply(pipe_for("tiny-flux-random"), name)


@pytest.mark.parametrize("kwargs, match", [
    (dict(grid=(2.5, 3)), r"TokenLayout\.grid must be 1 to 3 positive ints, got \(2\.5, 3\)"),
    (dict(grid=(True, 3)), r"TokenLayout\.grid must be 1 to 3 positive ints"),
    (dict(grid=(0, 3)), r"TokenLayout\.grid must be 1 to 3 positive ints"),
    (dict(grid=(1, 2, 3, 4)), r"TokenLayout\.grid must be 1 to 3 positive ints"),
    (dict(grid=3), r"TokenLayout\.grid must be 1 to 3 positive ints, got 3"),
    (dict(grid=(2, 3), text_len=2.5), r"TokenLayout\.text_len must be an int >= 0, got 2\.5"),
    (dict(grid=(2, 3), text_len=True), r"TokenLayout\.text_len must be an int >= 0"),
    (dict(grid=(2, 3), text_len=-1), r"TokenLayout\.text_len must be an int >= 0"),
])
def test_token_layout_refuses_non_int_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        da.TokenLayout(**kwargs)


def test_token_layout_accepts_int_likes():
    import numpy as np

    layout = da.TokenLayout(torch.Size([3, 4]), np.int64(5))
    assert layout.grid == (3, 4) and layout.text_len == 5 and type(layout.text_len) is int


def test_token_layout_under_torch_compile_with_dynamic_shapes():
    def f(x):  # symbolic sizes have __index__: accepted as ints, as int() did before
        return x * da.TokenLayout(x.shape[-2:], 0).num_image

    assert torch.compile(f, dynamic=True, backend="eager")(torch.ones(3, 4)).sum().item() == 144
