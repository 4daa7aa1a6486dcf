"""Prompt tokenizer for the OpenVLA-OFT / SimpleVLA policy (reference digest `openvla_oft.md` §1.6).

The policy's prompt is `"In: What action should the robot take to {instruction.lower()}?\\nOut:"`,
tokenised with the checkpoint's Llama-2 SentencePiece-BPE tokenizer, BOS (1) first, then the
"▁" token 29871 appended if the prompt does not already end with it (at training time the action
characters followed `"Out: "`, whose trailing space is the token 29871), right-padded with
`<PAD>` = 32000, as SimpleVLA's `rob_rollout.process_input` does.

Backends (host side, no hub access):
- `tokenizer.json` through the `tokenizers` library (preferred, always installed);
- `tokenizer.model` through `sentencepiece`, only if it is importable.

Trailing-space / "▁" behaviour. A Llama-2 `tokenizer.json` (as written by transformers'
`LlamaConverter`) either has a `Metaspace(replacement="▁", prepend_scheme="first", split=False)`
pre-tokenizer, or, in older (legacy) files, a normaliser `Prepend("▁") + Replace(" ", "▁")`. Both
turn every space into "▁" and put one "▁" before the start of the text, which is what SentencePiece
does with `add_dummy_prefix=True`. Hence `"...Out:"` ends with ":" (29901) and gets 29871 appended,
while `"...Out: "` ends with a lone "▁" piece (29871) and gets nothing appended: the result is the
same ids either way. This module never strips or normalises text (SimpleVLA does not either); it
tokenises with `add_special_tokens=False` and prepends BOS itself, so a post-processor that adds
EOS (some Llama exports) cannot leak into prompts.

Checked without the real Llama-2 file (no hub access): a SentencePiece BPE model trained with
Llama-2's trainer settings (byte_fallback, split_digits, identity normaliser, add_dummy_prefix,
no whitespace removal) on the instruction corpus, converted by transformers 4.40.1's
`LlamaTokenizerFast(from_slow=True)` (legacy normaliser form) and rewritten to the Metaspace form,
gives ids identical to `sentencepiece` under tokenizers 0.19.1 and 0.23.3 for all 426 prompts,
with and without a trailing space, and through both backends of this class. The one difference
is a text that *starts* with a space: the Metaspace form does not add a second "▁" there
(SentencePiece does); prompts start with "In:", so it does not arise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer

UNK_ID = 0
BOS_ID = 1
EOS_ID = 2
SPACE_ID = 29871  # SentencePiece "▁" piece
PAD_ID = 32000  # "<PAD>", added by OpenVLA after the 32000 Llama pieces
ACTION_TOKEN_BEGIN = 31744  # ids 31744..31999 are the 256 action bins; prompts must stay below
SPACE_PIECE = "\u2581"
EXPECTED_SPECIALS = {"<unk>": UNK_ID, "<s>": BOS_ID, "</s>": EOS_ID, SPACE_PIECE: SPACE_ID}

TINY_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny_tokenizer"


def prompt_text(instruction: str) -> str:
    """OFT / SimpleVLA prompt for a task instruction (lower-cased, not stripped)."""
    return f"In: What action should the robot take to {instruction.lower()}?\nOut:"


class _HFBackend:
    def __init__(self, path: Path):
        self.path = path
        self.tok = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)


class _SPMBackend:
    def __init__(self, path: Path):
        try:
            import sentencepiece
        except ImportError as e:
            raise ImportError(
                f"{path.parent} has tokenizer.model but no tokenizer.json, and `sentencepiece` is not "
                "installed: add the checkpoint's tokenizer.json or `pip install sentencepiece`") from e
        self.path = path
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text, out_type=int))

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([i for i in ids if i < self.sp.get_piece_size()])

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return None if (i == self.sp.unk_id() and token != self.sp.id_to_piece(i)) else i


class PromptTokenizer:
    """Turns task instructions into the padded prompt ids the policy consumes.

    Checks on load that the special ids are Llama-2's (<unk> 0, <s> 1, </s> 2, "▁" 29871, and
    <PAD> 32000 if the file defines it), because the model code relies on them.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            if (path / "tokenizer.json").is_file():
                path = path / "tokenizer.json"
            elif (path / "tokenizer.model").is_file():
                path = path / "tokenizer.model"
            else:
                raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {path}")
        elif not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        if path.suffix == ".json":
            self._backend = _HFBackend(path)
        elif path.suffix == ".model":
            self._backend = _SPMBackend(path)
        else:
            raise ValueError(f"unknown tokenizer file type (want tokenizer.json or tokenizer.model): {path}")
        self.path = path
        for token, want in EXPECTED_SPECIALS.items():
            got = self._backend.token_to_id(token)
            if got != want:
                raise ValueError(f"{path}: token {token!r} has id {got}, expected {want} (Llama-2 layout)")
        pad = self._backend.token_to_id("<PAD>")
        if pad is not None and pad != PAD_ID:
            raise ValueError(f"{path}: token '<PAD>' has id {pad}, expected {PAD_ID}")

    def encode_prompts(self, prompts: Sequence[str], pad_to: int | None = None,
                       names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Raw prompt strings -> (input_ids int32 (B, P), attention_mask int32 (B, P)).

        Row b is `[BOS] + ids(prompts[b]) (+ [29871] unless already last) + [PAD] * k`; the mask is
        1 on the non-pad part. P = `pad_to`, or the longest row if None. `names` (default: the
        prompts) label rows in error messages.
        """
        if isinstance(prompts, str):
            raise TypeError("encode_prompts expects a list of strings, got a single str")
        names = list(prompts) if names is None else list(names)
        rows = []
        for text, name in zip(prompts, names):
            ids = [BOS_ID] + self._backend.encode(text)
            if ids[-1] != SPACE_ID:
                ids.append(SPACE_ID)
            bad = [i for i in ids if i >= ACTION_TOKEN_BEGIN]
            if bad:
                raise ValueError(f"prompt for {name!r} contains token ids {bad} >= {ACTION_TOKEN_BEGIN}, "
                                 "which collide with the action tokens; rephrase the instruction")
            rows.append(ids)
        if not rows:
            raise ValueError("encode_prompts: empty batch")
        longest = max(len(r) for r in rows)
        width = longest if pad_to is None else pad_to
        for r, name in zip(rows, names):
            if len(r) > width:
                raise ValueError(f"prompt for {name!r} is {len(r)} tokens, longer than pad_to={width}")
        input_ids = np.full((len(rows), width), PAD_ID, np.int32)
        attention_mask = np.zeros((len(rows), width), np.int32)
        for b, r in enumerate(rows):
            input_ids[b, :len(r)] = r
            attention_mask[b, :len(r)] = 1
        return input_ids, attention_mask

    def encode(self, instructions: Sequence[str], pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Task instructions -> (input_ids int32 (B, P), attention_mask int32 (B, P)); see
        `prompt_text` and `encode_prompts`."""
        if isinstance(instructions, str):
            raise TypeError("encode expects a list of instructions, got a single str")
        return self.encode_prompts([prompt_text(i) for i in instructions], pad_to, names=instructions)

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text, dropping <PAD> (for logs and debugging)."""
        return self._backend.decode([int(i) for i in ids if int(i) != PAD_ID])

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)


def load_tokenizer(path_or_name: str | Path) -> PromptTokenizer:
    """"tiny" -> the shipped small tokenizer (`vlajax/assets/tiny_tokenizer`); otherwise a checkpoint
    directory holding tokenizer.json (or tokenizer.model), or the file itself."""
    if str(path_or_name) == "tiny":
        return PromptTokenizer(TINY_TOKENIZER_DIR / "tokenizer.json")
    return PromptTokenizer(path_or_name)


__all__ = [
    "PromptTokenizer", "load_tokenizer", "prompt_text", "UNK_ID", "BOS_ID", "EOS_ID", "SPACE_ID",
    "PAD_ID", "ACTION_TOKEN_BEGIN", "TINY_TOKENIZER_DIR",
]
