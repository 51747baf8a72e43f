"""scikit-build-core metadata provider (pyproject.toml [tool.scikit-build.metadata.dependencies]): the
dependencies with torch pinned to the major.minor version the extension is compiled against. torch keeps no stable
C++ ABI across minor versions, so a wheel built with torch 2.13 requires torch==2.13.*. Build-time only (not
shipped in wheels)."""

from __future__ import annotations


def dynamic_metadata(field, settings, project=None):
    import torch

    if field != "dependencies":
        raise RuntimeError(f"torch_pin provides 'dependencies', not {field!r}")
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return [f"torch=={major}.{minor}.*", *settings.get("also", [])]
