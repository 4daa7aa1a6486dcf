"""Build the small Llama-2-shaped tokenizer shipped in `vlajax/assets/tiny_tokenizer/`.

Why: the tiny/small policy presets must run the exact prompt path of the 7B model (BOS, trailing
"▁" = 29871, <PAD> = 32000, prompt ids < 31744) without the 500 kB Llama-2 tokenizer, whose licence
and download we do not want in the package. So this is a Llama-style SentencePiece-BPE
`tokenizer.json`, trained with the `tokenizers` library on robot instructions:

- corpus: `corpus.txt` next to the asset, one instruction per line: every LIBERO task instruction
  (the `(:language ...)` line of each BDDL file of the installed `libero` package, and the name
  LIBERO's benchmark derives from each file name) plus the project's tabletop instructions ("move
  the gripper to the red block") and a few variants. `--refresh-corpus` regenerates it (needs
  `libero`); the default build reads the committed file, so the result is reproducible;
- training text: each line wrapped in the policy prompt (`prompt_text`), "\\n" replaced by " " so
  that newline stays a byte-fallback token (<0x0A> = 13) exactly as in Llama-2;
- model: BPE trained with whitespace+punctuation splitting (no merge crosses a word boundary), an
  initial alphabet of all printable ASCII plus "▁", byte fallback for anything else;
- id layout (sparse, like Llama-2 where it matters): <unk> 0, <s> 1, </s> 2, <0x00>..<0xFF> 3..258,
  learned pieces from 259 in training order, "▁" 29871, <PAD> 32000 (special). Everything
  normal text can produce is < 31744 (the first action token);
- runtime pipeline: Metaspace("▁", prepend_scheme="first", split=False) pre-tokenizer, Llama-2's
  decoder (Replace ▁->space, ByteFallback, Fuse, Strip 1 leading space), post-processor "<s> $A".

Usage: python scripts/build_tiny_tokenizer.py [--refresh-corpus] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import string
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from vlajax.model.tokenizer import (ACTION_TOKEN_BEGIN, BOS_ID, EOS_ID, PAD_ID, SPACE_ID, SPACE_PIECE,
                                    TINY_TOKENIZER_DIR, UNK_ID, load_tokenizer, prompt_text)

FIRST_LEARNED_ID = 259
COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "white", "black"]


def tabletop_instructions() -> list[str]:
    """The project's tabletop task ("move the gripper to the <colour> block") and close variants."""
    out = []
    for c in COLOURS:
        out += [f"move the gripper to the {c} block", f"reach the {c} block", f"touch the {c} cube",
                f"pick up the {c} block", f"push the {c} block to the left",
                f"push the {c} block to the right", f"put the {c} block on the plate",
                f"stack the {c} block on the other block", f"go to the {c} ball"]
    return out


def libero_instructions() -> list[str]:
    """Task language of every BDDL file in the installed `libero` package (both spellings)."""
    spec = importlib.util.find_spec("libero")  # does not import the package (it touches ~/.libero)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--refresh-corpus needs the `libero` package (pip install libero==0.1.1)")
    root = Path(list(spec.submodule_search_locations)[0]) / "libero" / "bddl_files"
    out = []
    for f in sorted(root.rglob("*.bddl")):
        m = re.search(r"\(:language\s+([^)]*)\)", f.read_text())
        if m:
            out.append(m.group(1).strip())
        # LIBERO's benchmark names a task by its file name minus the "<SCENE>_" prefix.
        name = f.stem
        m = re.search(r"SCENE\d+_", name)
        out.append(" ".join((name[m.end():] if m else name).split("_")))
    return out


def build(corpus: list[str]) -> Tokenizer:
    texts = [prompt_text(line).replace("\n", " ") for line in corpus]
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement=SPACE_PIECE, prepend_scheme="always", split=True),
         pre_tokenizers.Punctuation()])
    alphabet = [ch for ch in string.printable if not ch.isspace()] + [SPACE_PIECE]
    trainer = trainers.BpeTrainer(vocab_size=8000, min_frequency=1, show_progress=False,
                                  initial_alphabet=alphabet, special_tokens=[])
    trainer_tok.train_from_iterator(texts, trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]

    vocab = {"<unk>": UNK_ID, "<s>": BOS_ID, "</s>": EOS_ID}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    next_id = FIRST_LEARNED_ID
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        if piece == SPACE_PIECE:
            continue
        vocab[piece] = next_id
        next_id += 1
    vocab[SPACE_PIECE] = SPACE_ID
    # <PAD> lives in the model vocab (Llama-2/OpenVLA list it only under added_tokens): `tokenizers`
    # numbers added tokens len(vocab) + k on load, ignoring the ids in the file, which would
    # collide in this sparse vocab; a token already in the vocab keeps its id.
    vocab["<PAD>"] = PAD_ID
    if next_id > min(SPACE_ID, ACTION_TOKEN_BEGIN):
        raise SystemExit(f"too many learned pieces ({next_id - FIRST_LEARNED_ID}) for the id layout")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE_PIECE, prepend_scheme="first",
                                                 split=False)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE_PIECE, " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", BOS_ID)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t in ("<unk>", "<s>", "</s>", "<PAD>")])
    return tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=TINY_TOKENIZER_DIR)
    ap.add_argument("--refresh-corpus", action="store_true",
                    help="regenerate corpus.txt from the installed libero package first")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    corpus_path = args.out / "corpus.txt"
    if args.refresh_corpus:
        lines = sorted({s.lower() for s in libero_instructions() + tabletop_instructions()})
        corpus_path.write_text("\n".join(lines) + "\n")
    corpus = [ln for ln in corpus_path.read_text().splitlines() if ln.strip()]
    build(corpus).save(str(args.out / "tokenizer.json"), pretty=True)

    pt = load_tokenizer(args.out)  # validates the special ids
    ids, mask = pt.encode(corpus)
    used = ids[mask.astype(bool)]
    assert UNK_ID not in used and used.max() < ACTION_TOKEN_BEGIN, "corpus prompt hits <unk> or action ids"
    pieces = len(json.loads((args.out / "tokenizer.json").read_text())["model"]["vocab"])
    print(f"wrote {args.out / 'tokenizer.json'}: {pieces} pieces, {len(corpus)} corpus lines, "
          f"prompt lengths {int(mask.sum(1).min())}..{int(mask.sum(1).max())}")


if __name__ == "__main__":
    main()
