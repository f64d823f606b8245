"""The tokenizer half of an exported GGUF file, as llama.cpp reads it.

llama.cpp does not run a tokenizer.json pipeline. For a byte-level BPE vocabulary it splits text with a fixed
list of regexes chosen by the file's ``tokenizer.ggml.pre`` name (``src/llama-vocab.cpp``), maps bytes to
GPT-2's alphabet, applies the file's merges, and cuts special tokens out first by their text. It normalizes
nothing. So the pre-tokenizer name is a behaviour, not a label.

lorafit names it the way llama.cpp's converter does, by what the tokenizer does to test text (the converter
hashes the ids of its ``CHK_TXT``; lorafit cannot use that table, because a tokenizer converted from GGUF by
transformers, or trained in-house, has no entry in it): for each llama.cpp pre-tokenizer below, the base's own
vocabulary and merges are rebuilt with that pre-tokenizer's splits and no normalizer, as llama.cpp will run
them, and the first one that gives the base tokenizer's ids on every sample text is the name. None matching
means llama.cpp would tokenize differently from training, and the export is refused with the first difference.
"""

from __future__ import annotations

import json

from lorafit.errors import LorafitError

# llama.cpp's converter's test text (convert_hf_to_gguf_update.py, CHK_TXT): whitespace runs, emoji joiners,
# digit runs, Khmer, CJK, Cyrillic, punctuation runs and contractions in both cases.
CHK_TXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
           "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
           "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE "
           "you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
SAMPLES = (
    CHK_TXT,
    "The quick brown fox jumps over the lazy dog on 3 March 2021. Convert 7-Apr-1957 to ISO 8601: 1957-04-07",
    "naïve café — cafe\u0301 (decomposed), ÀÉÎÕÜ ß ﬁ ① ½, it's 12:30!\r\n\ttabs\t\tand  double  spaces   ",
    "def f(x):\n    return x**2  # 100000 items\n\n\n",
)

# The pre-tokenizers lorafit can name, with llama.cpp's regexes copied from src/llama-vocab.cpp (llama.cpp as
# vendored by llama-cpp-python 0.3.36) and whether llama.cpp sets ignore_merges for that name. A regex list
# is applied in order, each splitting the previous pieces into matches and the text between them.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_UPPER_THEN_LOWER = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+SUFFIX"
                     r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*SUFFIX")
_TEKKEN = (_UPPER_THEN_LOWER.replace("SUFFIX", "") + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (_UPPER_THEN_LOWER.replace("SUFFIX", _CONTRACTIONS + "?")
          + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA_CPP_PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "gpt-2": ((_GPT2,), False),
    "smollm": ((r"\p{N}", _GPT2), False),  # digits one by one, then GPT-2's split (also starcoder, refact)
    "llama-bpe": ((_LLAMA3,), True),
    "qwen2": ((_QWEN2,), False),
    "tekken": ((_TEKKEN,), True),
    "gpt-4o": ((_GPT4O,), False),
}


def byte_level_spec(tokenizer) -> dict:
    """The base's tokenizer.json as a dict, refused unless it is byte-level BPE (what llama.cpp's "gpt2"
    tokenizer model is)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise LorafitError(f"the base's tokenizer is {model.get('type')} without a byte-level decoder; lorafit "
                           "exports byte-level BPE (GPT-2 style) tokenizers only")
    return spec


def as_llama_cpp(spec: dict, pre: str):
    """A ``tokenizers.Tokenizer`` with ``spec``'s vocabulary, merges and added tokens, splitting text as llama.cpp
    does for ``pre``: its regexes (each isolating its matches), GPT-2's byte alphabet, no normalizer."""
    from tokenizers import Tokenizer

    regexes, ignore_merges = LLAMA_CPP_PRE_TOKENIZERS[pre]
    splits = [{"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}
              for regex in regexes]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    rebuilt = {**spec, "normalizer": None, "post_processor": None,
               "pre_tokenizer": {"type": "Sequence", "pretokenizers": [*splits, byte_level]},
               "model": {**spec["model"], "ignore_merges": ignore_merges}}
    return Tokenizer.from_str(json.dumps(rebuilt))


def samples(tokenizer) -> list[str]:
    """The sample texts, plus a chat prompt rendered by the base's template (special tokens between texts)."""
    texts = list(SAMPLES)
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": SAMPLES[1]}, {"role": "assistant", "content": SAMPLES[2]},
                    {"role": "user", "content": " " + SAMPLES[3]}]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return texts


def first_difference(tokenizer, rebuilt, texts: list[str]) -> str | None:
    """None when ``rebuilt`` encodes every text to the base tokenizer's ids, else where they first differ."""
    for number, text in enumerate(texts):
        want = tokenizer(text, add_special_tokens=False).input_ids
        got = rebuilt.encode(text, add_special_tokens=False).ids
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            shown = tokenizer.decode(want[max(at - 2, 0):at + 2])
            return (f"sample {number + 1} near {shown!r}: ids {got[at:at + 3]} where the base gives "
                    f"{want[at:at + 3]}")
    return None


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for this tokenizer: the first of LLAMA_CPP_PRE_TOKENIZERS under which
    llama.cpp would encode every sample as the base tokenizer does (module docstring)."""
    spec = byte_level_spec(tokenizer)
    stripping = [entry["content"] for entry in spec.get("added_tokens", []) if entry.get("lstrip")
                 or entry.get("rstrip")]
    if stripping:
        raise LorafitError(f"the base's tokenizer strips spaces around the added tokens {stripping[:3]}; llama.cpp "
                           "does not (except for a few tokens it knows by name), so a GGUF would tokenize "
                           "differently from training and nothing was written")
    texts = samples(tokenizer)
    differences = {}
    for name in LLAMA_CPP_PRE_TOKENIZERS:
        difference = first_difference(tokenizer, as_llama_cpp(spec, name), texts)
        if difference is None:
            return name
        differences[name] = difference
    described = "; ".join(f"{name}: {difference}" for name, difference in differences.items())
    raise LorafitError("llama.cpp would tokenize differently from the base's tokenizer under every pre-tokenizer "
                       f"lorafit can name ({described[:600]}); a GGUF would not read text as training did, so "
                       "nothing was written (a normalizer, a prefix space or an unusual split can cause this)")


def check_read_back(tokenizer, read_back, pre: str) -> None:
    """The vocabulary and merges read back from the written file (``read_back``: transformers' GGUF reader),
    split as llama.cpp splits for ``pre``, must encode every sample to the base's ids."""
    difference = first_difference(tokenizer, as_llama_cpp(byte_level_spec(read_back), pre), samples(tokenizer))
    if difference is not None:
        raise LorafitError(f"self-check failed: the tokenizer read back from the GGUF, split as llama.cpp splits "
                           f"for {pre!r}, encodes text differently from the base ({difference}); nothing was "
                           "written")


def write_tokenizer(writer, tokenizer, pre: str, vocab_size: int) -> None:
    """Tokens (byte-level spelling), their types, merges, special ids, add_bos and the chat template. The
    token list is padded to the model's ``vocab_size`` rows with unused tokens, as llama.cpp expects."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = {token_id: token for token, token_id in spec["model"]["vocab"].items()}
    added = {entry["id"]: entry for entry in spec.get("added_tokens", [])}
    vocab.update({token_id: entry["content"] for token_id, entry in added.items()})
    size = max(vocab_size, len(tokenizer), max(vocab) + 1)
    tokens, types = [], []
    for token_id in range(size):
        if token_id not in vocab:
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
        elif token_id in added:
            tokens.append(vocab[token_id])
            types.append(gguf.TokenType.CONTROL if added[token_id]["special"] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(vocab[token_id])
            types.append(gguf.TokenType.NORMAL)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    for attribute, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                           ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        if getattr(tokenizer, attribute, None) is not None:
            add(int(getattr(tokenizer, attribute)))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
