"""π0 (flow matching, openpi's JAX model) as a vlajax policy family: the model in Flax NNX
(`model.Pi0`), its sizes (`config`), and openpi's checkpoint layout (`openpi_convert`)."""

from vlajax.model.pi0.config import GemmaConfig, Pi0Config, preset
from vlajax.model.pi0.model import Pi0, make_attn_mask, posemb_sincos

__all__ = ["GemmaConfig", "Pi0", "Pi0Config", "make_attn_mask", "posemb_sincos", "preset"]
