"""What ships inside the package: the demo corpus (a small French Common Voice release folder) and its recipe, so
`launcher demo` and the tiny test model run from any directory and from a non-editable install."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
DEMO_CORPUS = ASSETS / "demo_corpus" / "fr"
DEMO_RECIPE = ASSETS / "tiny_demo.yaml"  # also recipes/tiny_demo.yaml in a checkout
