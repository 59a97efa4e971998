"""The pipeline's tokenizer: a byte-level BPE trained with Hugging Face ``tokenizers``, or a
model's tokenizer reused as is.

The saved directory holds ``tokenizer.json``, ``tokenizer_config.json`` and
``special_tokens_map.json``, so ``transformers.AutoTokenizer.from_pretrained(dir)`` loads it
as a ``PreTrainedTokenizerFast`` with ``eos_token`` set. Training is deterministic: the
sample is chosen by document-id hash and fed in a fixed order.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crucible.trainer.config.data import TokenizerConfig
from crucible.trainer.stage_io import SpecError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|begin_of_text|>"
UNK_TOKEN = "<|unk|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, BOS_TOKEN, UNK_TOKEN]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class TokenizerSourceError(SpecError):
    """The tokenizer named by ``tokenizer.source`` cannot be used; the message says why."""


@dataclass(frozen=True)
class TokenizerInfo:
    vocab_size: int
    eos_id: int
    eos_token: str
    sha256: str
    origin: str

    def to_json(self) -> dict[str, Any]:
        return {
            "vocabSize": self.vocab_size,
            "eosId": self.eos_id,
            "eosToken": self.eos_token,
            "sha256": self.sha256,
            "origin": self.origin,
        }


def train_bpe(texts: Iterable[str], config: TokenizerConfig, out_dir: Path) -> TokenizerInfo:
    """Train a byte-level BPE on ``texts`` and save it to ``out_dir`` (written atomically per file)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return save(tok, out_dir, origin="trained")


def save(tok: Any, out_dir: Path, origin: str, config_extra: dict[str, Any] | None = None) -> TokenizerInfo:
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_json = tok.to_str(pretty=False).encode()
    eos_token = (config_extra or {}).get("eos_token", EOS_TOKEN)
    eos_id = tok.token_to_id(eos_token)
    if eos_id is None:
        raise TokenizerSourceError(f"the tokenizer has no id for its EOS token {eos_token!r}")
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "bos_token": BOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": UNK_TOKEN,
        "model_max_length": 1_000_000_000,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    }
    if config_extra:
        tokenizer_config = dict(config_extra)
    special_map = {k: tokenizer_config[k] for k in ("eos_token", "bos_token", "pad_token", "unk_token") if k in tokenizer_config}
    _atomic(out_dir / "tokenizer.json", tokenizer_json)
    _atomic(out_dir / "tokenizer_config.json", json.dumps(tokenizer_config, indent=2, sort_keys=True).encode())
    _atomic(out_dir / "special_tokens_map.json", json.dumps(special_map, indent=2, sort_keys=True).encode())
    return TokenizerInfo(
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        eos_id=int(eos_id),
        eos_token=eos_token,
        sha256=hashlib.sha256(tokenizer_json).hexdigest(),
        origin=origin,
    )


def adopt(source_dir: Path, out_dir: Path, origin: str) -> TokenizerInfo:
    """Copy a model's tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) into ``out_dir``."""
    from tokenizers import Tokenizer

    tj = source_dir / "tokenizer.json"
    if not tj.is_file():
        raise TokenizerSourceError(
            f"tokenizer.source: {origin} has no tokenizer.json; point it at a Hugging Face model "
            "directory saved with a fast tokenizer"
        )
    tok = Tokenizer.from_file(str(tj))
    cfg_path = source_dir / "tokenizer_config.json"
    cfg: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    eos = cfg.get("eos_token")
    if isinstance(eos, dict):  # AddedToken serialized
        eos = eos.get("content")
    if not eos:
        raise TokenizerSourceError(
            f"tokenizer.source: {origin}/tokenizer_config.json sets no eos_token; the shards need one "
            "to mark document ends"
        )
    cfg = {**cfg, "eos_token": eos}
    cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    return save(tok, out_dir, origin=origin, config_extra=cfg)


def load(directory: Path) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(directory / "tokenizer.json"))


def _atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
