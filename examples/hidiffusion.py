"""HiDiffusion on Stable Diffusion: MSW-MSA windowed self-attention + RAU-Net for fast high-resolution images.

Runs offline in seconds on the embedded tiny SD 1.5 UNet, trained on the shapes world at 64 x 64 px, here at
twice that (128 x 128), the regime HiDiffusion is for:

    python examples/hidiffusion.py                       # -> outputs/hidiffusion.png
    python examples/hidiffusion.py --model tiny-sdxl     # SDXL layout

With the real checkpoints (GPU)::

    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0",
                                                     torch_dtype=torch.float16).to("cuda")
    with da.applied(pipe, "hidiffusion"):                # 2048 x 2048 without duplicated subjects
        image = pipe("a lighthouse at dusk", height=2048, width=2048).images[0]
    # SD 1.5 at 1024 x 1024:
    # StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", torch_dtype=torch.float16)
    # SDXL-Turbo cannot be told from SDXL by its layout: da.apply(pipe, "hidiffusion", model_variant="sdxl-turbo")

or ``python examples/hidiffusion.py --model stabilityai/stable-diffusion-xl-base-1.0 --device cuda --steps 30``.
"""

import torch

import diffusion_attn as da
from _common import call_kwargs, finish, load, parser, save


def main(argv=None):
    p = parser(__doc__.splitlines()[0], model="tiny-sd15", output="outputs/hidiffusion")
    p.add_argument("--no-raunet", action="store_true", help="MSW-MSA only")
    p.add_argument("--size", type=int, default=None, help="height = width in px (default: 128 on tiny-sd15, "
                                                               "the model's own default otherwise)")
    args = finish(p.parse_args(argv))

    pipe = load(args.model, args.device)
    size = args.size or (128 if args.model == "tiny-sd15" else None)  # 2x its training resolution
    kwargs = call_kwargs(args.model, pipe, args.steps, **({"height": size, "width": size} if size else {}))
    generator = torch.Generator(args.device).manual_seed(args.seed)
    # seed=...: reproducible MSW-MSA shifts independent of the global RNG
    with da.applied(pipe, "hidiffusion", apply_raunet=not args.no_raunet, seed=args.seed) as handle:
        print(f"applied {handle}")
        image = pipe(args.prompt, generator=generator, **kwargs).images[0]
    print(f"wrote {save(image, args.output)}")


if __name__ == "__main__":
    main()
