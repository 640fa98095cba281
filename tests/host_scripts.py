"""Host-side scripts under files/, loaded as modules for their tests: gpufleet uploads them to hosts by path, they
are no part of the installed package."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

FILES = Path(__file__).resolve().parents[1] / "files"


def load_host_script(relative: str, name: str) -> ModuleType:
    """files/<relative> as the module `name` (registered in sys.modules, which dataclasses need)."""
    spec = importlib.util.spec_from_file_location(name, FILES / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


cubins = load_host_script("xformers/cubins.py", "cubins")
