"""The C++ and project files shipped in the package (``qfx_onnx/hls/templates/``), read with
:mod:`importlib.resources` so that they work from an installed wheel as from a checkout.

``*.h`` files are fixed library code copied into every project as they are (``layers.h``, and the
header of any registered layer kind); ``*.j2`` files are jinja2 templates rendered per project
from parameters (no template is patched after rendering).
"""

from __future__ import annotations

import functools
from importlib import resources

import jinja2

PACKAGE = "qfx_onnx.hls"
FOLDER = "templates"


# fixed C++ files shipped beside the templates: the nonlinear kernels' header lives with its Python
HEADER_FOLDERS = ((PACKAGE, FOLDER), ("qfx_onnx.nonlinear", "cpp"))


@functools.lru_cache(maxsize=None)
def header(name: str) -> str:
    """The text of the fixed C++ file ``templates/<name>`` (or ``qfx_onnx/nonlinear/cpp/<name>``);
    FileNotFoundError if it is in neither."""
    for package, folder in HEADER_FOLDERS:
        path = resources.files(package).joinpath(folder, name)
        if path.is_file():
            return path.read_text(encoding="utf-8")
    raise FileNotFoundError(f"no shipped C++ file {name!r}")


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    # StrictUndefined: a parameter missing from the template's object is an error, never blank text
    return jinja2.Environment(loader=jinja2.PackageLoader(PACKAGE, FOLDER), undefined=jinja2.StrictUndefined,
                              keep_trailing_newline=True, autoescape=False)


def render(name: str, **params) -> str:
    """The jinja2 template ``templates/<name>`` rendered with ``params``."""
    return _environment().get_template(name).render(**params)
