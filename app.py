"""The Gradio web UI: ``python app.py`` serves it at http://127.0.0.1:7860 (``--host``, ``--port``, ``--share``).

Needs the ``ui`` extra: ``pip install -e ".[ui]"``. The UI itself is :mod:`diffusion_attn.ui`.
"""

import argparse
import os
import sys


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="diffusion-attn web UI (Gradio)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="interface to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true", help="also open a temporary public gradio.live link")
    args = parser.parse_args(argv)
    try:
        from diffusion_attn.ui import launch

        launch(args.host, args.port, args.share)
    except ImportError as err:  # gradio missing: the message names the extra to install
        sys.exit(f"app.py: {err}")


if __name__ == "__main__":
    main()
