"""Distilling CLEAR's attention weights from the dense teacher, with accelerate (the official ``distill.py``).

    python -m diffusion_attn.training.clear --radius 2 --steps 800 --lr 2e-4 --output /work/runs/clear/tiny-flux-r2
    python -m diffusion_attn.training.clear --model tiny-flux-random --steps 2 --batch-size 2   # smoke run

The student is the pipeline's transformer with ``diffusion_attn.apply(transformer, "clear", ...)``; the
teacher a frozen copy with the stock processors. Trainable, as the official: every parameter whose name
contains ``.attn.to_q.`` / ``.attn.to_k.`` / ``.attn.to_v.`` / ``.attn.to_out.`` or ``spatial_weight``;
everything else is frozen. The loss, as the official::

    loss = L_flow_matching + 0.5 * L_distill + 0.5 * L_attn

``L_flow_matching``: MSE of the student's velocity against ``noise - x0``; ``L_distill``: MSE against the
teacher's prediction on the same input; ``L_attn``: the mean over the selected layers of the MSE between the
student's and the teacher's attention outputs. The official selects the single-stream blocks whose index in
``transformer.attn_processors`` is a multiple of 4 (``'single' in name and idx % 4 == 0``) and compares
the processor's output (the joint sequence's attention output, before ``proj_out``); so here (forward
hooks on those attention modules; ``attn_every`` changes the 4).

The result is a ``.safetensors`` file with the official key names (the transformer's named parameters
above, ``<layer>.attn.processor.spatial_weight`` included), named as the release
(``clear_local_{r}[_down_{f}].safetensors``), loadable with ``apply(pipe, "clear", weights=path)``.

Deviations from the official script, and why: the data are the shapes world's training pool (seeds below
:data:`~diffusion_attn.training.data.HELD_OUT_SEED`; the official distils on 10K FLUX-generated 1024 px
images), encoded by the pipeline's VAE (posterior samples, as the official's cached mean + std * noise);
timesteps follow the tiny model's own training (``sigmoid(N(0, 1))``, as :mod:`.loop`) rather than FLUX's
shifted scheduler with uniform indices; captions are dropped 10% of the time as in the tiny model's training
(its classifier-free guidance needs the unconditional branch); AdamW (Prodigy, lr 1, is not a dependency),
fp32, no DeepSpeed, no EMA.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["DistillConfig", "distill", "trainable_names"]

_TRAINED = (".attn.to_q.", ".attn.to_k.", ".attn.to_v.", ".attn.to_out.", "spatial_weight")


@dataclass
class DistillConfig:
    """One distillation run (see the module docstring)."""

    model: str = "tiny-flux"
    radius: int = 3
    down_factor: int = 1
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-4
    data_size: int = 2000
    seed: int = 0
    attn_every: int = 4
    caption_dropout: float = 0.1
    output: str = "runs/clear"
    max_minutes: float | None = None
    log_every: int = 25

    @property
    def filename(self) -> str:
        from ..processors.clear import released_filename

        return released_filename(self.radius, self.down_factor)


def trainable_names(model: torch.nn.Module) -> list[str]:
    """The parameters the official distils (and saves)."""
    return [n for n, _ in model.named_parameters() if any(s in n for s in _TRAINED)]


def _attn_layers(model, every: int) -> list[str]:
    """The attention modules whose outputs enter ``L_attn``: single blocks at processor index % every == 0."""
    names = [k.removesuffix(".processor") for k in model.attn_processors]
    return [n for i, n in enumerate(names) if "single" in n and i % every == 0]


def _capture(model, names: list[str], store: list):
    return [model.get_submodule(n).register_forward_hook(lambda m, a, out: store.append(out)) for n in names]


@torch.no_grad()
def _encode_pool(pipe, config: DistillConfig, gen: torch.Generator):
    from .data import shapes_pool, to_model_range

    pixels, captions = shapes_pool("image", config.data_size, 64)  # the shapes world's training resolution
    vae = pipe.vae
    out = []
    for i in range(0, len(pixels), 64):
        x = to_model_range(pixels[i:i + 64])
        out.append(vae.encode(x).latent_dist.sample(generator=gen))
    z = torch.cat(out)
    return (z - vae.config.shift_factor) * vae.config.scaling_factor, captions


def distill(config: DistillConfig) -> Path:
    """Run ``config``; returns the path of the weights file."""
    from accelerate import Accelerator
    from diffusers import FluxPipeline

    import diffusion_attn as da
    from ..models import build_pipeline

    torch.manual_seed(config.seed)
    accelerator = Accelerator(mixed_precision="no")
    out_dir = Path(config.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = build_pipeline(config.model)
    if type(pipe).__name__ != "FluxPipeline":
        raise ValueError(f"CLEAR distillation runs on Flux pipelines; {config.model} is a {type(pipe).__name__}")
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
    student = pipe.transformer
    teacher = copy.deepcopy(student).eval()
    gen = torch.Generator().manual_seed(config.seed)
    latents, captions = _encode_pool(pipe, config, gen)

    handle = da.apply(student, "clear", radius=config.radius, down_factor=config.down_factor)
    names = trainable_names(student)
    for n, p in student.named_parameters():
        p.requires_grad_(n in names)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    student.train()
    student, optimizer = accelerator.prepare(student, optimizer)
    layers = _attn_layers(accelerator.unwrap_model(student), config.attn_every)
    got, want = [], []
    hooks = _capture(accelerator.unwrap_model(student), layers, got) + _capture(teacher, layers, want)
    log, began, step = [], time.perf_counter(), 0
    try:
        for step in range(1, config.steps + 1):
            b = config.batch_size
            index = torch.randint(len(latents), (b,), generator=gen)
            x0 = latents[index]
            drop = torch.rand(b, generator=gen) < config.caption_dropout
            caps = ["" if d else captions[i] for i, d in zip(index.tolist(), drop.tolist())]
            noise = torch.randn(x0.shape, generator=gen)
            sigma = torch.sigmoid(torch.randn(b, generator=gen))
            s = sigma.view(-1, 1, 1, 1)
            xt = (1 - s) * x0 + s * noise
            _, ch, h, w = x0.shape
            with torch.no_grad():
                embeds, pooled, text_ids = pipe.encode_prompt(prompt=caps, prompt_2=None, max_sequence_length=_text_len(pipe))
            kw = dict(hidden_states=FluxPipeline._pack_latents(xt, b, ch, h, w), timestep=sigma,
                      pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                      img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, xt.device, xt.dtype),
                      return_dict=False)
            if accelerator.unwrap_model(student).config.guidance_embeds:
                kw["guidance"] = torch.full((b,), 3.5)
            got.clear(), want.clear()
            with torch.no_grad():
                teacher_pred = teacher(**kw)[0]
            pred = student(**kw)[0]
            target = FluxPipeline._pack_latents(noise - x0, b, ch, h, w)
            loss_fm = F.mse_loss(pred.float(), target.float())
            loss_distill = F.mse_loss(pred.float(), teacher_pred.float())
            loss_attn = sum(F.mse_loss(a.float(), t.float()) for a, t in zip(got, want)) / max(1, len(got))
            loss = loss_fm + 0.5 * loss_distill + 0.5 * loss_attn
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step % config.log_every == 0 or step == 1:
                entry = dict(step=step, loss=float(loss), fm=float(loss_fm), distill=float(loss_distill),
                             attn=float(loss_attn), seconds=round(time.perf_counter() - began, 1))
                log.append(entry)
                accelerator.print(json.dumps(entry))
            if config.max_minutes is not None and time.perf_counter() - began > 60 * config.max_minutes:
                accelerator.print(f"stopping at step {step}: max_minutes {config.max_minutes} reached")
                break
    finally:
        for hk in hooks:
            hk.remove()
    model = accelerator.unwrap_model(student)
    state = {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if n in names}
    path = out_dir / config.filename
    from safetensors.torch import save_file

    save_file(state, str(path))
    handle.remove()
    (out_dir / "distill.json").write_text(json.dumps(dict(config=asdict(config), steps_done=step, log=log,
                                                          minutes=round((time.perf_counter() - began) / 60, 2)), indent=2))
    return path


def _text_len(pipe) -> int:
    """The text length the shapes-world models are trained and sampled with."""
    from ..models import world

    return world.MAX_SEQUENCE_LENGTH


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = DistillConfig()
    for name, value in asdict(defaults).items():
        kind = type(value) if value is not None else float
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=value)
    args = p.parse_args(argv)
    path = distill(DistillConfig(**vars(args)))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
