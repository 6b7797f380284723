"""The CLI: flags generated from the specs, outputs with their metadata, clear errors."""

import json

from diffusion_attn.cli import main


def test_generate_writes_video_and_metadata(tmp_path, capsys):
    out = tmp_path / "radial"
    assert main(["generate", "--method", "radial", "--model", "tiny-wan", "--steps", "2", "--dense-steps", "0",
                 "--decay-factor", "0.5", "--output", str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["method"] == "radial" and meta["params"]["decay_factor"] == 0.5 and meta["params"]["dense_steps"] == 0
    assert meta["params"]["sink"] is True  # Wan default from the official scripts
    assert out.with_suffix(".gif").stat().st_size > 0


def test_generate_image_png(tmp_path):
    from PIL import Image

    out = tmp_path / "gna"
    assert main(["generate", "--method", "gna", "--window", "4x6", "--stride", "2,3", "--model", "tiny-flux",
                 "--steps", "2", "--output", str(out)]) == 0
    img = Image.open(out.with_suffix(".png"))
    assert img.size == (192, 128)
    assert json.loads(img.text["diffusion_attn"])["params"]["window"] == [4, 6]


def test_errors_exit_nonzero(capsys):
    assert main(["generate", "--method", "radial", "--window", "3"]) == 2
    assert "does not take --window" in capsys.readouterr().err
    assert main(["generate", "--method", "radail"]) == 2
    assert "did you mean 'radial'" in capsys.readouterr().err
    assert main(["generate", "--method", "gna", "--model", "tiny-flux"]) == 2
    assert "'window' is required" in capsys.readouterr().err
    assert main(["generate", "--method", "radial", "--model", "tiny-flux"]) == 2
    assert "supported families: wan, hunyuanvideo" in capsys.readouterr().err


def test_methods_table(capsys):
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    assert "--window" in text and "--decay-factor" in text and "per model" in text
