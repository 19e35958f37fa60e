"""The reference systems (``examples/`` in a checkout) importable as ``examples``, wherever
dsrflow runs from: the checkout's own when the current directory holds it, else the copy the
wheel carries inside the package (``dsrflow/_examples``). ``dsrflow demo``, ``dsrflow seed`` and
``dsrflow worker crm`` then work from a plain ``pip install dsrflow``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__all__ = ["ensure_examples"]

_BUNDLED = Path(__file__).resolve().parent / "_examples"


def _is_reference(origin: str | None) -> bool:
    """Whether a module file is the reference systems' package (not some other ``examples``)."""
    return origin is not None and (Path(origin).parent / "crm" / "worker.py").is_file()


def ensure_examples() -> None:
    """Make ``import examples.crm.worker`` work. Idempotent."""
    loaded = sys.modules.get("examples")
    if loaded is not None and _is_reference(getattr(loaded, "__file__", None)):
        return
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    if loaded is None:
        found = importlib.util.find_spec("examples")
        if found is not None and _is_reference(found.origin):
            return  # a checkout: its examples/ is imported as usual
    if not (_BUNDLED / "__init__.py").is_file():
        return  # neither: the import names what is missing
    spec = importlib.util.spec_from_file_location("examples", _BUNDLED / "__init__.py",
                                                  submodule_search_locations=[str(_BUNDLED)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["examples"] = module
    spec.loader.exec_module(module)
