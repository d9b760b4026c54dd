"""Sphinx configuration: the Markdown guide pages in docs/ (MyST) and the API from the docstrings.

``make docs`` builds it with warnings as errors. Beyond Sphinx's own checks, the build fails when
a public name (one in the ``__all__`` of a package in :data:`PACKAGES`) has no entry in the API
reference.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
import types
from pathlib import Path

from docutils.statemachine import StringList
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.parsing import nested_parse_to_nodes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import curvlab  # noqa: E402

project = "curvlab"
author = "curvlab contributors"
copyright = "curvlab contributors, MIT licence"
release = version = curvlab.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "figures/*.md"]
html_theme = "furo"
html_title = f"curvlab {release}"
html_static_path: list[str] = []

# The Markdown pages write math as $...$ and $$...$$, and link to sections by their titles.
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

# Google docstrings; the signature shows the types, the description the shapes and math.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_mock_imports: list[str] = []

#: The packages whose ``__all__`` makes up the public API.
PACKAGES = (
    "curvlab",
    "curvlab.nn",
    "curvlab.backprop",
    "curvlab.optim",
    "curvlab.distributed",
    "curvlab.diagnostics",
    "curvlab.data",
    "curvlab.linalg",
    "curvlab.linops",
    "curvlab.vivit",
    "curvlab.experiments",
)


#: What the API pages say of public constants that have no ``#:`` comment or docstring at their
#: definition (there, one is better: it is found and used instead).
CONSTANTS = {
    "curvlab.__version__": "The package version.",
    "curvlab.nn.MEMSAVE_CLASSES": "The memory-saving class that :func:`convert` puts in place of "
    "each stock ``torch.nn`` class.",
    "curvlab.nn.KEPT_STOCK": "Stock classes that :func:`convert` leaves as they are (their "
    "memory-saving form would save nothing).",
    "curvlab.backprop.RULES": "The derivative :class:`Rule` for each supported module class; "
    "modules without one take the generic ``torch.func`` path.",
    "curvlab.experiments.EXPERIMENTS": "The experiments ``curvlab run`` knows, one per figure "
    "of the paper.",
}


def _is_constant(obj) -> bool:
    return not (inspect.isclass(obj) or inspect.isroutine(obj) or isinstance(obj, types.ModuleType))


class PublicConstants(SphinxDirective):
    """``.. public-constants:: curvlab.nn``: an ``autodata`` entry per constant in ``__all__``.

    ``automodule`` documents a package's re-exported classes and functions but not its
    re-exported constants; this adds them, so that a new public constant needs no edit here.
    Values whose ``repr`` is long or holds an address are not shown.
    """

    required_arguments = 1

    def run(self):
        """The ``autodata`` entries, parsed."""
        package = self.arguments[0]
        module = importlib.import_module(package)
        own_docs = ModuleAnalyzer.for_module(package).find_attr_docs()
        lines = []
        for name in module.__all__:
            obj = getattr(module, name)
            if not _is_constant(obj) or ("", name) in own_docs:
                continue  # automodule documents it
            lines += ["", f".. autodata:: {package}.{name}"]
            value = repr(obj)
            if len(value) > 60 or " at 0x" in value:
                lines.append("   :no-value:")
            if f"{package}.{name}" in CONSTANTS and not _attribute_doc(f"{package}.{name}", obj):
                lines += ["", f"   {CONSTANTS[f'{package}.{name}']}"]
        return nested_parse_to_nodes(self.state, StringList(lines, source=package))


def _resolve(name: str):
    """The object a dotted name refers to, or ``None``."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _check_api_coverage(app, env) -> None:
    """Warn (an error under ``-W``) for every public name the API reference does not document.

    A name counts as documented under its own path (``curvlab.nn.RevMLP``) or, for a re-exported
    class, function or module, under another public path (``curvlab.ExactGN`` is documented as
    ``curvlab.optim.ExactGN``).
    """
    domain = env.get_domain("py")
    documented = set(domain.objects) | set(domain.modules)
    shared = {
        id(obj)
        for obj in map(_resolve, documented)
        if inspect.isclass(obj) or inspect.isfunction(obj) or isinstance(obj, types.ModuleType)
    }
    logger = logging.getLogger("curvlab.api")
    for package in PACKAGES:
        module = importlib.import_module(package)
        for name in module.__all__:
            obj = getattr(module, name)
            if f"{package}.{name}" in documented or id(obj) in shared:
                continue
            logger.warning(
                f"public name {package}.{name} is not in the API reference: add "
                f"'.. automodule:: {package}' and '.. public-constants:: {package}' to "
                f"docs/api/{package.rpartition('.')[2]}.rst",
                type="curvlab",
                subtype="api",
            )


def _public(name: str, obj) -> bool:
    """Whether ``obj`` is the public name ``name`` of a package in :data:`PACKAGES`."""
    for package in PACKAGES:
        module = sys.modules.get(package)
        if module is not None and name in module.__all__ and getattr(module, name, None) is obj:
            return True
    return False


def _keep_public_members(app, what, name, obj, skip, options):
    """Document every public name of a package, with or without a docstring."""
    if what == "module" and skip and name not in (options.exclude_members or ()):
        return False if _public(name, obj) else None
    return None


def _attribute_doc(fullname: str, obj) -> list[str]:
    """The ``#:`` comment above a re-exported constant's assignment in its package's modules."""
    package, _, attr = fullname.rpartition(".")
    root = sys.modules.get(package)
    if root is None or not hasattr(root, "__path__"):
        return []
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
        module = importlib.import_module(info.name)
        if getattr(module, attr, None) is not obj:
            continue
        docs = ModuleAnalyzer.for_module(info.name).find_attr_docs()
        if ("", attr) in docs:
            return list(docs[("", attr)])
    return []


def _data_docstring(app, what, name, obj, options, lines) -> None:
    """Replace the docstring a constant inherits from its type (``dict``, ``tuple``).

    A constant re-exported by a package then shows the ``#:`` comment (or docstring) at its
    definition.
    """
    inherited = getattr(type(obj), "__doc__", None)
    if what != "data" or not isinstance(inherited, str):
        return
    inherited = inspect.cleandoc(inherited).splitlines()
    if [line.rstrip() for line in lines if line.strip()] == [
        line.rstrip() for line in inherited if line.strip()
    ]:
        lines[:] = _attribute_doc(name, obj)


def setup(app) -> None:
    """Add the constants directive; hook the member filter, docstrings and coverage check."""
    app.add_directive("public-constants", PublicConstants)
    app.connect("autodoc-skip-member", _keep_public_members)
    app.connect("autodoc-process-docstring", _data_docstring)
    app.connect("env-check-consistency", _check_api_coverage)
