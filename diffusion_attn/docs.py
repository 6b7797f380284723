"""Documentation generated from the method specs: the README's method table.

    python -m diffusion_attn.docs            # print the table
    python -m diffusion_attn.docs --check    # exit 1 if README.md's table is out of date
    python -m diffusion_attn.docs --write    # rewrite it in place

The table sits between ``<!-- methods-table:start -->`` and ``<!-- methods-table:end -->`` in README.md;
``tests/test_docs.py`` fails when it drifts from the registered specs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["START", "END", "method_table", "render_readme", "update_readme", "main"]

START = "<!-- methods-table:start -->"
END = "<!-- methods-table:end -->"
#: parameters every pattern method has; listed once under the table instead of in every row
COMMON = ("backend",)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _training_free(kind: str) -> str:
    return "yes" if kind.lower().startswith("training-free") else f"no ({kind})"


def method_table() -> str:
    """The Markdown table of the registered methods: method, paper, model families, training-free or
    not (from ``spec.kind``), key parameters (the fields of the method's config, all but :data:`COMMON`;
    required ones and user inputs marked)."""
    from .registry import methods

    rows = [
        "| method | paper | model families | training-free | key parameters |",
        "|---|---|---|---|---|",
    ]
    specs = sorted(methods().values(), key=lambda s: s.name)
    for spec in specs:
        params = ", ".join(f"`{p.name}`" + (" (required)" if p.required else "") + (" (input)" if p.role == "input" else "")
                           for p in spec.params if p.name not in COMMON)
        rows.append(f"| `{spec.name}` | {_cell(spec.paper)} | {_cell(', '.join(spec.families))} | "
                    f"{_cell(_training_free(spec.kind))} | {params or '-'} |")
    from .adapters import FAMILIES

    used = [f for f in FAMILIES if any(f in s.families for s in specs)]
    if used:
        rows += ["", "Model families:", ""] + [f"* `{f}`: {FAMILIES[f].description}" for f in used]
    common = [c for c in COMMON if all(any(p.name == c for p in s.params) for s in specs)]
    lines = "\n".join(rows)
    if common:
        lines += "\n\nEvery method also takes " + ", ".join(f"`{c}`" for c in common) + \
                 " (the kernel: `auto`, `gather`, `reference`, ...). `diffusion-attn methods` lists every parameter " \
                 "with its type, default and range."
    return lines


def render_readme(text: str) -> str:
    """``text`` with the block between the markers replaced by :func:`method_table`."""
    i, j = text.find(START), text.find(END)
    if i < 0 or j < i:
        raise ValueError(f"README has no {START} ... {END} block")
    return text[: i + len(START)] + "\n" + method_table() + "\n" + text[j:]


def update_readme(path="README.md", write: bool = False) -> bool:
    """Whether ``path``'s table is up to date; with ``write``, rewrite it (then returns True)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    new = render_readme(text)
    if new == text:
        return True
    if write:
        path.write_text(new, encoding="utf-8")
        return True
    return False


def _default_readme() -> Path:
    return Path(__file__).resolve().parent.parent / "README.md"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusion_attn.docs", description=__doc__.splitlines()[0])
    parser.add_argument("--readme", default=str(_default_readme()), help="README to check or rewrite")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the table in the README")
    mode.add_argument("--check", action="store_true", help="exit 1 if the README's table is out of date")
    args = parser.parse_args(argv)
    if args.write:
        update_readme(args.readme, write=True)
        print(f"updated the method table in {args.readme}")
        return 0
    if args.check:
        ok = update_readme(args.readme)
        print("method table up to date" if ok else f"method table in {args.readme} is out of date: run python -m diffusion_attn.docs --write")
        return 0 if ok else 1
    print(method_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
