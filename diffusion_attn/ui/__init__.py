"""The Gradio web UI: pick a model and a method, set its parameters, generate, compare with dense.

    python app.py                        # or: diffusion-attn ui
    python -c "import diffusion_attn.ui as u; u.launch(port=7861)"

Every method control is generated from the method specs (``diffusion_attn.methods()``), so a newly
registered method shows up with no code here. Gradio is imported lazily: ``import diffusion_attn`` never
needs it, and a missing gradio gives an ImportError naming the ``ui`` extra.

The package is in layers, so the tests can drive each one directly:

* :mod:`.controls` -- controls from the specs, no gradio: :func:`control_kind`, :func:`parse_control`,
  :func:`collect_params`, labels and help text, and the component for a parameter (given gradio);
* :mod:`.families` -- what the UI knows about a model before loading it: family, default sizes,
  :func:`token_layout` for the pattern picture, the per-model defaults variant, the method description;
* :mod:`.handlers` -- :class:`Request` and the handlers (:func:`generate_outputs`,
  :func:`compare_outputs`, :func:`pattern_outputs`), which return plain Python values and raise
  ``ValueError``/``OSError`` for user errors;
* :mod:`.app` -- :func:`build_demo`, which lays out the page, wires the handlers to components and turns
  every error into a ``gr.Error`` (a readable message in the page, never a stack trace), and :func:`launch`.
"""

from __future__ import annotations

from .app import GRADIO_MISSING, QUEUE_MAX_SIZE, build_demo, launch
from .controls import DEFAULT_CHOICE, TRISTATE, collect_params, control_kind, parse_control
from .families import VIDEO_FAMILIES, method_markdown, model_family_of, size_defaults, token_layout
from .handlers import (
    DEFAULT_METHOD,
    DEFAULT_MODEL,
    DEFAULT_PROMPT,
    MAX_GALLERY_FRAMES,
    MAX_PATTERN_TOKENS,
    OUTPUT_MAX_AGE,
    Request,
    compare_outputs,
    generate_outputs,
    pattern_outputs,
)

__all__ = [
    "Request",
    "build_demo",
    "collect_params",
    "compare_outputs",
    "control_kind",
    "generate_outputs",
    "launch",
    "parse_control",
    "pattern_outputs",
    "token_layout",
]
