"""Turn a Llama checkpoint into a Ladder-Residual one: ``python -m turbo.ladder.convert SRC OUT``.

Same weights, same tokenizer, same transformers format; only config.json changes: the architecture
becomes ``LadderLlamaForCausalLM`` and ``ladder_start_layer`` says from which layer on the ladder
schedule runs (``--ladder-start-layer``, default 0: every layer; the paper's Llama-3.1-8B adaptation
converts the upper half). The converted model computes something else than the original until it is
adapted (``python -m turbo.ladder.adapt``): each sub-layer now reads a stream that lacks its
predecessor's output.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from turbo.zoo.presets import model_dir

from .model import ARCHITECTURE, CONFIG_FILE, LLAMA_ARCHITECTURE, WEIGHTS_FILE, LadderLlamaConfig, load_hf_config

logger = logging.getLogger(__name__)

# Everything of a transformers checkpoint directory that is not config.json or the weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def ladder_hf_config(llama_config: dict, ladder_start_layer: int) -> dict:
    """The ladder config.json of a Llama config.json; raises ValueError for what cannot be converted."""
    archs = llama_config.get("architectures") or []
    if llama_config.get("model_type") != "llama" or not set(archs) & {LLAMA_ARCHITECTURE, ARCHITECTURE}:
        raise ValueError(f"not a Llama checkpoint: model_type={llama_config.get('model_type')!r} architectures={archs}")
    converted = dict(llama_config, architectures=[ARCHITECTURE], ladder_start_layer=ladder_start_layer)
    LadderLlamaConfig.from_hf_dict(converted)  # raises ValueError for a start layer outside the model
    return converted


def convert(src: str | Path, out: str | Path, ladder_start_layer: int = 0) -> Path:
    """Writes the ladder checkpoint of the Llama checkpoint ``src`` into ``out``; returns ``out``."""
    src, out = Path(src), Path(out)
    if not (src / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{src} has no {WEIGHTS_FILE} (a single-file safetensors checkpoint is expected)")
    config = ladder_hf_config(load_hf_config(src), ladder_start_layer)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / WEIGHTS_FILE, out / WEIGHTS_FILE)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    logger.info("converted %s -> %s (ladder layers %d..%d)", src, out, ladder_start_layer,
                config["num_hidden_layers"] - 1)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="a Llama checkpoint directory, or an embedded model name (turbo-tiny)")
    parser.add_argument("out", type=Path, help="directory to write the ladder checkpoint into")
    parser.add_argument("--ladder-start-layer", type=int, default=0,
                        help="first layer that runs the ladder schedule (default 0: all layers)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        src = model_dir(args.src)
        convert(src, args.out, args.ladder_start_layer)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
