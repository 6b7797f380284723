"""Radial attention on Wan 2.1: a static O(n log n) spatio-temporal energy-decay block mask for video DiTs.

Runs offline in seconds on the embedded tiny Wan, trained on the shapes world (9 frames x 64 x 64 px ->
3 x 8 x 8 video tokens):

    python examples/radial.py                        # -> outputs/radial.mp4 (or .gif without an MP4 encoder)
    python examples/radial.py --model tiny-wan22     # Wan 2.2 (two experts), also tiny-hunyuanvideo

With the real checkpoint (GPU)::

    import torch
    from diffusers import AutoencoderKLWan, WanPipeline
    model_id = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    vae = AutoencoderKLWan.from_pretrained(model_id, subfolder="vae", torch_dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(model_id, vae=vae, torch_dtype=torch.bfloat16).to("cuda")
    # official Wan 2.1 defaults: decay_factor 0.2, first-frame sink, 1 dense layer, 12 dense steps (of 50)
    with da.applied(pipe, "radial"):
        video = pipe("a fox in the snow", height=480, width=832, num_frames=81).frames[0]

or ``python examples/radial.py --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --device cuda --steps 50 --dense-steps 12``.
"""

import torch

import diffusion_attn as da
from _common import call_kwargs, finish, load, parser, save


def main(argv=None):
    p = parser(__doc__.splitlines()[0], model="tiny-wan", output="outputs/radial")
    p.add_argument("--dense-steps", type=int, default=0, help="dense warm-up steps (official: 12 of 50; 0 here so the tiny run is sparse)")
    p.add_argument("--decay-factor", type=float, default=None, help="band width scale (default: per model)")
    args = finish(p.parse_args(argv))

    pipe = load(args.model, args.device)
    kwargs = call_kwargs(args.model, pipe, args.steps)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    params = {"dense_steps": args.dense_steps}
    if args.decay_factor is not None:
        params["decay_factor"] = args.decay_factor
    handle = da.apply(pipe, "radial", **params)
    try:
        print(f"applied {handle}")
        video = pipe(args.prompt, generator=generator, **kwargs).frames[0]
    finally:
        handle.remove()  # original processors back, bit-exact
    frames = [f for f in video] if not isinstance(video, list) else video
    if frames and not hasattr(frames[0], "save"):  # numpy frames in [0, 1]
        from PIL import Image

        frames = [Image.fromarray((f * 255).round().clip(0, 255).astype("uint8")) for f in frames]
    print(f"wrote {save(frames, args.output)}")


if __name__ == "__main__":
    main()
