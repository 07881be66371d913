"""Byte-level BPE tokenizers trained locally (no model hub), in the HF format vLLM loads.

`train_bpe_tokenizer` writes `tokenizer.json`, `tokenizer_config.json` (with a chat template, so
`/v1/chat/completions` works) and `special_tokens_map.json` into a checkpoint directory.
"""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterable
from pathlib import Path

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [PAD, BOS, EOS]

# Plain-text role markers keep the template independent of extra special tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "### {{ message['role'] }}:\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}### assistant:\n{% endif %}"
)

# A fixed, small set of CPython standard-library modules: present on every machine with Python, so
# tokenizers for random-weight test models are built offline and identically everywhere.
FACTORY_CORPUS_MODULES = ("textwrap.py", "string.py", "fnmatch.py", "glob.py", "shlex.py")


def stdlib_texts(names: Iterable[str]) -> list[str]:
    """Read CPython standard-library source files by their path relative to the stdlib root."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for name in names:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"standard-library file {path} is missing; this Python install is incomplete")
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
    return texts


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path):
    """Train a byte-level BPE tokenizer on `texts` and save it in HF format into `out_dir`.

    Token ids 0, 1, 2 are `<|pad|>`, `<|bos|>`, `<|eos|>`. Returns the `tokenizers.Tokenizer`.
    Deterministic for the same texts and vocab size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "add_bos_token": False,
        "model_max_length": 1 << 20,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, indent=2)
    )
    return tok
