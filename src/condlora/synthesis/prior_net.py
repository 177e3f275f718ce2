"""The prior's denoiser with its cond_mode fully built, UC-LoRA injection included.

`condlora.nets` holds no LoRA code, so for cond_mode "uc_lora" the net comes with plain
blocks, and the conditional LoRA is injected here from outside, as the library does for
any host model: UC-LoRA adapters on every block's `fc1` and `fc2`, their basis weights an
MLP of the net's own condition embedding (the output of `cond_embed`, read by a hook).
"""

from condlora.core.errors import ConfigError
from condlora.lora import LoRAConfig, inject
from condlora.nets.vector import VectorDenoiser, VectorNetConfig

UC_TARGETS = ["fc1", "fc2"]  # suffixes: the two Linear layers of every ResMLPBlock
UC_EMB_MODULE = "cond_embed"  # VectorDenoiser's condition path, output (B, cond_width)


def uc_lora_config(config: VectorNetConfig, num_bases: int = 8) -> LoRAConfig:
    """Default UC-LoRA settings for a VectorDenoiser: rank config.rank, m bases, on fc1/fc2."""
    return LoRAConfig(
        method="uc",
        rank=config.rank,
        num_bases=num_bases,
        targets=list(UC_TARGETS),
        emb_module=UC_EMB_MODULE,
    )


def build_prior_net(config: VectorNetConfig, lora: LoRAConfig | None = None) -> VectorDenoiser:
    """A VectorDenoiser for `config`; for cond_mode "uc_lora" with UC-LoRA (`lora` or default).

    The LoRA parameters are trainable like the rest; the same call rebuilds the same
    module names, so a state dict saved from one net loads into another.
    """
    if config.cond_mode != "uc_lora":
        if lora is not None and lora.method != "none":
            mode = config.cond_mode
            raise ConfigError(f"LoRA settings apply only to cond_mode 'uc_lora', not {mode!r}")
        return VectorDenoiser(config)
    lora = lora if lora is not None else uc_lora_config(config)
    if lora.method != "uc":
        raise ConfigError(f"cond_mode 'uc_lora' needs LoRA method 'uc', got {lora.method!r}")
    net = VectorDenoiser(config)
    inject(net, lora)
    return net
