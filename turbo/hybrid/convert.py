"""Turn a Llama checkpoint into a Llama-Mamba2 hybrid: ``python -m turbo.hybrid.convert SRC OUT --attention-layers 2,5``.

MambaInLlama's initialisation (Wang et al. 2024, section 3): attention and a linear-attention-like
Mamba2 read the same projections, so each converted layer's mixer starts from its attention's weights:

    x <- V (v_proj),  B <- K (k_proj),  C <- Q (q_proj),  out_proj <- O (o_proj)

With grouped-query attention K and V have fewer heads than Q; the mixer has one state group per query
head (``n_groups = n_heads``, ``d_state = head_dim``), so each K/V head's rows are repeated for the query
heads that shared it, as attention itself does. What attention has no counterpart for starts fresh,
seeded: the gate z and the step dt rows of ``in_proj`` (normal, std 0.02), ``dt_bias`` (softplus of it is
log-uniform in [1e-3, 0.1]), ``A_log = log(U[1, 16])``, ``D = 1``, the gated norm's weight 1, and the conv
as the identity (the last tap 1, so at the start x, B and C are the projections themselves, through SiLU).
MLPs, norms and embeddings are copied; the layers in ``--attention-layers`` are copied whole.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
from pathlib import Path

import torch

from turbo.ladder.convert import TOKENIZER_FILES
from turbo.zoo.presets import model_dir

from .model import HybridLlama, HybridLlamaConfig, save_model

logger = logging.getLogger(__name__)


def hybrid_config(llama_config: dict, attention_layers: list[int]) -> HybridLlamaConfig:
    """The hybrid of a Llama config.json; raises ValueError for what cannot be converted."""
    archs = llama_config.get("architectures") or []
    if llama_config.get("model_type") != "llama" or "LlamaForCausalLM" not in archs:
        raise ValueError(f"not a Llama checkpoint: model_type={llama_config.get('model_type')!r} architectures={archs}")
    from turbo.llama import LlamaShape

    shape = LlamaShape.hf_fields(llama_config)
    return HybridLlamaConfig(**shape, attention_layers=tuple(attention_layers), mamba_n_heads=shape["num_attention_heads"],
                             mamba_head_dim=shape["head_dim"], mamba_n_groups=shape["num_attention_heads"],
                             mamba_d_state=shape["head_dim"])


def _repeat_heads(w: torch.Tensor, n_kv_heads: int, n_rep: int) -> torch.Tensor:
    """(n_kv_heads * head_dim, hidden) -> (n_kv_heads * n_rep * head_dim, hidden): each head's rows n_rep times."""
    return w.unflatten(0, (n_kv_heads, -1)).repeat_interleave(n_rep, dim=0).flatten(0, 1)


@torch.no_grad()
def init_mixer_from_attention(mixer, attn: dict[str, torch.Tensor], n_kv_heads: int, gen: torch.Generator) -> None:
    """Fills a Mamba2Mixer from one Llama attention's q/k/v/o weights (names without the layer prefix)."""
    cfg = mixer.cfg
    n_rep = cfg.n_heads // n_kv_heads
    z = torch.randn(cfg.d_inner, cfg.hidden_size, generator=gen) * 0.02
    dt = torch.randn(cfg.n_heads, cfg.hidden_size, generator=gen) * 0.02
    x = _repeat_heads(attn["v_proj.weight"], n_kv_heads, n_rep)
    B = _repeat_heads(attn["k_proj.weight"], n_kv_heads, n_rep)
    mixer.in_proj.weight.copy_(torch.cat([z, x, B, attn["q_proj.weight"], dt]))
    mixer.out_proj.weight.copy_(attn["o_proj.weight"])
    mixer.conv1d.weight.zero_()
    mixer.conv1d.weight[:, 0, -1] = 1.0  # identity: the current position only
    mixer.conv1d.bias.zero_()
    dt0 = torch.exp(torch.rand(cfg.n_heads, generator=gen) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    mixer.dt_bias.copy_(dt0 + torch.log(-torch.expm1(-dt0)))  # softplus(dt_bias) = dt0
    mixer.A_log.copy_(torch.log(torch.empty(cfg.n_heads).uniform_(1, 16, generator=gen)))
    mixer.D.fill_(1.0)
    mixer.norm.weight.fill_(1.0)


@torch.no_grad()
def convert_state(llama_state: dict[str, torch.Tensor], cfg: HybridLlamaConfig, seed: int = 0) -> HybridLlama:
    """The hybrid initialised from a Llama state dict (checkpoint names)."""
    gen = torch.Generator().manual_seed(seed)
    model = HybridLlama(cfg)
    own = model.state_dict()
    copied = {k: v for k, v in llama_state.items() if k in own and ".self_attn." not in k}
    for i in cfg.attention_layers:
        prefix = f"model.layers.{i}.self_attn."
        copied.update({k: v for k, v in llama_state.items() if k.startswith(prefix)})
    if cfg.tie_word_embeddings:
        copied["lm_head.weight"] = llama_state["model.embed_tokens.weight"]
    model.load_state_dict(copied, strict=False)
    for i in cfg.mamba_layers:
        prefix = f"model.layers.{i}.self_attn."
        attn = {k[len(prefix):]: v.float() for k, v in llama_state.items() if k.startswith(prefix)}
        init_mixer_from_attention(model.model.layers[i].mamba, attn, cfg.num_key_value_heads, gen)
    return model.eval()


def convert(src: str | Path, out: str | Path, attention_layers: list[int], seed: int = 0) -> HybridLlama:
    """Writes the hybrid of the Llama checkpoint ``src`` into ``out``; returns the model."""
    from safetensors.torch import load_file

    src, out = Path(src), Path(out)
    llama_config = json.loads((src / "config.json").read_text())
    cfg = hybrid_config(llama_config, attention_layers)
    model = convert_state({k: v.float() for k, v in load_file(str(src / "model.safetensors")).items()}, cfg, seed)
    save_model(model, out, llama_config)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    logger.info("converted %s -> %s (attention layers %s, Mamba2 layers %s)", src, out, list(attention_layers),
                cfg.mamba_layers)
    return model


def parse_layers(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="a Llama checkpoint directory, or an embedded model name (turbo-tiny)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--attention-layers", type=parse_layers, required=True,
                        help="comma-separated layers that stay attention (the others become Mamba2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights attention has no counterpart for")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        src = model_dir(args.src)
        convert(src, args.out, args.attention_layers, args.seed)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
