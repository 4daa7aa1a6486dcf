"""Prompt tokenizer: SimpleVLA's prompt/BOS/29871/PAD conventions, the shipped tiny tokenizer, and the
trailing-"▁" logic on Llama-2-style tokenizer.json files built here (the real one cannot be
downloaded in CI)."""

from __future__ import annotations

import importlib.util
import json
import string
from pathlib import Path

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from vlajax.model.tokenizer import (ACTION_TOKEN_BEGIN, BOS_ID, PAD_ID, SPACE_ID, TINY_TOKENIZER_DIR,
                                    PromptTokenizer, load_tokenizer, prompt_text)

REPO = Path(__file__).resolve().parents[1]
SP = "\u2581"
HIGH_ID_WORD = "zebra"  # gets an id inside the action range in the Llama-style test tokenizer


def _llama_style_json(tmp: Path, form: str) -> Path:
    """A character-level Llama-2-shaped BPE tokenizer.json: <unk>/<s>/</s> = 0/1/2, byte fallback
    pieces 3..258, printable ASCII, "▁" = 29871, <PAD> = 32000, plus merges building "▁zebra" at an
    id inside the action range. `form` is "metaspace" (current converter: Metaspace pre-tokenizer,
    prepend_scheme="first", split=False) or "legacy" (Prepend("▁") + Replace(" ", "▁") normaliser)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for ch in string.printable:
        if not ch.isspace():
            vocab[ch] = len(vocab)
    vocab[SP] = SPACE_ID
    merges, prev = [], SP
    for k, ch in enumerate(HIGH_ID_WORD):
        merges.append((prev, ch))
        prev = prev + ch
        vocab[prev] = 31790 + k  # "▁zebra" ends at 31794 >= ACTION_TOKEN_BEGIN
    vocab["<PAD>"] = PAD_ID
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    if form == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SP, prepend_scheme="first", split=False)
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(SP), normalizers.Replace(" ", SP)])
    tok.decoder = decoders.Sequence([decoders.Replace(SP, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>", "<PAD>")])
    out = tmp / form
    out.mkdir()
    tok.save(str(out / "tokenizer.json"))
    return out


@pytest.fixture(scope="module")
def tiny() -> PromptTokenizer:
    return load_tokenizer("tiny")


def test_prompt_text_matches_simplevla():
    assert prompt_text("Put the Bowl on the PLATE") == \
        "In: What action should the robot take to put the bowl on the plate?\nOut:"


def test_tiny_encode_layout(tiny):
    instr = ["move the gripper to the red block", "Put the black bowl in the bottom drawer of the cabinet and close it"]
    ids, mask = tiny.encode(instr)
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == mask.shape
    lengths = mask.sum(1)
    assert ids.shape[1] == lengths.max()
    for b, text in enumerate(instr):
        n = lengths[b]
        assert mask[b, :n].all() and not mask[b, n:].any()  # right padding
        assert ids[b, 0] == BOS_ID and ids[b, n - 1] == SPACE_ID
        assert (ids[b, n:] == PAD_ID).all()
        assert (ids[b, :n] < ACTION_TOKEN_BEGIN).all()
        # the ids spell the prompt followed by the training-time space before the action chars
        assert tiny.decode(ids[b, 1:n]) == prompt_text(text) + " "
        # raw tokenisation never ends in "▁" here, so exactly one 29871 was appended
        assert (ids[b, :n] == SPACE_ID).sum() == 1


def test_pad_to_and_too_long(tiny):
    ids, mask = tiny.encode(["reach the blue block"], pad_to=64)
    assert ids.shape == (1, 64) and (ids[0, mask[0].sum():] == PAD_ID).all()
    long = "pick up the ketchup and put it in the basket " * 4
    with pytest.raises(ValueError, match="ketchup.*longer than pad_to=32"):
        tiny.encode(["reach the blue block", long], pad_to=32)
    with pytest.raises(TypeError):
        tiny.encode("a single string")


def test_tiny_covers_corpus_and_falls_back_to_bytes(tiny):
    corpus = (TINY_TOKENIZER_DIR / "corpus.txt").read_text().splitlines()
    ids, mask = tiny.encode(corpus)
    used = ids[mask.astype(bool)]
    assert 0 not in used and used.max() < ACTION_TOKEN_BEGIN
    # an unseen non-ASCII word becomes UTF-8 byte pieces <0xNN> (ids 3..258), never <unk>
    ids, mask = tiny.encode(["grab the café mug"])
    row = ids[0, :mask[0].sum()]
    assert 0 not in row and {3 + 0xC3, 3 + 0xA9} <= set(row.tolist())
    assert tiny.decode(row[1:]) == prompt_text("grab the café mug") + " "


def test_tiny_asset_is_reproducible_from_script(tmp_path):
    spec = importlib.util.spec_from_file_location("build_tiny_tokenizer", REPO / "scripts" / "build_tiny_tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    corpus = (TINY_TOKENIZER_DIR / "corpus.txt").read_text().splitlines()
    mod.build([c for c in corpus if c.strip()]).save(str(tmp_path / "tokenizer.json"), pretty=True)
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == \
        json.loads((TINY_TOKENIZER_DIR / "tokenizer.json").read_text())


@pytest.mark.parametrize("form", ["metaspace", "legacy"])
def test_trailing_space_logic_on_llama_style_json(tmp_path, form):
    pt = PromptTokenizer(_llama_style_json(tmp_path, form))
    raw = Tokenizer.from_file(str(pt.path))
    prompts = ["In: x?\nOut:", "In: x?\nOut: ", "Out:"]
    ids, mask = pt.encode_prompts(prompts)
    for b, text in enumerate(prompts):
        r = raw.encode(text, add_special_tokens=False).ids
        row = ids[b, :mask[b].sum()].tolist()
        if text.endswith(" "):  # trailing space already tokenises to "▁" = 29871: nothing appended
            assert r[-1] == SPACE_ID and row == [BOS_ID] + r
        else:
            assert r[-1] != SPACE_ID and row == [BOS_ID] + r + [SPACE_ID]
        # the file's own post-processor adds the same BOS
        assert raw.encode(text).ids == [BOS_ID] + r
    # "\n" is not a piece: byte fallback to <0x0A> = 13, as in Llama-2
    assert 3 + 0x0A in ids[0].tolist()


def test_both_llama_json_forms_agree(tmp_path):
    instr = ["open the top drawer", "Turn ON the stove", "put the mug  on the plate"]
    a = PromptTokenizer(_llama_style_json(tmp_path, "metaspace")).encode(instr)
    b = PromptTokenizer(_llama_style_json(tmp_path, "legacy")).encode(instr)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_action_range_id_is_rejected(tmp_path):
    pt = PromptTokenizer(_llama_style_json(tmp_path, "metaspace"))
    with pytest.raises(ValueError, match=r"feed the zebra.*collide with the action tokens"):
        pt.encode(["pick up the cup", "feed the zebra"])


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    d = _llama_style_json(tmp_path, "metaspace")
    data = json.loads((d / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["<s>"], vocab["!"] = vocab["!"], vocab["<s>"]  # BOS no longer 1
    for t in data["added_tokens"]:
        if t["content"] == "<s>":
            t["id"] = vocab["<s>"]
    (d / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="'<s>' has id"):
        load_tokenizer(d)
    spm_only = tmp_path / "spm_only"
    spm_only.mkdir()
    (spm_only / "tokenizer.model").write_bytes(b"\x00")
    if importlib.util.find_spec("sentencepiece") is None:
        with pytest.raises(ImportError, match="add the checkpoint's tokenizer.json or `pip install sentencepiece`"):
            load_tokenizer(spm_only)
    else:
        with pytest.raises(Exception):  # a corrupt model file must not load silently
            load_tokenizer(spm_only)
