"""AgentSD on Stable Diffusion: ToMe token merging + agent attention for faster SD 1.x / 2.x sampling.

Runs offline in seconds on the embedded tiny SD 1.5 UNet (trained on the shapes world at 64 x 64 px), with
the official recommended schedule (sx = sy = 4, ratio 0.4, agent_ratio 0.95 for the first 40 % of the
steps, then sx = sy = 2, agent_ratio 0.5, i.e. plain ToMe), and writes the stock image next to it:

    python examples/agent.py                     # -> outputs/agent.png and outputs/agent-stock.png
    python examples/agent.py --tome-only         # ToMe for SD alone (no agents)

With the real checkpoints (GPU)::

    import torch
    from diffusers import StableDiffusionPipeline, PNDMScheduler
    pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5",
                                                   torch_dtype=torch.float16).to("cuda")
    with da.applied(pipe, "agent"):              # the official schedule; 50 PLMS steps as the paper
        image = pipe("a photo of a golden retriever", num_inference_steps=50).images[0]
    # SD 2.1: fp32 agent attention (the official's attn_precision="fp32"; "auto" does it for the 768-v config)
    # da.apply(pipe21, "agent", attn_precision="fp32")
    # SDXL (untested by the authors): its first attention level is 2x downsampled, which max_downsample=None picks
    # da.apply(sdxl_pipe, "agent")

or ``python examples/agent.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --device cuda --steps 50``.
"""

import torch

import diffusion_attn as da
from _common import call_kwargs, finish, load, parser, save


def main(argv=None):
    p = parser(__doc__.splitlines()[0], model="tiny-sd15", output="outputs/agent")
    p.add_argument("--tome-only", action="store_true", help="ToMe for SD without agent tokens")
    args = finish(p.parse_args(argv))

    pipe = load(args.model, args.device)
    kwargs = call_kwargs(args.model, pipe, args.steps)

    def generate():
        torch.manual_seed(args.seed)  # the random ToMe destinations fork the global RNG (as tomesd)
        return pipe(args.prompt, generator=torch.Generator(args.device).manual_seed(args.seed), **kwargs).images[0]

    print(f"wrote {save(generate(), args.output + '-stock')}")
    with da.applied(pipe, "agent", agents=not args.tome_only) as handle:
        print(f"applied {handle}")
        image = generate()
    print(f"wrote {save(image, args.output)}")


if __name__ == "__main__":
    main()
