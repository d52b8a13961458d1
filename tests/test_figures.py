"""The learning guide's figures: every image it shows is committed and made by benchmarks/figures.py."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "LEARNING_GUIDE.md"


def figures_module():
    spec = importlib.util.spec_from_file_location("figures", ROOT / "benchmarks" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_guide_image_is_committed_and_made_by_the_script():
    shown = re.findall(r"!\[[^\]]*\]\((docs/figures/[^)]+\.png)\)", GUIDE.read_text())
    made = set(re.findall(r'out / "([\w-]+\.png)"', (ROOT / "benchmarks" / "figures.py").read_text()))
    assert len(shown) >= 6
    for path in shown:
        assert (ROOT / path).stat().st_size > 5000, path  # a real picture, not an empty canvas
        assert Path(path).name in made, f"{path} is not made by benchmarks/figures.py"


def test_model_free_figures_are_drawn(tmp_path):
    figures = figures_module()
    for draw in (figures.schedules, figures.frontier, figures.ar_vs_diffusion):
        dest = tmp_path / f"{draw.__name__}.png"
        draw(dest)
        assert dest.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and dest.stat().st_size > 5000


def test_the_distillation_example_is_drawn_from_the_bundled_model(tmp_path):
    dest = tmp_path / "distillation_step.png"
    figures_module().distillation_step(dest)
    assert dest.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and dest.stat().st_size > 5000
