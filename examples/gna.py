"""Generalized Neighborhood Attention (GNA) on Flux: sliding / strided / blocked windows over the token grid.

Runs offline in seconds on the embedded tiny Flux, trained on the shapes world (64 x 64 px -> 8 x 8 image tokens):

    python examples/gna.py                         # -> outputs/gna.png
    python examples/gna.py --model tiny-sd3        # SD3, also Wan / HunyuanVideo (3-D windows)

With the real checkpoint (GPU)::

    import torch
    from diffusers import FluxPipeline
    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16).to("cuda")
    # 1024 x 1024 px -> 64 x 64 tokens; the GNA paper's FLUX.1-dev 4K setting (256 x 256 tokens) is
    # window=(80, 80), stride=(16, 16). Here: 32 x 32 windows moving in steps of 16.
    with da.applied(pipe, "gna", window=(32, 32), stride=(16, 16)):
        image = pipe("a lighthouse at dusk", height=1024, width=1024).images[0]

or ``python examples/gna.py --model black-forest-labs/FLUX.1-dev --device cuda --window 32,32 --stride 16,16``.
"""

import torch

import diffusion_attn as da
from _common import call_kwargs, finish, load, parser, save


def main(argv=None):
    p = parser(__doc__.splitlines()[0], model="tiny-flux", output="outputs/gna")
    p.add_argument("--window", default="4,4", help="window per axis (tiny Flux grid: 8 x 8 tokens)")
    p.add_argument("--stride", default="2,2", help="stride per axis: 1 sliding, = window blocked")
    args = finish(p.parse_args(argv))

    pipe = load(args.model, args.device)
    kwargs = call_kwargs(args.model, pipe, args.steps)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    with da.applied(pipe, "gna", window=args.window, stride=args.stride) as handle:
        print(f"applied {handle}")
        out = pipe(args.prompt, generator=generator, **kwargs)
    # the pipeline is stock again here
    result = out.frames[0] if hasattr(out, "frames") else out.images[0]
    print(f"wrote {save(result, args.output)}")


if __name__ == "__main__":
    main()
