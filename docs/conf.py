"""Sphinx configuration: Markdown pages (MyST) and an API reference from the docstrings.

Build with ``sphinx-build -W -b html docs docs/_build`` (``tests/test_docs.py`` does, with
warnings as errors).
"""

import gradsurgery

project = "gradsurgery"
author = "gradsurgery contributors"
copyright = "gradsurgery contributors"
release = gradsurgery.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
myst_enable_extensions = ["deflist", "dollarmath"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True

html_theme = "alabaster"
html_title = f"gradsurgery {release}"
