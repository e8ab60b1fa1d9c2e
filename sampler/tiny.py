"""Tiny Hugging Face-style checkpoints built locally, for the demos, tests and benchmarks.

Nothing here is needed to use the sampler; it exists because the demos and tests need real
checkpoints without a model hub: a ``config.json`` made with transformers' own config
classes (each architecture's recipe in ``converters/models/<name>.py``), a byte-level BPE
tokenizer trained on a few sentences, and random weights saved under HF names in torch
layout ``(out, in)``.

    from sampler.tiny import write_tiny_model
    path = write_tiny_model("runs/tiny", "Qwen3ForCausalLM", seed=0, num_layers=2)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from converters import architectures, get_architecture

#: Architectures with a tiny-model recipe.
ARCHITECTURES = tuple(a for a in architectures() if get_architecture(a).tiny is not None)
#: Tokens of the tiny tokenizer (the configs' vocab_size must be at least this).
TOKENIZER_SIZE = 320
#: Standard deviation of random linear weights.
WEIGHT_SCALE = 0.05

# Text the tokenizer is trained on: digits and arithmetic for the GRPO demo task,
# plus a few words so that generated text is readable.
_CORPUS = [
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "1+1=2 2+3=5 4+4=8 7+2=9 3+6=9 9+9=18 12+7=19",
    "Q: what is 3+4? A: 7",
    "hello world the quick brown fox jumps over the lazy dog",
    "answer question number sum count letters words yes no",
]


def train_tokenizer(vocab_size: int = TOKENIZER_SIZE):
    """A byte-level BPE tokenizer with <pad> (0), <eos> (1) and <unk> (2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 8, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _recipe(architecture: str):
    recipe = get_architecture(architecture).tiny
    if recipe is None:
        raise ValueError(f"{architecture} has no tiny-model recipe; known: {ARCHITECTURES}")
    return recipe


def hf_config(architecture: str = "Qwen3ForCausalLM", **overrides: Any):
    """A transformers config object for a small model of ``architecture``."""
    return _recipe(architecture).config(**overrides)


def random_hf_weights(config, *, seed: int = 0, scale: float = WEIGHT_SCALE) -> dict[str, np.ndarray]:
    """Random weights under HF names in torch layout, in the config's dtype."""
    return _recipe(config.architectures[0]).weights(config, np.random.default_rng(seed), scale)


def write_weights(path: str | Path, weights: dict[str, np.ndarray], *, max_shard_bytes: int | None = None) -> None:
    """Save ``weights`` as HF safetensors in ``path`` (sharded with an index if asked)."""
    from safetensors.numpy import save_file

    path = Path(path)
    for old in list(path.glob("*.safetensors")) + list(path.glob("*.safetensors.index.json")):
        old.unlink()
    if max_shard_bytes is None:
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in weights.items():
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": sum(a.nbytes for a in weights.values())}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_tiny_model(
    path: str | Path,
    architecture: str = "Qwen3ForCausalLM",
    *,
    seed: int = 0,
    weights: bool = True,
    **config_overrides: Any,
) -> Path:
    """Write config, tokenizer and (optionally) random weights of a tiny model to ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    tokenizer.save_pretrained(str(path))
    config_overrides.setdefault("eos_token_id", tokenizer.eos_token_id)
    config_overrides.setdefault("pad_token_id", tokenizer.pad_token_id)
    vocab = config_overrides.setdefault("vocab_size", 384)
    if vocab < len(tokenizer):
        raise ValueError(f"vocab_size {vocab} < tokenizer size {len(tokenizer)}")
    config = hf_config(architecture, **config_overrides)
    config.save_pretrained(str(path))
    (path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id})
    )
    if weights:
        write_weights(path, random_hf_weights(config, seed=seed))
    return path


#: Seed of the shared direction ``write_eos_prone_model`` adds to the embeddings.
EOS_DIRECTION_SEED = 123


def write_eos_prone_model(
    path: str | Path, *, seed: int = 0, eos_boost: float = 2.0, shared: float = 0.5, **config_overrides: Any
) -> Path:
    """A tiny Qwen3 (tied embeddings) that often ends its answers with EOS.

    Every embedding row gets a shared direction d (times ``shared``) and the EOS row gets d
    times ``eos_boost``: the residual stream carries d, so the EOS logit rises. A random tiny
    model almost never emits EOS, and Tunix's agentic learner drops every completion that
    uses its whole token budget, so such a model would leave it nothing to train on.
    """
    config_overrides.setdefault("tie_word_embeddings", True)
    path = write_tiny_model(path, "Qwen3ForCausalLM", seed=seed, **config_overrides)
    from safetensors.numpy import load_file

    weights = load_file(str(Path(path) / "model.safetensors"))
    eos = json.loads((Path(path) / "config.json").read_text())["eos_token_id"]
    name = "model.embed_tokens.weight"
    embedding = weights[name].astype(np.float32)
    direction = np.random.default_rng(EOS_DIRECTION_SEED).standard_normal(embedding.shape[1]).astype(np.float32)
    direction /= np.linalg.norm(direction)
    embedding += shared * direction
    embedding[eos] += eos_boost * direction
    weights[name] = embedding.astype(weights[name].dtype)
    write_weights(path, weights)
    return path
