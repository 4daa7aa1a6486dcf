"""π0 (flow matching, openpi's JAX model) as a vlajax policy family (`pi0`): the model in Flax NNX
(`model.Pi0`), its sizes (`config`), the Flow-SDE actor RL scores (`actor`), openpi's parameter tree
and checkpoint layout (`openpi_convert`, `checkpoint`) and prompt format (`tokenizer`)."""

from vlajax.model.family import register_family
from vlajax.model.pi0.config import GemmaConfig, Pi0Config, preset
from vlajax.model.pi0.family import Pi0Family, Pi0Policy
from vlajax.model.pi0.model import Pi0, make_attn_mask, posemb_sincos

__all__ = ["FAMILY", "GemmaConfig", "Pi0", "Pi0Config", "Pi0Policy", "make_attn_mask", "posemb_sincos", "preset"]

FAMILY = register_family(Pi0Family())
