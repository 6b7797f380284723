"""The Gradio Blocks app: layout, wiring of the handlers to components, errors shown in the page, launch."""

from __future__ import annotations

import inspect

from .controls import DEFAULT_CHOICE, _Control, _make_control
from .families import VIDEO_FAMILIES, method_markdown, model_family_of, size_defaults
from .handlers import (
    DEFAULT_METHOD,
    DEFAULT_MODEL,
    DEFAULT_PROMPT,
    DEFAULT_STEPS,
    Request,
    _gallery_frames,
    compare_outputs,
    generate_outputs,
    pattern_outputs,
)

__all__ = ["GRADIO_MISSING", "QUEUE_MAX_SIZE", "build_demo", "launch"]

GRADIO_MISSING = 'The web UI needs gradio, which is not installed: pip install "diffusion-attn[ui]"'
QUEUE_MAX_SIZE = 16


def _gradio():
    try:
        import gradio as gr
    except ImportError as err:
        raise ImportError(GRADIO_MISSING) from err
    return gr


def _attention_backends() -> list[str]:
    from .. import runner

    try:
        return runner.attention_backends()
    except Exception:  # noqa: BLE001 - an older diffusers without the dispatcher: offer none
        return []


def _friendly(err: BaseException) -> str:
    """A one-paragraph message for the page (no traceback)."""
    if isinstance(err, (ValueError, OSError, ImportError, KeyError, TypeError, NotImplementedError)):
        text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        return text or type(err).__name__
    if "out of memory" in str(err).lower():
        return f"Out of memory: {err}. Try a smaller size, fewer frames or a lower-precision dtype."
    return f"{type(err).__name__}: {err}"


def build_demo():
    """The Gradio Blocks app (queued: one generation at a time, at most ``QUEUE_MAX_SIZE`` waiting)."""
    gr = _gradio()
    import torch

    from ..models import EMBEDDED_MODELS, default_prompt
    from ..models.tiny import GENERIC_PROMPT
    from ..models.world import IMAGE_PROMPT, VIDEO_PROMPT
    from ..registry import methods

    _EXAMPLE_PROMPTS = {DEFAULT_PROMPT, GENERIC_PROMPT, IMAGE_PROMPT, VIDEO_PROMPT}

    specs = methods()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (
        ["mps"] if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available() else [])
    default_sizes = size_defaults(DEFAULT_MODEL, model_family_of(DEFAULT_MODEL))

    with gr.Blocks(title="diffusion-attn") as demo:
        gr.Markdown("# diffusion-attn\nPublished attention methods on diffusers pipelines. The embedded "
                    "`tiny-flux`, `tiny-sd15` and `tiny-wan` are small real-family pipelines trained on a world of "
                    "coloured shapes (prompts like *a red circle at the top left* or *a blue square moving "
                    "down*); they run offline on a CPU. The `tiny-*-random` and other tiny models have random "
                    "weights (noise pictures, real timings and patterns).")
        with gr.Row():
            with gr.Column(scale=1):
                with gr.Row():
                    model_dd = gr.Dropdown(list(EMBEDDED_MODELS), value=DEFAULT_MODEL, label="Model",
                                           info="embedded tiny models (offline)", elem_id="da-model")
                    model_path = gr.Textbox(label="or a local folder / Hub id", max_lines=1,
                                            placeholder="e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
                                            info="used instead of the dropdown when filled", elem_id="da-model-path")
                method_dd = gr.Dropdown(["none", *specs], value=DEFAULT_METHOD, label="Method", elem_id="da-method")
                method_info = gr.Markdown(method_markdown(DEFAULT_METHOD, DEFAULT_MODEL), elem_id="da-method-info")
                controls: list[_Control] = []
                groups = {}
                for name, spec in specs.items():
                    with gr.Group(visible=name == DEFAULT_METHOD, elem_id=f"da-group-{name}") as group:
                        for p in spec.params:
                            controls.append(_make_control(gr, spec, p))
                    groups[name] = group
                prompt = gr.Textbox(DEFAULT_PROMPT, label="Prompt", lines=2, elem_id="da-prompt")
                # optional numbers are textboxes: blank = the model's default (shown as the placeholder)
                with gr.Row():
                    height = gr.Textbox("", label="Height", placeholder=str(default_sizes.get("height", "")),
                                        info="blank: model default", max_lines=1, elem_id="da-height")
                    width = gr.Textbox("", label="Width", placeholder=str(default_sizes.get("width", "")),
                                       info="blank: model default", max_lines=1, elem_id="da-width")
                    frames = gr.Textbox("", label="Frames", placeholder=str(default_sizes.get("num_frames", "")),
                                        info="video models", max_lines=1, elem_id="da-frames")
                with gr.Row():
                    steps = gr.Slider(1, 50, value=DEFAULT_STEPS, step=1, label="Steps", elem_id="da-steps")
                    seed = gr.Number(0, label="Seed", precision=0, elem_id="da-seed")
                    guidance = gr.Textbox("", label="Guidance", info="blank: model default", max_lines=1,
                                          placeholder=str(default_sizes.get("guidance_scale", "")), elem_id="da-guidance")
                with gr.Accordion("Advanced", open=False):
                    with gr.Row():
                        dtype = gr.Dropdown(["float32", "bfloat16", "float16"], value="float32", label="dtype",
                                            elem_id="da-dtype")
                        device = gr.Dropdown(devices, value=devices[0], label="Device", elem_id="da-device")
                        backend = gr.Dropdown([DEFAULT_CHOICE, *_attention_backends()], value=DEFAULT_CHOICE,
                                              label="diffusers attention backend", elem_id="da-backend",
                                              info="for the stock and dense layers")
                with gr.Row():
                    generate_btn = gr.Button("Generate", variant="primary", elem_id="da-generate")
                    compare_btn = gr.Button("Compare with dense", elem_id="da-compare")
                    pattern_btn = gr.Button("Show pattern", elem_id="da-pattern-btn")
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="Output", columns=4, height="auto", elem_id="da-gallery")
                video = gr.Video(label="Video", visible=False, autoplay=True, loop=True, elem_id="da-video")
                animation = gr.Image(label="Video", type="filepath", visible=False, elem_id="da-animation")
                with gr.Row():
                    pattern_img = gr.Image(label="Attention pattern", type="pil", elem_id="da-pattern",
                                           interactive=False)
                pattern_note = gr.Markdown(elem_id="da-pattern-note")
                info = gr.JSON(label="Timing and metadata", elem_id="da-info")
                compare_gallery = gr.Gallery(label="Compare: dense (left) vs method (right)", columns=2,
                                             height="auto", elem_id="da-compare-gallery")
                compare_info = gr.JSON(label="Comparison: timings and differences", elem_id="da-compare-info")

        fixed = dict(model_dd=model_dd, model_path=model_path, method=method_dd, prompt=prompt, height=height,
                     width=width, num_frames=frames, steps=steps, guidance_scale=guidance, seed=seed, dtype=dtype,
                     device=device, attention_backend=backend)
        inputs = set(fixed.values()) | {c.component for c in controls} | {c.use_default for c in controls if c.use_default}

        def read(data: dict) -> Request:
            method = data[method_dd]
            own = [c for c in controls if c.method == method]
            return Request(
                model=(data[model_path] or "").strip() or data[model_dd], method=method,
                params={c.param.name: data[c.component] for c in own},
                use_default={c.param.name: bool(data[c.use_default]) for c in own if c.use_default is not None},
                **{k: data[comp] for k, comp in fixed.items() if k not in ("model_dd", "model_path", "method")},
            )

        def fail(err: BaseException):
            if isinstance(err, gr.Error):
                return err
            return gr.Error(_friendly(err))

        def on_generate(data, progress=gr.Progress()):
            try:
                out = generate_outputs(read(data), progress=progress)
            except Exception as err:  # noqa: BLE001 - shown in the page, the server stays up
                raise fail(err) from None
            path = out["video"]
            is_mp4 = bool(path) and path.endswith(".mp4")
            return (gr.update(value=_gallery_frames(out["frames"])),
                    gr.update(value=path if is_mp4 else None, visible=is_mp4),
                    gr.update(value=path if path and not is_mp4 else None, visible=bool(path) and not is_mp4),
                    out["pattern"], out["note"], out["info"])

        def on_compare(data, progress=gr.Progress()):
            try:
                out = compare_outputs(read(data), progress=progress)
            except Exception as err:  # noqa: BLE001
                raise fail(err) from None
            items = ([out["video"]] if out["video"] else []) + _gallery_frames(out["frames"])
            return items, out["info"]

        def on_pattern(data):
            try:
                return pattern_outputs(read(data))
            except Exception as err:  # noqa: BLE001
                raise fail(err) from None

        def on_method(method, model_name, path):
            model = (path or "").strip() or model_name
            return [gr.update(visible=name == method) for name in groups] + [method_markdown(method, model)]

        def on_model(model_name, path, method, current_prompt):
            model = (path or "").strip() or model_name
            family = model_family_of(model)
            sizes = size_defaults(model, family)
            is_video = family is None or family in VIDEO_FAMILIES
            # an example prompt the new model draws, unless the user wrote their own
            untouched = current_prompt in _EXAMPLE_PROMPTS or not (current_prompt or "").strip()
            return (method_markdown(method, model),
                    gr.update(value=default_prompt(model)) if untouched else gr.update(),
                    gr.update(placeholder=str(sizes.get("height", ""))),
                    gr.update(placeholder=str(sizes.get("width", ""))),
                    gr.update(placeholder=str(sizes.get("num_frames", "")), visible=is_video),
                    gr.update(placeholder=str(sizes.get("guidance_scale", ""))))

        # generate and compare share one pipeline cache: one queue slot for both
        model_events = dict(concurrency_id="pipeline", concurrency_limit=1)

        def progress_on(component) -> dict:  # show_progress_on is newer than gradio 5.0
            return {"show_progress_on": [component]} if "show_progress_on" in click_params else {}

        click_params = inspect.signature(generate_btn.click).parameters
        generate_btn.click(on_generate, inputs, [gallery, video, animation, pattern_img, pattern_note, info],
                           api_name="generate", **progress_on(gallery), **model_events)
        compare_btn.click(on_compare, inputs, [compare_gallery, compare_info], api_name="compare",
                          **progress_on(compare_gallery), **model_events)
        pattern_btn.click(on_pattern, inputs, [pattern_img, pattern_note], api_name="pattern")
        method_dd.change(on_method, [method_dd, model_dd, model_path], [*groups.values(), method_info],
                         queue=False, show_progress="hidden")
        for trigger in (model_dd.change, model_path.blur):
            trigger(on_model, [model_dd, model_path, method_dd, prompt], [method_info, prompt, height, width, frames, guidance],
                    queue=False, show_progress="hidden")

    demo.queue(default_concurrency_limit=1, max_size=QUEUE_MAX_SIZE)
    demo.da_controls = controls  # for the tests: the generated controls, in order
    return demo


def launch(host: str = "127.0.0.1", port: int = 7860, share: bool = False, **kwargs):
    """Build the app and serve it (blocking) at ``http://host:port``; ``share=True`` asks Gradio for a
    public link. Extra keyword arguments go to ``gr.Blocks.launch``."""
    demo = build_demo()
    kwargs.setdefault("show_error", True)
    return demo.launch(server_name=host, server_port=int(port), share=share, **kwargs)
