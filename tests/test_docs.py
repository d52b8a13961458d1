"""The documentation site's sources: the README stays short, every model card is a page of the site, and the
build hook points included files' links at the right place (the strict build itself runs in `make docs`)."""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "docs"))
from hooks import rewrite_links  # noqa: E402


def test_the_readme_fits_a_few_screens_and_its_links_exist():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for link in re.findall(r"\]\(([^)#:]+)\)", readme):
        assert (ROOT / link).exists(), link


def test_every_model_card_is_a_page_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    for card in sorted((ROOT / "textdiffusion" / "models").glob("*/README.md")):
        name = card.parent.name
        stub = ROOT / "docs" / "models" / f"{name}.md"
        assert stub.read_text().strip() == f"<!-- include: textdiffusion/models/{name}/README.md -->"
        assert f"models/{name}.md" in nav


def test_included_links_point_at_site_pages_docs_files_or_become_paths():
    text = ("[guide](LEARNING_GUIDE.md#masks) ![trace](docs/figures/denoising_trace.png) [card](textdiffusion/models/"
            "wiki-small/README.md) [`recipes/wiki-small.yaml`](recipes/wiki-small.yaml) [web](https://example.org) "
            "[here](#top) ![curve](per_level_loss.png)")
    out = rewrite_links(text, "README.md", "howto/train.md")
    assert "[guide](../learning-guide.md#masks)" in out
    assert "![trace](../figures/denoising_trace.png)" in out
    assert "[card](../models/wiki-small.md)" in out
    assert "`recipes/wiki-small.yaml`" in out and "](recipes" not in out
    assert "[web](https://example.org)" in out and "[here](#top)" in out
    assert "*curve* (`per_level_loss.png`)" in out
    card = rewrite_links("[results](../../../benchmarks/results/distill/README.md)",
                         "textdiffusion/models/wiki-small-sdtt/README.md", "models/wiki-small-sdtt.md")
    assert card == "results (`benchmarks/results/distill/README.md`)"
