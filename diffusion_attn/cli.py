"""``diffusion-attn``: generate with a method on an embedded tiny model or a real checkpoint.

Method flags are generated from the method specs (``diffusion_attn.methods()``), so every registered
method and parameter appears here with no code of its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["main"]

IMAGE_FAMILIES = ("flux", "sd3", "unet-sd15", "unet-sdxl")
#: generation flags' destinations; a method parameter of the same name gets a --<method>- prefix
RESERVED = {"help", "command", "method", "model", "prompt", "height", "width", "num_frames", "steps", "guidance_scale",
            "seed", "dtype", "device", "output"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _dest(spec_name: str, param: str, reserved) -> str:
    """Method parameters share one flag across methods; a name that collides with a generation flag
    (``seed``) becomes ``--<method>-<name>``."""
    return f"{spec_name}_{param}" if param in reserved else param


def _default_text(spec, p) -> str:
    if p.required:
        return "required"
    if p.default is None and any(p.name in d for d in spec.family_defaults.values()):
        return "per model"
    return str(p.default)


def _add_method_flags(parser: argparse.ArgumentParser) -> None:
    from . import methods

    reserved = RESERVED
    seen = set()
    for spec in methods().values():
        group = parser.add_argument_group(f"{spec.name} parameters", spec.summary)
        for p in spec.params:
            name = _dest(spec.name, p.name, reserved)
            if name in seen:
                continue
            seen.add(name)
            default = _default_text(spec, p)
            extra = f" [{', '.join(map(str, p.choices))}]" if p.choices else ""
            rng = f" range {p.range[0]}..{p.range[1] if p.range[1] is not None else 'inf'}" if p.range else ""
            help_ = f"{p.help} (default: {default}{rng}){extra}"
            if p.type is bool:
                group.add_argument(_flag(name), dest=f"m_{name}", action=argparse.BooleanOptionalAction, default=None, help=help_)
            else:
                kind = {int: int, float: float}.get(p.type, str)
                group.add_argument(_flag(name), dest=f"m_{name}", type=kind, default=None, help=help_)


def _method_params(args) -> dict:
    from . import get_method

    spec = get_method(args.method)
    flags = {p.name: _dest(spec.name, p.name, RESERVED) for p in spec.params}
    given = {name: getattr(args, f"m_{flag}") for name, flag in flags.items() if getattr(args, f"m_{flag}", None) is not None}
    used = {flags[n] for n in given}
    others = [k[2:] for k, v in vars(args).items() if k.startswith("m_") and v is not None and k[2:] not in used]
    if others:
        raise ValueError(f"method {spec.name!r} does not take {', '.join(_flag(o) for o in others)}")
    return given


def _save(result, family: str, path: Path, meta: dict) -> Path:
    import numpy as np
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = result.detach().float().cpu().numpy() if hasattr(result, "detach") else np.asarray(result)
    if family in IMAGE_FAMILIES:  # (B, C, H, W) in [0, 1]
        img = Image.fromarray((arr[0].transpose(1, 2, 0).clip(0, 1) * 255).round().astype("uint8"))
        info = PngInfo()
        info.add_text("diffusion_attn", json.dumps(meta))
        path = path.with_suffix(".png")
        img.save(path, pnginfo=info)
    else:  # (B, F, C, H, W) in [0, 1]
        frames = [Image.fromarray((f.transpose(1, 2, 0).clip(0, 1) * 255).round().astype("uint8")) for f in arr[0]]
        path = path.with_suffix(".gif")
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=125, loop=0)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return path


def cmd_generate(args) -> int:
    import torch

    import diffusion_attn as da
    from .models import default_call_kwargs, load_pipeline, model_family

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    params = _method_params(args) if args.method != "none" else {}
    pipe = load_pipeline(args.model, dtype=dtype, device=args.device)
    family = model_family(pipe)
    overrides = {"num_inference_steps": args.steps}
    for key in ("height", "width", "num_frames", "guidance_scale"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    kwargs = default_call_kwargs(family, **overrides)
    if family in IMAGE_FAMILIES:
        kwargs.pop("num_frames", None)
    handle = da.apply(pipe, args.method, **params) if args.method != "none" else None
    try:
        start = time.perf_counter()
        result = pipe(prompt=args.prompt, generator=torch.Generator(args.device).manual_seed(args.seed), **kwargs)[0]
        elapsed = time.perf_counter() - start
    finally:
        resolved = handle.params if handle is not None else {}
        if handle is not None:
            handle.remove()
    meta = dict(method=args.method, params={k: list(v) if isinstance(v, tuple) else v for k, v in resolved.items()},
                model=args.model, family=family, prompt=args.prompt, seed=args.seed, steps=args.steps,
                call_kwargs={k: v for k, v in kwargs.items() if k != "output_type"}, seconds=round(elapsed, 3))
    path = _save(result, family, Path(args.output), meta)
    print(f"{args.method} on {args.model} ({family}): {elapsed:.2f} s -> {path}")
    return 0


def cmd_methods(args) -> int:
    from . import methods

    for spec in methods().values():
        print(f"{spec.name:12s} {spec.kind:28s} families: {', '.join(spec.families)}")
        print(f"{'':12s} {spec.summary}")
        for p in spec.params:
            flag = _flag(_dest(spec.name, p.name, RESERVED))
            print(f"{'':14s}{flag:20s} {p.type.__name__:6s} {_default_text(spec, p):10s} {p.help}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .models import EMBEDDED_MODELS

    parser = argparse.ArgumentParser(prog="diffusion-attn", description="Attention methods for diffusers pipelines.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate an image or video with a method applied")
    gen.add_argument("--method", default="radial", help="method name, or 'none' for stock attention (default: radial)")
    gen.add_argument("--model", default="tiny-wan", help=f"embedded model ({', '.join(EMBEDDED_MODELS)}) or a hub id / local folder")
    gen.add_argument("--prompt", default="a red fox running through fresh snow, cinematic")
    gen.add_argument("--height", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--num-frames", dest="num_frames", type=int)
    gen.add_argument("--steps", type=int, default=4)
    gen.add_argument("--guidance", dest="guidance_scale", type=float)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--output", default="outputs/result", help="output path; .png for images, .gif for videos, plus a .json sidecar")
    _add_method_flags(gen)
    gen.set_defaults(func=cmd_generate)
    lst = sub.add_parser("methods", help="list the methods, their families and parameters")
    lst.set_defaults(func=cmd_methods)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:
        print(f"diffusion-attn: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
