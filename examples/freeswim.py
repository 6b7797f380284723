"""FreeSwim on Wan 2.1: a native-resolution video, upscaled and refined at the target size with inward
sliding-window attention and the full branch's cross-attention (coarse-to-fine, training-free).

Runs offline in seconds on the embedded tiny Wan, trained on the shapes world at 5 frames x 64 x 64 px:
here its "native" size is 32 x 32 px (2 x 2 tokens, a 3 x 3-token window) and the target 64 x 64 px
(4 x 4 tokens), so the window is shifted inward at every border:

    python examples/freeswim.py                      # -> outputs/freeswim.mp4 (or .gif), outputs/freeswim-base.*
    python examples/freeswim.py --mode cache --cache-steps 2
    python examples/freeswim.py --model tiny-wan-random --native 64x96 --target 128x192

With the real checkpoint (the official recipe: 480 x 832 -> 1088 x 1920, 81 frames, GPU)::

    import torch
    from diffusers import AutoencoderKLWan, WanPipeline
    from diffusion_attn.pipelines import freeswim_generate
    model_id = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    vae = AutoencoderKLWan.from_pretrained(model_id, subfolder="vae", torch_dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(model_id, vae=vae, torch_dtype=torch.bfloat16).to("cuda")
    pipe.vae.enable_tiling()
    out = freeswim_generate(pipe, "an elderly man with a thick gray beard, close-up",
                            native_size=(480, 832), target_size=(1088, 1920), num_frames=81,
                            mode="cache", cache_steps=5, backend="flex")   # or backend="natten"
    video = out.frames[0]

(14B models: ``native_size=(720, 1280)``.) To install FreeSwim on a video-to-video pipeline yourself:
``da.apply(v2v_pipe, "freeswim", native_height=480, native_width=832, mode="cache")``.
"""

import torch

from _common import finish, load, parser, save
from diffusion_attn.pipelines import freeswim_generate


def _size(text):
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def main(argv=None):
    p = parser(__doc__.splitlines()[0], model="tiny-wan", output="outputs/freeswim")
    p.add_argument("--native", type=_size, default=None, help="native size HxW px (default: 32x32 for the tiny models, "
                                                               "480x832 for real checkpoints)")
    p.add_argument("--target", type=_size, default=None, help="target size HxW px (default: 64x64 tiny, 1088x1920 real)")
    p.add_argument("--frames", type=int, default=None, help="default: 5 (tiny), 81 (real)")
    p.add_argument("--mode", choices=("nocache", "cache"), default="nocache")
    p.add_argument("--cache-steps", type=int, default=None, help="cache mode: a guide step every N steps (default 2)")
    args = finish(p.parse_args(argv))
    tiny = args.model.startswith("tiny-")
    native = args.native or ((32, 32) if tiny else (480, 832))
    target = args.target or ((64, 64) if tiny else (1088, 1920))
    frames = args.frames or (5 if tiny else 81)

    pipe = load(args.model, args.device)
    extra = dict(max_sequence_length=32) if tiny else {}
    out = freeswim_generate(
        pipe, args.prompt, native_size=native, target_size=target, num_frames=frames,
        num_inference_steps=args.steps, generator=torch.Generator(args.device).manual_seed(args.seed),
        mode=args.mode, cache_steps=args.cache_steps, output_type="pil", **extra)
    print(f"freeswim: {native[0]}x{native[1]} -> {target[0]}x{target[1]}, {frames} frames, mode={args.mode}")
    print(f"applied {out.applied} (for the refinement)")
    base = [_to_pil(f) for f in out.base[0]]
    print(f"wrote {save(base, args.output + '-base')} (native, before refinement)")
    print(f"wrote {save(list(out.frames[0]), args.output)}")


def _to_pil(frame):
    from PIL import Image

    return Image.fromarray((frame.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy())


if __name__ == "__main__":
    main()
