"""Sphinx configuration for skmixed."""

import os
import sys
from datetime import date

sys.path.insert(0, os.path.abspath(".."))

import skmixed  # noqa: E402

project = "skmixed"
author = "skmixed developers"
copyright = f"{date.today().year}, {author}"
release = skmixed.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]

# The examples are a sphinx-gallery: every examples/plot_*.py runs during the build
# and its printed output and figures appear in the HTML; other scripts are not shown.
sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"^(?!plot_).*\.py$",
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": True,
}

# Set to True to resolve links to numpy/scipy/pandas/scikit-learn (needs network).
use_intersphinx = False
if use_intersphinx:
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "numpy": ("https://numpy.org/doc/stable", None),
        "scipy": ("https://docs.scipy.org/doc/scipy", None),
        "pandas": ("https://pandas.pydata.org/docs", None),
        "sklearn": ("https://scikit-learn.org/stable", None),
    }

templates_path = ["_templates"]
exclude_patterns = ["_build", "benchmarks_table.rst", "auto_examples/*.ipynb", "auto_examples/*.py",
                    "auto_examples/*.zip", "auto_examples/*.json", "auto_examples/*.md5"]
source_suffix = {".rst": "restructuredtext"}
root_doc = "index"

autosummary_generate = True
autodoc_default_options = {"inherited-members": False}
autodoc_typehints = "none"

# Methods are listed by the autosummary class template; numpydoc's own member
# tables would duplicate them and point at pages that do not exist.
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = True
numpydoc_xref_param_type = False

html_theme = "pydata_sphinx_theme"
html_title = f"skmixed {release}"
html_static_path = []
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
}
