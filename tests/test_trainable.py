"""Trainable pieces and dynamic patterns: a processor with parameters is part of the model (to(),
parameters(), state_dict(), safetensors, training) and leaves with remove(); a pattern chosen per
call from q and k is used for that call only. Small examples, not methods."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import diffusion_attn as da
from diffusion_attn.context import RunContext
from diffusion_attn.layout import TokenLayout
from diffusion_attn.models.tiny import build_pipeline, default_call_kwargs
from diffusion_attn.patterns import neighborhood_pattern
from diffusion_attn.processors import GNAProcessor, TrainableProcessor


class HeadTemperatureGNA(TrainableProcessor):
    """GNA with a learned per-head query scale (an example of a processor with parameters)."""

    method = "gna"

    def __init__(self, heads: int, window=3):
        super().__init__(backend="reference")
        self.window = window
        self.log_scale = torch.nn.Parameter(torch.zeros(heads))

    def pattern_key(self, layout):
        return ("example", layout.grid, self.window)

    def pattern(self, layout):
        return neighborhood_pattern(layout.grid, (self.window,) * len(layout.grid))

    def reduce(self, q, k, v, layout):
        q = q * self.log_scale.exp()[None, None, :, None].to(q.dtype)
        return q, k, v, layout, lambda out: out


def flux_run(pipe):
    out = pipe(prompt="a fox", generator=torch.Generator().manual_seed(0), **default_call_kwargs("flux"))[0]
    return out


class Installed:
    """set_attn_processor + attach, undone by handle.remove() then re-installing the stock processors
    (attach's handle restores what the user had installed, which are these processors)."""

    def __init__(self, model):
        self.model, self.stock = model, dict(model.attn_processors)
        heads = model.config.num_attention_heads
        model.set_attn_processor({name: HeadTemperatureGNA(heads) for name in self.stock})
        self.handle = da.attach(model)

    def remove(self):
        self.handle.remove()
        self.model.set_attn_processor(self.stock)


def install(model):
    return Installed(model)


def test_processor_parameters_are_part_of_the_model_and_leave_with_remove(tmp_path):
    pipe = build_pipeline("tiny-flux-random")
    model = pipe.transformer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stock = flux_run(pipe)

    handle = install(model)
    names = [k for k in model.state_dict() if k.endswith("processor.log_scale")]
    assert len(names) == len(model.attn_processors) == 4
    assert sum(p.numel() for n, p in model.named_parameters() if "processor" in n) == 4 * model.config.num_attention_heads
    with torch.no_grad():  # a trained state: scales away from 1
        for i, proc in enumerate(model.attn_processors.values()):
            proc.log_scale.fill_(0.1 * (i + 1))
    trained = flux_run(pipe)
    save_file({k: v for k, v in model.state_dict().items() if "processor" in k}, tmp_path / "attn.safetensors")
    model.to(torch.float64)
    assert all(p.log_scale.dtype == torch.float64 for p in model.attn_processors.values())
    model.to(torch.float32)
    handle.remove()

    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(flux_run(pipe), stock)

    handle = install(model)  # fresh processors, trained weights loaded from the file
    missing, unexpected = model.load_state_dict(load_file(tmp_path / "attn.safetensors"), strict=False)
    assert not unexpected and all("processor" not in k for k in missing)
    assert torch.equal(flux_run(pipe), trained)
    handle.remove()
    assert not torch.equal(trained, stock)


def test_processor_parameters_train():
    pipe = build_pipeline("tiny-flux-random")
    model = pipe.transformer
    handle = install(model)
    try:
        params = [p for n, p in model.named_parameters() if "processor" in n]
        opt = torch.optim.SGD(params, lr=1.0)
        x = torch.randn(1, 8 * 12, 16)
        kwargs = dict(encoder_hidden_states=torch.randn(1, 5, 32), pooled_projections=torch.randn(1, 32),
                      timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                      img_ids=torch.stack([torch.zeros(96), torch.arange(96.) // 12, torch.arange(96.) % 12], -1),
                      txt_ids=torch.zeros(5, 3), return_dict=False)
        loss = model(x, **kwargs)[0].square().mean()
        loss.backward()
        assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params)
        opt.step()
        assert any(bool(p.abs().sum() > 0) for p in params)
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------------
class QChosenWindow(GNAProcessor):
    """A dynamic pattern: the window grows when the queries' mean is positive (chosen per call)."""

    def call_pattern(self, q, k, layout):
        return neighborhood_pattern(layout.grid, (5,) if float(q.mean()) > 0 else (3,))


def window_mask_1d(n, w):
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        start = min(max(i - w // 2, 0), n - w)
        m[i, start:start + w] = True
    return m


@pytest.mark.parametrize("sign,window", [(1.0, 5), (-1.0, 3)])
def test_dynamic_pattern_is_chosen_per_call(sign, window):
    layout = TokenLayout((12,), 0)
    ctx = RunContext("wan")
    ctx.grid, ctx.step = layout.grid, 0
    proc = QChosenWindow(window=3, backend="reference").bind(ctx, None, 0)
    q, k, v = torch.randn(1, 12, 2, 4), torch.randn(1, 12, 2, 4), torch.randn(1, 12, 2, 4)
    q = q - q.mean() + sign
    out = proc.core(q, k, v, layout)
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=window_mask_1d(12, window)).transpose(1, 2)
    assert torch.allclose(out, expected, atol=1e-6)
    assert not any(key[0] == "pattern" for key in ctx.cache)  # nothing cached for a dynamic pattern
