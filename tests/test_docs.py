"""The README's method table is generated from the specs and must not drift; the CLI is documented."""

from pathlib import Path

import diffusion_attn as da
from diffusion_attn import docs
from diffusion_attn.cli import build_parser

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_method_table_is_up_to_date():
    assert docs.update_readme(README), "README method table is out of date: run python -m diffusion_attn.docs --write"


def test_table_lists_every_method_from_its_spec():
    table = docs.method_table()
    for spec in da.methods().values():
        row = next(line for line in table.splitlines() if line.startswith(f"| `{spec.name}` |"))
        assert spec.paper in row and ", ".join(spec.families) in row
        assert ("| yes |" in row) == spec.kind.startswith("training-free")
        assert all(f"`{p.name}`" in row for p in spec.params if p.name not in docs.COMMON)


def test_check_and_write_detect_and_fix_drift(tmp_path):
    stale = tmp_path / "README.md"
    stale.write_text(f"# x\n\n{docs.START}\n| old table |\n{docs.END}\n\nmore text\n")
    assert docs.main(["--readme", str(stale), "--check"]) == 1
    assert docs.main(["--readme", str(stale), "--write"]) == 0
    assert docs.main(["--readme", str(stale), "--check"]) == 0
    text = stale.read_text()
    assert "| old table |" not in text and "| `radial` |" in text and text.endswith("\nmore text\n")


def test_readme_keeps_its_first_two_commands_and_documents_the_cli():
    text = README.read_text()
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert first_block[1] == ("pip install torch==2.13.0 && pip install -e . && diffusion-attn generate --method radial "
                              "--model tiny-wan --dense-steps 0 --output outputs/radial")
    assert first_block[3] == 'pip install -e ".[dev]" && python -m pytest'
    for command in build_parser()._subparsers._group_actions[0].choices:
        assert f"diffusion-attn {command}" in text, f"README does not show `diffusion-attn {command}`"
