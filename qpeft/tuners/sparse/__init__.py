"""Sparse fine-tuning (a sparse trainable difference on the 4-bit weights)."""

from ...nn.sparse_delta import SparseDeltaLinear4bit
from ..registry import Method, register
from ..selective import PROJECTIONS
from . import model
from .config import SparseConfig

__all__ = ["SparseConfig"]

register(
    Method(
        SparseConfig,
        "sparse",
        inject=model.inject_adapter,
        file_parameters=model.file_parameters,
        layers=(SparseDeltaLinear4bit,),
        prepare_load=model.prepare_load,
        verbs={"select_sparse_entries": model.select_sparse_entries},
        warmup="select_sparse_entries",
        examples={
            "default": lambda r=4, steps=10: SparseConfig(target_modules=PROJECTIONS, budget=0.01),
            "random": lambda r=4, steps=10: SparseConfig(target_modules=PROJECTIONS, budget=0.05, selection="random"),
        },
    )
)
