"""``diffusion-attn``: generate, compare and inspect attention methods from the command line.

Commands: ``generate`` (one run, image or video + JSON sidecar), ``compare`` (dense vs method, same seed,
side by side), ``mask`` (picture of a method's attention pattern for a token layout), ``simulate`` (the
(query tile, key tile) pairs a block-sparse kernel visits and its predicted speedup), ``methods`` (the
registered methods and their flags), ``ui`` (the Gradio app), ``export-comfy`` (a ComfyUI custom-node
folder). Flag names follow ``diffusers-cli run`` where they overlap (``--model/-m``, ``--dtype``,
``--attention-backend``, ``--output/-o``).

Method flags are generated from the method specs (``diffusion_attn.methods()``), so every registered
method and parameter appears here with no code of its own. Errors exit with status 2 and one line on
stderr (``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path

__all__ = ["main", "build_parser", "parse_grid"]

#: generation / command flags' destinations; a method parameter of the same name gets a --<method>- prefix
RESERVED = {"help", "command", "method", "model", "prompt", "height", "width", "num_frames", "steps", "guidance_scale",
            "seed", "dtype", "device", "output", "attention_backend", "progress", "warmup", "grid", "text",
            "text_position", "family", "max_side", "host", "port", "share", "debug", "json", "directory", "q_tile", "kv_tile",
            "place_layers", "place_steps", "place_branches", "place_heads"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _dest(spec_name: str, param: str, reserved=RESERVED) -> str:
    """Method parameters share one flag across methods; a name that collides with a command flag
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

    seen = set()
    for spec in methods().values():
        group = parser.add_argument_group(f"{spec.name} parameters", spec.summary)
        for p in spec.params:
            name = _dest(spec.name, p.name)
            if name in seen:
                continue
            seen.add(name)
            default = _default_text(spec, p)
            extra = f" [{', '.join(map(str, p.choices))}]" if p.choices else ""
            rng = f" range {p.range[0]}..{p.range[1] if p.range[1] is not None else 'inf'}" if p.range else ""
            help_ = f"{p.help} (default: {default}{rng}){extra}"
            help_ = help_.replace("%", "%%")
            if p.type is bool:
                group.add_argument(_flag(name), dest=f"m_{name}", action=argparse.BooleanOptionalAction, default=None, help=help_)
            else:  # numbers parse here; tuples and input types (boxes, heads, prompts, paths) in Param.validate
                kind = {int: int, float: float}.get(p.type, str)
                group.add_argument(_flag(name), dest=f"m_{name}", type=kind, default=None, metavar=p.metavar, help=help_)


def _given_method_flags(args) -> list[str]:
    return [_flag(k[2:]) for k, v in vars(args).items() if k.startswith("m_") and v is not None]


def _method_params(args) -> dict:
    """The method flags given on the command line, as the method's parameter names; an error for flags
    of other methods (and for any method flag with ``--method none``)."""
    from . import get_method

    if args.method == "none":
        given = _given_method_flags(args)
        if given:
            raise ValueError(f"--method none (stock attention) takes no method flags, got {', '.join(given)}")
        return {}
    spec = get_method(args.method)
    flags = {p.name: _dest(spec.name, p.name) for p in spec.params}
    given = {name: getattr(args, f"m_{flag}") for name, flag in flags.items() if getattr(args, f"m_{flag}", None) is not None}
    used = {flags[n] for n in given}
    others = [k[2:] for k, v in vars(args).items() if k.startswith("m_") and v is not None and k[2:] not in used]
    if others:
        raise ValueError(f"method {spec.name!r} does not take {', '.join(_flag(o) for o in others)}")
    config = spec.config.from_kwargs(**given)  # bad values fail here, before anything loads
    return {name: config[name] for name in given}


def parse_grid(text: str) -> tuple[int, ...]:
    """``"9x30x52"``, ``"64x64"`` or ``"9,30,52"`` -> a tuple of 1 to 3 positive ints."""
    parts = [p for p in re.split(r"[x,\s]+", str(text).strip().lower()) if p]
    try:
        grid = tuple(int(p) for p in parts)
    except ValueError:
        grid = ()
    if not 1 <= len(grid) <= 3 or any(g < 1 for g in grid):
        raise ValueError(f"--grid must be 1 to 3 positive sizes like 9x30x52 (frames x height x width) or 64x64, got {text!r}")
    return grid


# ------------------------------------------------------------------------------------------------------
# Progress
# ------------------------------------------------------------------------------------------------------


class _Progress:
    """A tqdm bar driven by the runner's ``callback(step_index, total)``."""

    def __init__(self, desc: str, enabled: bool):
        self.desc, self.enabled, self.bar = desc, enabled, None

    def __call__(self, i: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="step", file=sys.stderr)
        self.bar.update(i + 1 - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _placement(args):
    """The ``--place-*`` placement (see :meth:`diffusion_attn.placement.Placement.parse`), or None; checked
    before anything loads."""
    from .placement import Placement

    placement = Placement.parse(args.place_layers, args.place_steps, args.place_branches, args.place_heads)
    if placement is None:
        return None
    if args.method == "none":
        raise ValueError("--method none (stock attention) takes no placement flags (--place-layers, --place-steps, "
                         "--place-branches, --place-heads)")
    both = [f for f in _given_method_flags(args) if f.endswith(("dense-layers", "dense-steps"))]
    if both:
        raise ValueError(f"give the placement either as --place-* flags or as {', '.join(both)}, not both")
    return placement


def _generation_kwargs(args) -> dict:
    from .models import default_prompt

    return dict(prompt=args.prompt if args.prompt is not None else default_prompt(args.model), height=args.height, width=args.width, num_frames=args.num_frames, steps=args.steps,
                guidance_scale=args.guidance_scale, seed=args.seed, dtype=args.dtype, device=args.device,
                attention_backend=args.attention_backend, placement=_placement(args))


# ------------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------------


def _check_output(args) -> None:
    from .runner import check_output

    check_output(args.output)


def cmd_generate(args) -> int:
    from .runner import check_device, generate, save

    params = _method_params(args)
    check_device(args.device)
    _check_output(args)
    kwargs = _generation_kwargs(args)
    model, main_process = args.model, True
    parallel = bool(getattr(args, "context_parallel", None))
    progress, ok = None, False
    try:
        if parallel:
            from .parallel import is_main_process, parallel_pipeline

            model, kwargs["device"] = parallel_pipeline(args.model, args.context_parallel, args.cp_degree, dtype=args.dtype,
                                                        device=args.device, ulysses_anything=args.ulysses_anything)
            main_process = is_main_process()
        progress = _Progress(f"{args.method} on {args.model}", args.progress and main_process)
        result = generate(model, args.method, params, callback=progress, **kwargs)
        ok = True
    finally:
        if progress is not None:
            progress.close()
        if parallel:
            from .parallel import shutdown

            shutdown(wait=ok)  # no barrier on an error: the other ranks may never reach it
    if not main_process:  # every rank computed the same output; rank 0 writes it
        return 0
    path = save(result, args.output)
    print(f"{result.method} on {args.model} ({result.family}): {result.seconds:.2f} s, "
          f"{result.seconds_per_step:.3f} s/step -> {path} (+ {path.with_suffix('.json').name})")
    return 0


def cmd_compare(args) -> int:
    from .compare import compare, save
    from .runner import check_device

    if args.method == "none":
        raise ValueError("compare needs a method other than 'none' (the dense run is always made)")
    params = _method_params(args)
    check_device(args.device)
    _check_output(args)
    progress = _Progress(f"dense + {args.method} on {args.model}", args.progress)
    try:
        result = compare(args.model, args.method, params, callback=progress, warmup=args.warmup, **_generation_kwargs(args))
    finally:
        progress.close()
    path = save(result, args.output)
    from .compare import _score_text

    psnr = "identical" if result.psnr == float("inf") else f"PSNR {result.psnr:.2f} dB"
    if result.ssim is not None and result.psnr != float("inf"):
        psnr += f", SSIM {result.ssim:.3f}"
    elif result.ssim is None:
        psnr += ' (SSIM: pip install "diffusion-attn[quality]")'
    print(f"dense {result.dense.seconds_per_step:.3f} s/step, {result.method.method} {result.method.seconds_per_step:.3f} s/step "
          f"(speed {result.speedup:.2f}x); |diff| mean {result.mean_abs_diff:.3f}, max {result.max_abs_diff:.0f} (0-255), "
          f"{psnr} -> {path} (+ {path.with_suffix('.json').name})")
    if result.scores is not None:
        print(_score_text(result.scores))
    else:
        unparsed = result.meta.get("scorer_unparsed") or []
        print("scorer: the prompt names no shape of the shapes world" + (f" (not understood: {', '.join(unparsed)})" if unparsed else "")
              + "; no object scores")
    return 0


def cmd_mask(args) -> int:
    from .layout import TokenLayout
    from .viz import render_pattern

    params = _method_params(args)
    layout = TokenLayout(parse_grid(args.grid), args.text, args.text_position)
    image = render_pattern(args.method, layout, family=args.family, max_side=args.max_side, **params)
    path = Path(args.output)
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    d = image.info["density"]
    print(f"{args.method} on {layout.describe()} ({layout.num_tokens:,} tokens): density {d:.6f} "
          f"({100 * d:.2f}% of (query, key) pairs) -> {path}")
    return 0


def _tile_list(values, flag: str) -> list:
    """``--q-tile 64,128 --q-tile 1x8x16`` -> [64, 128, (1, 8, 16)] (commas and repeats give several)."""
    from .kernels.simulate import parse_tile

    out = []
    for value in values:
        for item in str(value).split(","):
            try:
                tile = parse_tile(item)
            except ValueError:
                raise ValueError(f"{flag} takes tile sizes like 128 or per-axis sizes like 1x8x16 (several separated by "
                                 f"commas), got {value!r}") from None
            if tile not in out:
                out.append(tile)
    return out


def _tile_pairs(args) -> list[tuple]:
    """(q tile, kv tile) settings: each q tile with itself when --kv-tile is not given, else with every
    --kv-tile of the same kind (sequence ints / per-axis sizes)."""
    q_tiles = _tile_list(args.q_tile or ["128"], "--q-tile")
    if not args.kv_tile:
        return [(t, t) for t in q_tiles]
    kv_tiles = _tile_list(args.kv_tile, "--kv-tile")
    pairs = [(q, k) for q in q_tiles for k in kv_tiles if isinstance(q, int) == isinstance(k, int)]
    for tile, flag, used in [(q, "--q-tile", {p[0] for p in pairs}) for q in q_tiles] + \
                            [(k, "--kv-tile", {p[1] for p in pairs}) for k in kv_tiles]:
        if tile not in used:
            other = "--kv-tile" if flag == "--q-tile" else "--q-tile"
            kind = "a token count (sequence order)" if isinstance(tile, int) else "per-axis sizes (tiled order)"
            raise ValueError(f"{flag} {_tile_text(tile)} is {kind} but no {other} is; give both in the same form")
    return pairs


def _tile_text(tile) -> str:
    return str(tile) if isinstance(tile, int) else "x".join(map(str, tile))


def cmd_simulate(args) -> int:
    import inspect

    from .api import method_pattern
    from .kernels.simulate import simulate
    from .layout import TokenLayout

    params = _method_params(args)
    layout = TokenLayout(parse_grid(args.grid), args.text, args.text_position)
    pairs = _tile_pairs(args)
    spec, resolved, pattern = method_pattern(args.method, layout, family=args.family, **params)
    shown = [n for n, p in inspect.signature(spec.grid_pattern).parameters.items()
             if n != "layout" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    pattern_params = {n: resolved[n] for n in shown if n in resolved}
    used = args.family or spec.families[0]  # the family whose defaults method_pattern resolved
    family = used if used in spec.family_defaults else args.family
    results = [simulate(pattern, layout, q_tile=q, kv_tile=k) for q, k in pairs]
    density = results[0].density
    if args.json:
        print(json.dumps({"method": spec.name, "family": family, "params": pattern_params,
                          "layout": results[0].to_dict()["layout"], "density": density,
                          "ideal_speedup": results[0].ideal_speedup, "results": [r.to_dict() for r in results]},
                         indent=2, default=str))
        return 0
    described = ", ".join(f"{k}={v[0] if isinstance(v, tuple) and len(v) == 1 else v}" for k, v in pattern_params.items())
    print(f"{spec.name} on {layout.describe()} ({layout.num_tokens:,} tokens)"
          + (f", {family} defaults" if family in spec.family_defaults else "") + (f": {described}" if described else ""))
    print(f"density {density:.6f} ({100 * density:.2f}% of (query, key) pairs, text dense): "
          f"ideal speedup 1/density = {results[0].ideal_speedup:.2f}x")
    rows = [("order", "q tile", "kv tile", "tiles q x kv", "visited", "full", "partial", "wasted", "speedup", "of ideal")]
    for r in results:
        rows.append((r.order, _tile_text(r.q_tile), _tile_text(r.kv_tile), f"{r.q_tiles:,} x {r.kv_tiles:,}",
                     f"{r.visited_tiles:,} ({100 * r.tile_density:.1f}%)", f"{r.full_tiles:,}", f"{r.partial_tiles:,}",
                     f"{100 * r.wasted:.1f}%", f"{r.speedup:.2f}x", f"{100 * r.fraction_of_ideal:.0f}%"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    print("visited: tile pairs with an allowed pair (full: all allowed, no mask); wasted: masked pairs computed in them;\n"
          "speedup: all / visited tile pairs, the upper bound over dense attention with the same tiles")
    return 0


def cmd_methods(args) -> int:
    from . import methods

    if args.json:
        print(json.dumps({name: spec.describe() for name, spec in methods().items()}, indent=2, default=str))
        return 0
    for spec in methods().values():
        print(f"{spec.name:12s} {spec.kind:28s} families: {', '.join(spec.families)}")
        print(f"{'':12s} {spec.summary}")
        for p in spec.params:
            flag = _flag(_dest(spec.name, p.name))
            print(f"{'':14s}{flag:20s} {p.type.__name__:6s} {p.role:9s} {_default_text(spec, p):10s} {p.help}")
    return 0


def cmd_ui(args) -> int:
    try:
        from .ui import launch
    except ImportError as e:
        raise ImportError(f"the UI needs Gradio: pip install 'diffusion-attn[ui]' ({e})") from e
    launch(args.host, args.port, args.share)
    return 0


def cmd_export_comfy(args) -> int:
    try:
        from .comfy.export import export_node_folder
    except ImportError as e:
        raise ImportError(f"the ComfyUI exporter is not available ({e})") from e
    written = export_node_folder(args.directory)
    if written is None:
        print(f"wrote the ComfyUI node folder {args.directory}")
    elif isinstance(written, (str, Path)):
        print(f"wrote {written}")
    else:
        items = list(written)
        for item in items:
            print(item)
        print(f"wrote {len(items)} files to {args.directory}")
    return 0


# ------------------------------------------------------------------------------------------------------
# Parser
# ------------------------------------------------------------------------------------------------------


def _add_generation_args(p: argparse.ArgumentParser, output_default: str, output_help: str) -> None:
    from .models import EMBEDDED_MODELS
    from .runner import DTYPES

    p.add_argument("--method", default="radial", help="method name (see `diffusion-attn methods`), or 'none' for stock attention (default: radial)")
    p.add_argument("--model", "-m", default="tiny-wan",
                   help=f"embedded tiny model ({', '.join(EMBEDDED_MODELS)}) or a Hugging Face Hub id / local diffusers folder (default: tiny-wan)")
    p.add_argument("--prompt", help="the prompt (default: the trained tiny model's example, e.g. "
                                    "'a red circle moving right and a blue square moving down' for tiny-wan)")
    p.add_argument("--height", type=int, help="pixels (default: the model's small default)")
    p.add_argument("--width", type=int, help="pixels (default: the model's small default)")
    p.add_argument("--num-frames", dest="num_frames", type=int, help="frames, video models only")
    p.add_argument("--steps", type=int, help="denoising steps (default: the trained tiny models' own, 20-25; else 4)")
    p.add_argument("--guidance", "--guidance-scale", dest="guidance_scale", type=float, help="guidance scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="weights dtype (default: float32)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--attention-backend", dest="attention_backend", default=None, metavar="NAME",
                   help="diffusers attention dispatcher backend for the dense layers and stock processors "
                        "(native, flex, flash, sage, xformers, ...; transformer models only)")
    where = p.add_argument_group("placement (instead of the method's dense_layers / dense_steps)")
    where.add_argument("--place-layers", dest="place_layers", metavar="SEL", help="layers the method acts on: indices, ranges a-b and kinds "
                       "(double, single, down, mid, up, block), e.g. single or 0-3,single")
    where.add_argument("--place-steps", dest="place_steps", metavar="START,END",
                       help="steps the method acts on: indices (2,10) or fractions of the schedule (0.25,1.0); END may be empty")
    where.add_argument("--place-branches", dest="place_branches", metavar="NAMES", help="guidance branches: cond, uncond, perturbed, reference")
    where.add_argument("--place-heads", dest="place_heads", metavar="H", help="attention heads the method acts on, e.g. 0,3")
    p.add_argument("--output", "-o", default=output_default, help=output_help)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar on stderr (default: on)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from .training import TARGETS

    p.add_argument("target", choices=TARGETS + ("all",), help="what to train; 'all' trains everything in order")
    p.add_argument("--output-dir", dest="output_dir", default="runs", help="run folders go to OUTPUT_DIR/TARGET (default: runs)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the target's, see docs/training.md)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="batch size per process (default: the target's)")
    p.add_argument("--lr", type=float, help="peak learning rate, cosine decay after 100 warm-up steps (default: the target's)")
    p.add_argument("--data-size", dest="data_size", type=int, help="training pool size (seeds 0..N-1; default: the target's)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and batch seed (default: 0)")
    p.add_argument("--vae", help="trained VAE folder for a denoiser (default: OUTPUT_DIR/image-vae/final or video-vae/final)")
    p.add_argument("--init-from", dest="init_from", help="VAE targets: start from this trained VAE folder")
    p.add_argument("--decoder-only", dest="decoder_only", action="store_true",
                   help="VAE targets: fine-tune the decoder only, keeping the encoder (the denoisers' latent space)")
    p.add_argument("--cache-dir", dest="cache_dir", help="cache the generated pool and its latents here")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, default=500, help="steps between checkpoints (default: 500)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUTPUT_DIR/TARGET/checkpoints")
    p.add_argument("--max-minutes", dest="max_minutes", type=float, help="stop (and export) after this many minutes")
    p.add_argument("--stop-at-step", dest="stop_at_step", type=int,
                   help="stop (checkpoint and export) at this step, keeping the learning-rate schedule of --steps")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--mixed-precision", dest="mixed_precision", choices=("no", "fp16", "bf16"), default="no",
                   help="accelerate mixed precision (default: no)")
    p.add_argument("--install", action="store_true",
                   help="copy the trained pipeline into the package's weights folder (what `--model tiny-flux` etc. load)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar (default: on)")


def cmd_train(args) -> int:
    import shutil

    import torch

    from .models import world
    from .training import TARGETS, TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    targets = list(TARGETS) if args.target == "all" else [args.target]
    configs = [TrainConfig(t, output_dir=args.output_dir, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                           data_size=args.data_size, seed=args.seed, vae=args.vae if len(targets) == 1 else None,
                           init_from=args.init_from if len(targets) == 1 else None,
                           decoder_only=args.decoder_only and len(targets) == 1,
                           cache_dir=args.cache_dir, checkpoint_every=args.checkpoint_every, resume=args.resume,
                           max_minutes=args.max_minutes, stop_at_step=args.stop_at_step,
                           mixed_precision=args.mixed_precision, progress=args.progress)
               for t in targets]  # all checked before any training starts
    for config in configs:
        final = train(config)
        print(f"{config.target}: wrote {final}")
        if args.install and config.target in world.WORLD_MODELS:
            dest = world.weights_dir(config.target)
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(final, dest)
            print(f"{config.target}: installed to {dest}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2) and a nearest-name hint for unknown flags and
    commands."""

    def error(self, message: str):
        match = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if match:
            options = re.findall(r"'([^']*)'", match.group(2)) or [o.strip() for o in match.group(2).split(",")]
            close = difflib.get_close_matches(match.group(1), options, n=1, cutoff=0.6)
            if close:
                message += f" (did you mean {close[0]}?)"
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")

    def unknown(self, extras: list[str]) -> None:
        options = [s for a in self._actions for s in a.option_strings]
        hints = []
        for e in extras:
            if e.startswith("-"):
                close = difflib.get_close_matches(e.split("=")[0], options, n=1, cutoff=0.6)
                if close:
                    hints.append(f"did you mean {close[0]}?")
        self.error(f"unrecognized arguments: {' '.join(extras)}" + (f" ({'; '.join(hints)})" if hints else ""))


def _add_layout_flags(parser: argparse.ArgumentParser, example_grid: str) -> None:
    """The method and token-layout flags of the commands that look at a pattern (mask, simulate)."""
    parser.add_argument("--method", required=True, help="method name (see `diffusion-attn methods`)")
    parser.add_argument("--grid", required=True, help=f"token grid: frames x height x width ({example_grid}) or height x width (64x64)")
    parser.add_argument("--text", type=int, default=0, help="number of text tokens in the sequence (default: 0)")
    parser.add_argument("--text-position", dest="text_position", choices=("first", "last"), default="last",
                        help="text before (Flux) or after (SD3, HunyuanVideo) the grid tokens (default: last)")
    parser.add_argument("--family", help="model family whose defaults to use (default: the method's first family)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffusion-attn", description="Published attention methods for diffusers pipelines.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate an image or video with a method applied",
                         description="Generate with a method applied; writes the image (PNG with a metadata text chunk) "
                                     "or video (MP4 when imageio-ffmpeg or OpenCV is installed, else GIF) and a JSON sidecar.")
    _add_generation_args(gen, "outputs/result", "output path; .png for images, .mp4 or .gif for videos (suffix set by "
                                                "what is written), plus a .json sidecar (default: outputs/result)")
    cp = gen.add_argument_group("context parallelism (launch with torchrun --nproc-per-node N -m diffusion_attn generate ...)")
    cp.add_argument("--context-parallel", dest="context_parallel", choices=("ulysses", "ring"), default=None,
                    help="split the generation over the torchrun processes with diffusers' context parallelism: "
                         "ulysses (ContextParallelConfig(ulysses_degree=N); every method) or ring (ring_degree=N; "
                         "methods that declare it, see docs/parallel.md); rank 0 writes the output")
    cp.add_argument("--cp-degree", dest="cp_degree", type=int, default=None, metavar="N",
                    help="processes per generation (default: the torchrun world size)")
    cp.add_argument("--ulysses-anything", dest="ulysses_anything", action="store_true",
                    help="diffusers' ulysses_anything: head counts and lengths the degree does not divide")
    _add_method_flags(gen)
    gen.set_defaults(func=cmd_generate)

    cmp = sub.add_parser("compare", help="dense vs method with the same seed: timings, pixel difference, side by side",
                         description="Run stock attention and the method with the same seed and call; writes one "
                                     "side-by-side image or video (dense left, method right) and a JSON sidecar.")
    _add_generation_args(cmp, "outputs/compare", "output path for the side-by-side picture (+ .json) (default: outputs/compare)")
    cmp.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                     help="one untimed dense step first, so one-off costs do not land on the timed runs (default: on)")
    _add_method_flags(cmp)
    cmp.set_defaults(func=cmd_compare)

    msk = sub.add_parser("mask", help="draw a method's attention pattern for a token layout and print its density",
                         description="Draw the (query, key) mask of a method on a token layout (text tokens included), "
                                     "downsampled by per-cell density; prints the overall density.")
    _add_layout_flags(msk, "9x30x52")
    msk.add_argument("--max-side", dest="max_side", type=int, default=768, help="picture size limit in pixels per side (default: 768)")
    msk.add_argument("--output", "-o", default="outputs/mask.png", help="output picture (default: outputs/mask.png)")
    _add_method_flags(msk)
    msk.set_defaults(func=cmd_mask)

    sim = sub.add_parser("simulate", help="predict a block-sparse kernel's speedup: (query tile, key tile) pairs visited",
                         description="Count the (query tile, key tile) pairs a block-sparse kernel must visit for a method's "
                                     "pattern on a token layout (text tokens dense), full and partial, and the predicted "
                                     "upper-bound speedup over dense (all / visited tile pairs) next to the ideal 1/density. "
                                     "Integer tiles are 1-D tiles in sequence order (FlexAttention, Triton); per-axis tiles "
                                     "like 1x8x16 are multi-dimensional sub-box tiles (GNA's token-permuted order).")
    _add_layout_flags(sim, "21x30x52")
    sim.add_argument("--q-tile", dest="q_tile", action="append", metavar="TILE",
                     help="query tile: tokens (128, sequence order) or per-axis sizes (1x8x16, tiled order); several "
                          "with commas or by repeating the flag (default: 128)")
    sim.add_argument("--kv-tile", dest="kv_tile", action="append", metavar="TILE",
                     help="key tile, same forms; every --q-tile is paired with every --kv-tile of the same form "
                          "(default: each query tile)")
    sim.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_method_flags(sim)
    sim.set_defaults(func=cmd_simulate)

    lst = sub.add_parser("methods", help="list the methods, their families and parameters",
                         description="List the registered methods, their model families and parameter flags.")
    lst.add_argument("--json", action="store_true", help="print the method specs as JSON")
    lst.set_defaults(func=cmd_methods)

    ui = sub.add_parser("ui", help="launch the Gradio app", description="Launch the Gradio app (needs the [ui] extra).")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    ui.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    ui.add_argument("--share", action="store_true", help="create a public Gradio share link")
    ui.set_defaults(func=cmd_ui)

    exp = sub.add_parser("export-comfy", help="write a ComfyUI custom-node folder",
                         description="Write a ComfyUI custom-node folder with one node per method into DIR.")
    exp.add_argument("directory", metavar="DIR", help="folder to write (e.g. ComfyUI/custom_nodes/diffusion_attn)")
    exp.set_defaults(func=cmd_export_comfy)

    trn = sub.add_parser("train", help="train a shapes-world model (VAE or denoiser) from scratch",
                         description="Train the embedded shapes-world models on accelerate (multi-GPU with `accelerate "
                                     "launch -m diffusion_attn.cli train ...`). Order: image-vae, video-vae, then "
                                     "tiny-flux / tiny-sd15 (image VAE) and tiny-wan (video VAE); see docs/training.md.")
    _add_train_args(trn)
    trn.set_defaults(func=cmd_train)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args, extras = parser.parse_known_args(argv)
        if extras:
            sub = parser._subparsers._group_actions[0].choices.get(getattr(args, "command", None), parser)
            sub.unknown(extras)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed
        return int(e.code or 0)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("diffusion-attn: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, ImportError, NotImplementedError) as e:
        if args.debug:
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"diffusion-attn: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
