"""LoRA, rsLoRA, DoRA on 4-bit bases."""

from ...nn.lora import LoraLinear4bit
from ..registry import Method, register
from . import model
from .config import CordaConfig, EvaConfig, LoftQConfig, LoraConfig

__all__ = ["CordaConfig", "EvaConfig", "LoftQConfig", "LoraConfig"]

register(
    Method(
        LoraConfig,
        "lora",
        inject=model.inject_adapter,
        file_parameters=model.file_parameters,
        layers=(LoraLinear4bit,),
        unfreeze=model.unfreeze_biases,
        sharded_start=model.start_sharded,
        convert_initial=model.converted_to_lora,
        example_lr=3e-3,
        examples={
            "default": lambda r=4, steps=10: LoraConfig(
                r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules="all-linear"
            ),
            "rslora": lambda r=4, steps=10: LoraConfig(r=r, use_rslora=True, target_modules=["q_proj", "v_proj"]),
            "dora": lambda r=4, steps=10: LoraConfig(r=r, use_dora=True, target_modules=["q_proj", "down_proj"]),
            "orthogonal": lambda r=4, steps=10: LoraConfig(r=r, init_lora_weights="orthogonal"),
            "biases_and_saved_head": lambda r=4, steps=10: LoraConfig(
                r=r, lora_bias=True, bias="all", target_modules=["v_proj", "up_proj"], modules_to_save=["lm_head"]
            ),
        },
    )
)
