"""CLEAR on Flux: circular local attention (radius r, optional pooled keys) with distilled attention weights.

Runs offline in seconds on the embedded tiny Flux, trained on the shapes world (64 x 64 px -> 8 x 8 image
tokens + 32 text tokens). At that grid radius 3 is sparse (an interior image query sees 25 of 64 image
tokens; radius 2: 9); radius 10 covers the grid (dense), radius 8 nearly (98 % of the pairs). Without
distilled weights quality drops (the method's premise); ``python -m diffusion_attn.training.clear``
distils them for the tiny model (``benchmarks/results/clear.md``):

    python examples/clear.py                                   # -> outputs/clear.png, radius 3
    python examples/clear.py --radius 2 --down-factor 2        # + pooled keys (trainable spatial_weight)
    python examples/clear.py --radius 2 --weights /work/runs/clear/tiny-flux-r2/clear_local_2.safetensors

With the real checkpoint (GPU; FLUX.1-dev, released weights from the Hub repository Huage001/CLEAR,
radius 8/16/32 without down-sampling or 8/16 with down_factor 4)::

    import torch
    from diffusers import FluxPipeline
    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16).to("cuda")
    # loads Huage001/CLEAR clear_local_16.safetensors into to_q/k/v/out; remove() restores the originals
    with da.applied(pipe, "clear", radius=16, weights="Huage001/CLEAR"):
        image = pipe("A Mickey is eating a pie", height=1024, width=1024, guidance_scale=3.5,
                     num_inference_steps=20, max_sequence_length=512).images[0]
    # high resolution (official: img2img at 2048 x 4096, strength 0.7): add proportional_attention=True,
    # ntk_factor=10 to the apply call, with FluxImg2ImgPipeline and use_dynamic_shifting=False

or ``python examples/clear.py --model black-forest-labs/FLUX.1-dev --device cuda --steps 20 --radius 16
--weights Huage001/CLEAR``.
"""

import torch

import diffusion_attn as da
from _common import call_kwargs, finish, load, parser, save


def main(argv=None):
    p = parser(__doc__.splitlines()[0], model="tiny-flux", output="outputs/clear")
    p.add_argument("--radius", type=int, default=3, help="circle radius in tokens (official: 8, 16, 32 at 1024 px)")
    p.add_argument("--down-factor", type=int, default=1, help="pooled keys every f x f tokens (official: 1 or 4)")
    p.add_argument("--weights", default=None, help="distilled weights: .safetensors file, folder or Hub repo id")
    args = finish(p.parse_args(argv))

    pipe = load(args.model, args.device)
    kwargs = call_kwargs(args.model, pipe, args.steps)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    handle = da.apply(pipe, "clear", radius=args.radius, down_factor=args.down_factor, weights=args.weights)
    try:
        print(f"applied {handle}")
        image = pipe(args.prompt, generator=generator, **kwargs).images[0]
    finally:
        handle.remove()  # original processors and attention weights back, bit-exact
    print(f"wrote {save(image, args.output)}")


if __name__ == "__main__":
    main()
