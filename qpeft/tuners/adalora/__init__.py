"""AdaLoRA (adaptive rank allocation) on 4-bit bases."""

from ...nn.lora import LoraLinear4bit
from ..lora.model import unfreeze_biases
from ..registry import Method, register
from . import model
from .config import AdaLoraConfig

__all__ = ["AdaLoraConfig"]

register(
    Method(
        AdaLoraConfig,
        "adalora",
        inject=model.inject_adapter,
        file_parameters=model.file_parameters,
        layers=(LoraLinear4bit,),
        unfreeze=unfreeze_biases,
        outputs=model.add_orthogonal_penalty,
        verbs={"update_and_allocate": model.update_and_allocate},
        example_lr=3e-3,
        examples={
            "default": lambda r=4, steps=10: AdaLoraConfig(
                init_r=r,
                target_r=max(r // 4, 1),
                lora_alpha=2 * r,
                target_modules="all-linear",
                tinit=steps // 5,
                tfinal=steps // 5,
                total_step=steps,
            )
        },
    )
)
