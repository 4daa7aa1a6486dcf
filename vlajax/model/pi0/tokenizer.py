"""π0's prompt tokenizer: PaliGemma's SentencePiece model from a path the user gives (openpi users have
`paligemma_tokenizer.model` cached; nothing is downloaded), with openpi's π0 prompt format:

    ids = encode(prompt.strip() with "_" and newlines as spaces, BOS first) + encode("\\n")

right-padded with id 0 to `max_len` (mask False there), cut to `max_len` when longer (openpi warns and
cuts the same way)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["Pi0Tokenizer"]

log = logging.getLogger(__name__)


class Pi0Tokenizer:
    def __init__(self, path: str | Path, max_len: int = 48):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"π0 tokenizer {path} does not exist (PaliGemma's SentencePiece model, e.g. openpi's "
                                    "cached paligemma_tokenizer.model)")
        try:
            import sentencepiece
        except ImportError as e:
            raise ImportError("π0's tokenizer needs `sentencepiece`: pip install 'vlajax[pi0]'") from e
        self.path = path
        self.max_len = int(max_len)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))

    def encode_one(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """(max_len,) int32 ids and bool mask of one prompt."""
        text = prompt.strip().replace("_", " ").replace("\n", " ")
        ids = list(self.sp.encode(text, add_bos=True)) + list(self.sp.encode("\n"))
        if len(ids) > self.max_len:
            log.warning("prompt %r is %d tokens, cut to max_token_len=%d", prompt, len(ids), self.max_len)
            ids = ids[:self.max_len]
        n = len(ids)
        return (np.asarray(ids + [0] * (self.max_len - n), np.int32),
                np.asarray([True] * n + [False] * (self.max_len - n)))

    def encode(self, prompts: Sequence[str], pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(B, W) int32 ids and int32 mask (1 on tokens): W = `pad_to` (a decoder's fixed prompt width;
        a prompt longer than it raises), else max_len."""
        pairs = [self.encode_one(p) for p in prompts]
        ids, mask = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]).astype(np.int32)
        if pad_to is not None:
            longest = int(mask.sum(axis=1).max()) if len(prompts) else 0
            if longest > pad_to:
                name = prompts[int(mask.sum(axis=1).argmax())]
                raise ValueError(f"prompt for {name!r} is {longest} tokens, longer than pad_to={pad_to}")
            extra = pad_to - ids.shape[1]
            ids, mask = (np.pad(ids, ((0, 0), (0, extra))), np.pad(mask, ((0, 0), (0, extra)))) if extra >= 0 else (
                ids[:, :pad_to], mask[:, :pad_to])
        return ids, mask
