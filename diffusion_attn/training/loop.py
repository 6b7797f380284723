"""``diffusion-attn train``: the shapes-world VAEs and denoisers, trained from scratch with accelerate.

Targets (run in this order; a denoiser reads its VAE from ``<output-dir>/<vae target>/final``):

* ``image-vae`` / ``video-vae`` -- reconstruction (L1 + MSE / 4, shape pixels weighted 10x, + a small KL
  term) on shapes-world images / 5-frame windows of 9-frame clips; afterwards the latent statistics of the training pool are written into the VAE config
  (``scaling_factor``/``shift_factor`` for the image VAE, ``latents_mean``/``latents_std`` for the video VAE),
  as the real checkpoints carry theirs.
* ``tiny-flux`` / ``tiny-wan`` -- rectified flow matching: ``x_t = (1 - s) x_0 + s e`` with
  ``s = sigmoid(n), n ~ N(0, 1)`` (SD3's logit-normal), target velocity ``e - x_0``; the transformer gets the
  timestep as its pipeline passes it (Flux: ``s``; Wan: ``1000 s``).
* ``tiny-sd15`` -- DDPM epsilon prediction on SD 1.5's scaled-linear schedule (1000 steps).

Captions are replaced by ``""`` with probability 0.1 (classifier-free guidance). The denoiser's exponential
moving average (diffusers' ``EMAModel``) is what is exported. Every batch, its noise and its timesteps are
drawn from a generator seeded by ``(seed, step, process)``, so a run resumed from a checkpoint continues
exactly as the uninterrupted run would. Checkpoints (``accelerator.save_state``: model, optimizer, LR
schedule, EMA) go to ``<output-dir>/<target>/checkpoints/step-N``; ``--resume`` continues from the latest.
The same code runs on several GPUs with ``accelerate launch -m diffusion_attn.cli train ...``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models import world
from .data import shapes_pool, to_model_range

__all__ = ["TrainConfig", "TARGETS", "train", "DEFAULTS"]

#: Extra reconstruction-loss weight of shape (saturated) pixels in VAE training.
FOREGROUND_WEIGHT = 9.0

TARGETS = ("image-vae", "video-vae", "tiny-flux", "tiny-sd15", "tiny-wan")

#: Defaults per target: steps, batch size, learning rate, training-pool size. The shipped weights were
#: trained with exactly these (see docs/training.md for the times on a 2-core CPU).
DEFAULTS: dict[str, dict] = {
    "image-vae": dict(steps=2000, batch_size=16, lr=2e-3, data_size=8000),
    "video-vae": dict(steps=800, batch_size=4, lr=2e-3, data_size=1000),
    "tiny-flux": dict(steps=5000, batch_size=32, lr=5e-4, data_size=30000),
    "tiny-sd15": dict(steps=2000, batch_size=32, lr=5e-4, data_size=30000),
    "tiny-wan": dict(steps=6000, batch_size=16, lr=5e-4, data_size=8000, num_frames=5),
}


@dataclass
class TrainConfig:
    """One training run. ``steps``/``batch_size``/``lr``/``data_size`` of ``None`` take :data:`DEFAULTS`."""

    target: str
    output_dir: str = "runs"
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    data_size: int | None = None
    seed: int = 0
    resolution: int = 64
    num_frames: int | None = None  # frames of the pool's clips: 9 (video VAE), 5 (tiny-wan)
    clip_frames: int = 5  # video VAE: frames per training window (the pool's clips have num_frames)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = False
    vae: str | None = None
    init_from: str | None = None  # VAE targets: start from this trained VAE folder
    decoder_only: bool = False  # VAE targets: train the decoder only (the latent space stays as it is)
    cache_dir: str | None = None
    max_minutes: float | None = None
    stop_at_step: int | None = None  # stop (checkpoint and export) here, as an interrupted run would
    warmup_steps: int = 100
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    mixed_precision: str = "no"
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"unknown training target {self.target!r}; known: {', '.join(TARGETS)}")
        for key, value in DEFAULTS[self.target].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.num_frames is None:
            self.num_frames = 9
        for key in ("steps", "batch_size", "data_size", "checkpoint_every"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.resolution % 16:
            raise ValueError(f"resolution must be a multiple of 16 (VAE /4 and 2x2 patches), got {self.resolution}")
        if self.num_frames % 4 != 1:
            raise ValueError(f"num_frames must be 4k + 1 (the video VAE compresses time by 4), got {self.num_frames}")
        if (self.init_from or self.decoder_only) and not self.target.endswith("-vae"):
            raise ValueError("init_from / decoder_only are for the VAE targets (image-vae, video-vae)")
        if self.decoder_only and not self.init_from:
            raise ValueError("decoder_only needs init_from: a trained VAE whose encoder (latent space) is kept")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.target

    @property
    def kind(self) -> str:
        if self.target.endswith("-vae"):
            return self.target.split("-")[0]
        return world.WORLD_MODELS[self.target].vae


# ---------------------------------------------------------------------------------------------- helpers

def _generator(config: TrainConfig, step: int, process: int) -> torch.Generator:
    return torch.Generator().manual_seed((config.seed * 1_000_003 + step) * 64 + process)


def _latest_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    found = sorted((int(p.name.split("-")[1]), p) for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir())
    return (found[-1][1], found[-1][0]) if found else None


def _prune_checkpoints(run_dir: Path, keep: int) -> None:
    found = sorted((int(p.name.split("-")[1]), p) for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir())
    for _, path in found[:-keep]:
        shutil.rmtree(path)


def _pixels(config: TrainConfig, pool, index: torch.Tensor) -> torch.Tensor:
    x = to_model_range(pool[index.numpy()])
    if config.kind == "video":
        x = x.permute(0, 2, 1, 3, 4)  # (B, T, C, H, W) -> (B, C, T, H, W)
    return x.contiguous()  # a strided batch would pick other (bitwise different) conv kernels


class _StepLog:
    """JSON lines of loss and speed, every ``every`` steps, to ``<run>/log.jsonl``."""

    def __init__(self, path: Path, every: int = 50):
        self.path, self.every, self.losses, self.t0 = path, every, [], time.perf_counter()

    def add(self, step: int, loss: float, lr: float) -> float | None:
        self.losses.append(loss)
        if step % self.every:
            return None
        mean = sum(self.losses) / len(self.losses)
        rate = len(self.losses) / (time.perf_counter() - self.t0)
        with self.path.open("a") as fh:
            fh.write(json.dumps(dict(step=step, loss=mean, lr=lr, steps_per_s=rate)) + "\n")
        self.losses, self.t0 = [], time.perf_counter()
        return mean


# ---------------------------------------------------------------------------------------------- the loop

def train(config: TrainConfig) -> Path:
    """Run ``config``; returns the folder of the final export (``<output-dir>/<target>/final``)."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    run_dir = config.run_dir
    accelerator = Accelerator(mixed_precision=config.mixed_precision, project_dir=str(run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    task = _VAETask(config) if config.target.endswith("-vae") else _DenoiserTask(config, accelerator)
    model = task.model
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=0.01 if task.is_denoiser else 0.0)
    lr_schedule = get_scheduler("cosine", optimizer, num_warmup_steps=config.warmup_steps,
                                num_training_steps=config.steps)
    ema = EMAModel(model.parameters(), decay=config.ema_decay, use_ema_warmup=True) if task.is_denoiser else None
    model, optimizer, lr_schedule = accelerator.prepare(model, optimizer, lr_schedule)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    start = 0
    if config.resume:
        latest = _latest_checkpoint(run_dir)
        if latest is not None:
            accelerator.load_state(str(latest[0]))
            start = latest[1]
            accelerator.print(f"resumed from {latest[0]} (step {start})")
    if accelerator.is_main_process:
        (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    log = _StepLog(run_dir / "log.jsonl")
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=config.target,
               disable=not (config.progress and accelerator.is_local_main_process))
    began = time.perf_counter()
    step = start
    for step in range(start + 1, config.steps + 1):
        gen = _generator(config, step, accelerator.process_index)
        with accelerator.accumulate(model):
            loss = task.loss(model, gen, accelerator.device)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(accelerator.unwrap_model(model).parameters())
        mean = log.add(step, float(loss.detach()), lr_schedule.get_last_lr()[0])
        bar.update(1)
        if mean is not None:
            bar.set_postfix(loss=f"{mean:.4f}")
        if step % config.checkpoint_every == 0 and step < config.steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                accelerator.save_state(str(run_dir / "checkpoints" / f"step-{step}"))
                _prune_checkpoints(run_dir, config.keep_checkpoints)
        if config.stop_at_step is not None and step >= config.stop_at_step:
            break
        if config.max_minutes is not None and time.perf_counter() - began > 60 * config.max_minutes:
            accelerator.print(f"stopping at step {step}: --max-minutes {config.max_minutes} reached")
            break
    bar.close()
    accelerator.wait_for_everyone()
    minutes = (time.perf_counter() - began) / 60
    final = run_dir / "final"
    if accelerator.is_main_process:
        accelerator.save_state(str(run_dir / "checkpoints" / f"step-{step}"))
        _prune_checkpoints(run_dir, config.keep_checkpoints)
        unwrapped = accelerator.unwrap_model(model)
        if ema is not None:
            ema.copy_to(unwrapped.parameters())
        unwrapped.eval()
        task.export(unwrapped, final)
        (final / "training.json").write_text(json.dumps(dict(config=asdict(config), steps_done=step,
                                                             minutes_this_session=round(minutes, 2)), indent=2))
    accelerator.end_training()
    return final


# ---------------------------------------------------------------------------------------------- VAEs

def _wan_decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """``AutoencoderKLWan.decode`` without its final clamp to [-1, 1], for training.

    The clamp zeroes the gradient of every pixel that overshoots; many shapes-world colours sit at exactly
    -1 or 1 in some channel (cyan's red, orange's blue), so with it the video VAE got stuck returning
    colourless blobs (0% of the shapes intact after 1000 steps). Same frame-by-frame causal decoding as
    diffusers' ``_decode`` otherwise."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    frames = []
    for i in range(x.shape[2]):
        vae._conv_idx = [0]
        frames.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                  first_chunk=i == 0))
    vae.clear_cache()
    return torch.cat(frames, 2)

class _VAETask:
    is_denoiser = False

    def __init__(self, config: TrainConfig):
        self.config = config
        if config.init_from:
            from diffusers import AutoencoderKL, AutoencoderKLWan

            cls = AutoencoderKL if config.kind == "image" else AutoencoderKLWan
            self.model = cls.from_pretrained(config.init_from)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                self.model = world.image_vae() if config.kind == "image" else world.video_vae()
        if config.decoder_only:
            # As SD's ft-EMA / ft-MSE decoders: the encoder (and its latent statistics) stays, so denoisers
            # trained on its latents keep working with the better decoder.
            for name, module in self.model.named_children():
                if name in ("encoder", "quant_conv"):
                    module.requires_grad_(False)
        self.pool, _ = shapes_pool(config.kind, config.data_size, config.resolution, config.num_frames,
                                   cache_dir=config.cache_dir)

    def loss(self, model, gen: torch.Generator, device) -> torch.Tensor:
        index = torch.randint(len(self.pool), (self.config.batch_size,), generator=gen)
        x = _pixels(self.config, self.pool, index).to(device)
        if self.config.kind == "video" and self.config.clip_frames < x.shape[2]:
            # a random window of clip_frames (4k + 1) frames: the causal VAE codes the first frame alone and
            # then chunks of 4 (5 frames: one of each; a later chunk, decoded with the cache of an earlier
            # one, needs 9-frame windows to be learnt)
            start = int(torch.randint(x.shape[2] - self.config.clip_frames + 1, (), generator=gen))
            x = x[:, :, start:start + self.config.clip_frames].contiguous()
        posterior = model.encode(x).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=gen).to(device)
        z = posterior.mean + posterior.std * eps
        recon = model.decode(z).sample if self.config.kind == "image" else _wan_decode_unclamped(model, z)
        # The shapes cover ~10% of the pixels: unweighted, the VAE first learns the backgrounds and loses
        # small shapes (after 500 steps the video VAE returned backgrounds only). Saturated pixels are the
        # shapes (every palette colour has max - min >= 0.75 of the range, every background <= 0.15).
        weight = 1.0 + FOREGROUND_WEIGHT * (x.amax(1, keepdim=True) - x.amin(1, keepdim=True) > 0.6).float()
        err = (recon - x).abs() + 0.25 * (recon - x).square()
        return (weight * err).mean() / weight.mean() + 1e-5 * posterior.kl().mean() / z[0].numel()

    @torch.no_grad()
    def export(self, model, final: Path) -> None:
        """Write the latent statistics of (up to) 512 pool samples into the config, then save (a
        decoder-only run keeps its starting VAE's statistics: the encoder did not change)."""
        if self.config.decoder_only:
            model.save_pretrained(str(final), safe_serialization=True)
            return
        n = min(len(self.pool), 512)
        zs = []
        for i in range(0, n, 32):
            x = _pixels(self.config, self.pool, torch.arange(i, min(i + 32, n)))
            if self.config.kind == "video":
                x = x[:, :, :self.config.clip_frames].contiguous()  # what it was trained on
            zs.append(model.encode(x).latent_dist.mean)
        z = torch.cat(zs)
        if self.config.kind == "image":
            model.register_to_config(shift_factor=round(float(z.mean()), 5),
                                     scaling_factor=round(float(1.0 / z.std()), 5))
        else:
            dims = (0, 2, 3, 4)
            model.register_to_config(latents_mean=[round(float(v), 5) for v in z.mean(dims)],
                                     latents_std=[round(float(v), 5) for v in z.std(dims)])
        model.save_pretrained(str(final), safe_serialization=True)


# ---------------------------------------------------------------------------------------------- denoisers

class _DenoiserTask:
    is_denoiser = True

    def __init__(self, config: TrainConfig, accelerator):
        from diffusers import AutoencoderKL, AutoencoderKLWan

        self.config = config
        self.spec = world.WORLD_MODELS[config.target]
        vae_dir = Path(config.vae or Path(config.output_dir) / f"{self.spec.vae}-vae" / "final")
        if not (vae_dir / "config.json").is_file():
            raise FileNotFoundError(f"{config.target} needs its trained VAE at {vae_dir}: run "
                                    f"`diffusion-attn train {self.spec.vae}-vae` first, or pass --vae PATH")
        vae_cls = AutoencoderKL if self.spec.vae == "image" else AutoencoderKLWan
        vae = vae_cls.from_pretrained(str(vae_dir)).eval().requires_grad_(False)
        self.pipe = world.build_untrained(config.target, vae=vae, seed=config.seed)
        for name, component in self.pipe.components.items():
            if isinstance(component, torch.nn.Module) and name not in ("transformer", "unet"):
                component.to(accelerator.device).requires_grad_(False)
        self.model = self.pipe.transformer if hasattr(self.pipe, "transformer") else self.pipe.unet
        self.latents, self.captions = self._encode_pool(vae, accelerator)
        if self.spec.objective == "epsilon":
            from diffusers import DDPMScheduler

            self.noise_schedule = DDPMScheduler.from_config(self.pipe.scheduler.config)

    @torch.no_grad()
    def _encode_pool(self, vae, accelerator) -> tuple[torch.Tensor, list[str]]:
        """The training pool's VAE latents (posterior means), normalised as the pipeline expects; cached."""
        c = self.config
        pool, captions = shapes_pool(self.spec.vae, c.data_size, c.resolution, c.num_frames, cache_dir=c.cache_dir)
        stamp = json.dumps(vae.config, sort_keys=True, default=str) + str(sum(float(p.sum()) for p in vae.parameters()))
        import hashlib

        key = hashlib.sha1(f"{stamp}-{len(pool)}-{c.resolution}-{c.num_frames}".encode()).hexdigest()[:12]
        cache = Path(c.cache_dir) / f"latents-{self.spec.vae}-{key}.pt" if c.cache_dir else None
        if cache is not None and cache.is_file():
            z = torch.load(cache)
        else:
            out = []
            for i in range(0, len(pool), 64):
                x = _pixels(c, pool, torch.arange(i, min(i + 64, len(pool)))).to(accelerator.device)
                out.append(vae.encode(x).latent_dist.mean.cpu())
            z = torch.cat(out)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                torch.save(z, cache)
        cfg = vae.config
        if self.spec.family == "flux":
            z = (z - cfg.shift_factor) * cfg.scaling_factor
        elif self.spec.family == "unet-sd15":
            z = z * cfg.scaling_factor
        else:
            mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
            std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
            z = (z - mean) / std
        return z, captions

    @torch.no_grad()
    def _text(self, captions: list[str], device):
        pipe, family = self.pipe, self.spec.family
        if family == "flux":
            embeds, pooled, text_ids = pipe.encode_prompt(prompt=captions, prompt_2=None, device=device,
                                                          max_sequence_length=world.MAX_SEQUENCE_LENGTH)
            return dict(encoder_hidden_states=embeds, pooled_projections=pooled, txt_ids=text_ids)
        if family == "unet-sd15":
            embeds, _ = pipe.encode_prompt(captions, device, 1, False)
            return dict(encoder_hidden_states=embeds)
        embeds, _ = pipe.encode_prompt(prompt=captions, do_classifier_free_guidance=False,
                                       max_sequence_length=world.MAX_SEQUENCE_LENGTH, device=device)
        return dict(encoder_hidden_states=embeds)

    def loss(self, model, gen: torch.Generator, device) -> torch.Tensor:
        c, family = self.config, self.spec.family
        index = torch.randint(len(self.latents), (c.batch_size,), generator=gen)
        x0 = self.latents[index].to(device)
        drop = torch.rand(c.batch_size, generator=gen) < c.caption_dropout
        captions = ["" if d else self.captions[i] for i, d in zip(index.tolist(), drop.tolist())]
        noise = torch.randn(x0.shape, generator=gen).to(device)
        text = self._text(captions, device)
        batch = x0.shape[0]
        if self.spec.objective == "epsilon":
            t = torch.randint(self.noise_schedule.config.num_train_timesteps, (batch,), generator=gen).to(device)
            xt = self.noise_schedule.add_noise(x0, noise, t)
            pred = model(xt, t, encoder_hidden_states=text["encoder_hidden_states"]).sample
            return F.mse_loss(pred.float(), noise.float())
        sigma = torch.sigmoid(torch.randn(batch, generator=gen)).to(device)
        s = sigma.view(-1, *([1] * (x0.dim() - 1)))
        xt = (1 - s) * x0 + s * noise
        target = noise - x0
        if family == "flux":
            from diffusers import FluxPipeline

            _, ch, h, w = x0.shape
            packed = FluxPipeline._pack_latents(xt, batch, ch, h, w)
            img_ids = FluxPipeline._prepare_latent_image_ids(batch, h // 2, w // 2, device, xt.dtype)
            pred = model(hidden_states=packed, timestep=sigma, pooled_projections=text["pooled_projections"],
                         encoder_hidden_states=text["encoder_hidden_states"], txt_ids=text["txt_ids"],
                         img_ids=img_ids, return_dict=False)[0]
            return F.mse_loss(pred.float(), FluxPipeline._pack_latents(target, batch, ch, h, w).float())
        pred = model(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=text["encoder_hidden_states"],
                     return_dict=False)[0]
        return F.mse_loss(pred.float(), target.float())

    @torch.no_grad()
    def export(self, model, final: Path) -> None:
        """The whole pipeline in fp16 safetensors, ``save_pretrained`` layout (what the package ships)."""
        pipe = self.pipe
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                torch.nn.Module.to(component, torch.float16)
        pipe.save_pretrained(str(final), safe_serialization=True)
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                torch.nn.Module.to(component, torch.float32)
