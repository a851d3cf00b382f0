"""Tokenizers, all local (nothing is ever downloaded).

Specs (`--tokenizer SPEC` of pretrain-prep):
  byte              bytes 0-255, then <|endoftext|>=256, <|startoftext|>=257 (vocab 258); no dependency
  hf:PATH           a Hugging Face `tokenizer.json`, or a directory holding one
  tiktoken:PATH     a local `.tiktoken` BPE file (needs the optional extra pretrain[tiktoken])
  bpe:VOCAB_SIZE    train a byte-level BPE on the input (pretrain-prep only; see `train_bpe`)

`load_tokenizer(spec)` and `tokenizer_from_manifest(dir)` return an object with
encode / encode_batch / decode / vocab_size / eos_id / bos_id.
"""
from __future__ import annotations

import base64
import itertools
import json
import os
from typing import Iterable, Optional

import numpy as np

from pretrain.errors import UserError

EOT = "<|endoftext|>"
EOS_CANDIDATES = ["<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]"]
BOS_CANDIDATES = ["<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "[CLS]"]


class Tokenizer:
    """Common interface. `encode_arrays` is the fast path used by pretrain-prep."""

    kind = "base"
    spec = ""
    vocab_size: int = 0
    eos_id: Optional[int] = None
    bos_id: Optional[int] = None
    file: Optional[str] = None  # the file this tokenizer was loaded from (None for byte)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def encode_arrays(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(all ids concatenated as int64, length of each text's ids)."""
        out = self.encode_batch(texts)
        lengths = np.fromiter((len(x) for x in out), dtype=np.int64, count=len(out))
        flat = np.fromiter(itertools.chain.from_iterable(out), dtype=np.int64, count=int(lengths.sum()))
        return flat, lengths

    def special_tokens(self) -> dict:
        return {}


class ByteTokenizer(Tokenizer):
    kind = "byte"
    spec = "byte"

    def __init__(self):
        self.vocab_size = 258
        self.eos_id = 256
        self.bos_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts):
        return [list(t.encode("utf-8")) for t in texts]

    def encode_arrays(self, texts):
        bs = [t.encode("utf-8") for t in texts]
        lengths = np.fromiter((len(b) for b in bs), dtype=np.int64, count=len(bs))
        flat = np.frombuffer(b"".join(bs), dtype=np.uint8).astype(np.int64)
        return flat, lengths

    def decode(self, ids) -> str:
        a = np.asarray(ids, dtype=np.int64)
        return a[(a >= 0) & (a < 256)].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def special_tokens(self):
        return {EOT: 256, "<|startoftext|>": 257}


def _import_tokenizers():
    try:
        import tokenizers  # noqa: F401
    except ImportError as e:  # it is a core dependency, but say so clearly
        raise UserError("the 'tokenizers' package is missing: pip install tokenizers") from e
    return tokenizers


class HFTokenizer(Tokenizer):
    kind = "hf"

    def __init__(self, path: str, spec: Optional[str] = None):
        tokenizers = _import_tokenizers()
        self.file = path
        self.spec = spec or f"hf:{path}"
        try:
            self.tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the library raises a bare Exception on malformed files
            raise UserError(f"{path}: not a valid Hugging Face tokenizer.json ({e})") from None
        self.vocab_size = int(self.tok.get_vocab_size(with_added_tokens=True))
        vocab = self.tok.get_vocab(with_added_tokens=True)
        cfg = _tokenizer_config(os.path.dirname(path))
        self.eos_id = _pick(vocab, [cfg.get("eos_token")] + EOS_CANDIDATES)
        self.bos_id = _pick(vocab, [cfg.get("bos_token")] + BOS_CANDIDATES)
        self._special = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items()} \
            if hasattr(self.tok, "get_added_tokens_decoder") else {}
        self._fast = hasattr(self.tok, "encode_batch_fast")

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        enc = self.tok.encode_batch_fast if self._fast else self.tok.encode_batch
        return [e.ids for e in enc(list(texts), add_special_tokens=False)]

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def special_tokens(self):
        return dict(sorted(self._special.items(), key=lambda kv: kv[1]))


def _tokenizer_config(d: str) -> dict:
    p = os.path.join(d, "tokenizer_config.json")
    try:
        with open(p, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return {}
    out = {}
    for k in ("eos_token", "bos_token"):
        v = cfg.get(k)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            out[k] = v
    return out


def _pick(vocab: dict, names) -> Optional[int]:
    for n in names:
        if n and n in vocab:
            return int(vocab[n])
    return None


# Regexes and special tokens of the public tiktoken encodings, chosen by file name.
_GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_CL100K_PAT = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
               r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
_O200K_PAT = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""", r"""\s+""",
])
_TIKTOKEN_KNOWN = {
    "o200k": (_O200K_PAT, {EOT: 199999, "<|endofprompt|>": 200018}),
    "cl100k": (_CL100K_PAT, {EOT: 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                             "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}),
    "p50k": (_GPT2_PAT, {EOT: 50256}),
    "r50k": (_GPT2_PAT, {EOT: 50256}),
    "gpt2": (_GPT2_PAT, {EOT: 50256}),
}


class TiktokenTokenizer(Tokenizer):
    kind = "tiktoken"

    def __init__(self, path: str, spec: Optional[str] = None, variant: Optional[str] = None):
        try:
            import tiktoken
        except ImportError:
            raise UserError(
                f"tokenizer {spec or path!r} needs tiktoken, an optional extra: pip install 'pretrain[tiktoken]'"
            ) from None
        self.file = path
        self.spec = spec or f"tiktoken:{path}"
        ranks = {}
        try:
            with open(path, "rb") as f:
                for ln, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    tok, rank = line.split()
                    ranks[base64.b64decode(tok)] = int(rank)
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: not a .tiktoken file (lines of 'base64-token rank'): {e}") from None
        name = (variant or os.path.basename(path)).lower()
        pat, special, self.variant = None, None, None
        for key, (p, s) in _TIKTOKEN_KNOWN.items():
            if key in name:
                pat, special, self.variant = p, dict(s), key
                break
        if pat is None:
            pat, special = _CL100K_PAT, {EOT: len(ranks)}
        self.enc = tiktoken.Encoding(name=os.path.splitext(os.path.basename(path))[0], pat_str=pat,
                                     mergeable_ranks=ranks, special_tokens=special)
        self._special = special
        self.vocab_size = max(max(ranks.values()), max(special.values())) + 1
        self.eos_id = special.get(EOT)
        self.bos_id = None

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts):
        return self.enc.encode_ordinary_batch(list(texts), num_threads=1)

    def decode(self, ids):
        ids = [int(i) for i in ids if int(i) not in self._special.values()]
        return self.enc.decode(ids, errors="replace")

    def special_tokens(self):
        return dict(self._special)


def _resolve_hf_path(p: str, spec: str) -> str:
    if os.path.isdir(p):
        f = os.path.join(p, "tokenizer.json")
        if os.path.isfile(f):
            return f
        raise UserError(f"tokenizer {spec!r}: directory {p} has no tokenizer.json")
    if os.path.isfile(p):
        return p
    raise UserError(
        f"tokenizer {spec!r}: no such file or directory {p!r}. Nothing is downloaded: save the tokenizer "
        f"locally first (e.g. on a machine with network: `from tokenizers import Tokenizer; "
        f"Tokenizer.from_pretrained('gpt2').save('gpt2-tokenizer.json')`, or copy tokenizer.json from a "
        f"Hugging Face model repo) and pass hf:/path/to/tokenizer.json"
    )


def load_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer named by `spec` ('byte', 'hf:PATH', 'tiktoken:PATH'). UserError if unusable.

    'bpe:N' is trained by pretrain-prep from the corpus; afterwards load it with
    `tokenizer_from_manifest(output_dir)` or 'hf:output_dir/tokenizer.json'.
    """
    if not isinstance(spec, str) or not spec:
        raise UserError("tokenizer spec must be a non-empty string: byte, hf:PATH, tiktoken:PATH or bpe:VOCAB_SIZE")
    if spec == "byte":
        return ByteTokenizer()
    kind, _, arg = spec.partition(":")
    if kind == "hf" and arg:
        return HFTokenizer(_resolve_hf_path(os.path.expanduser(arg), spec), spec)
    if kind == "tiktoken" and arg:
        p = os.path.expanduser(arg)
        if not os.path.isfile(p):
            raise UserError(
                f"tokenizer {spec!r}: no such file {p!r}. Nothing is downloaded: copy the .tiktoken file "
                f"(e.g. cl100k_base.tiktoken from openaipublic.blob.core.windows.net) to this machine and pass "
                f"tiktoken:/path/to/file.tiktoken"
            )
        return TiktokenTokenizer(p, spec)
    if kind == "bpe":
        raise UserError(f"tokenizer {spec!r} is trained by pretrain-prep; load the trained one with "
                        f"tokenizer_from_manifest(DIR) or hf:DIR/tokenizer.json")
    raise UserError(f"unknown tokenizer spec {spec!r}: use byte, hf:PATH, tiktoken:PATH or bpe:VOCAB_SIZE")


def parse_bpe_spec(spec: str) -> Optional[int]:
    """VOCAB_SIZE of 'bpe:VOCAB_SIZE', None for other specs; UserError when malformed."""
    if not spec.startswith("bpe:"):
        return None
    try:
        n = int(spec[4:])
    except ValueError:
        raise UserError(f"tokenizer {spec!r}: expected bpe:VOCAB_SIZE with an integer size, e.g. bpe:32000") from None
    if n < 257 or n >= 2**31:
        raise UserError(f"tokenizer {spec!r}: vocabulary size must be at least 257 (256 bytes + <|endoftext|>)")
    return n


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str) -> HFTokenizer:
    """Train a byte-level BPE (ByteLevel pre-tokenizer and decoder, special token <|endoftext|> = id 0)."""
    tokenizers = _import_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tmp = out_path + ".tmp"
    tok.save(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out_path)
    return HFTokenizer(out_path)


def tokenizer_from_manifest(directory: str) -> Tokenizer:
    """The tokenizer recorded in `directory/manifest.json` (its file is stored beside the shards)."""
    from pretrain.data.manifest import read_manifest

    m = read_manifest(directory)
    t = m["tokenizer"]
    kind = t.get("type")
    if kind == "byte":
        return ByteTokenizer()
    f = t.get("file")
    if not f:
        raise UserError(f"{directory}/manifest.json: tokenizer entry has no file")
    path = os.path.join(directory, f)
    if not os.path.isfile(path):
        raise UserError(f"{path}: tokenizer file named by the manifest is missing")
    if kind == "hf":
        tok = HFTokenizer(path, t.get("spec"))
    elif kind == "tiktoken":
        tok = TiktokenTokenizer(path, t.get("spec"), t.get("variant"))
    else:
        raise UserError(f"{directory}/manifest.json: unknown tokenizer type {kind!r}")
    if t.get("vocab_size") is not None and tok.vocab_size != int(t["vocab_size"]):
        raise UserError(f"{path}: vocabulary size {tok.vocab_size} differs from the manifest's {t['vocab_size']}")
    return tok


def checkpoint_tokenizer(tokenizer_dir, override: Optional[str], where) -> Tokenizer:
    """`override` (a --tokenizer SPEC) when given, else the run's tokenizer copy `tokenizer_dir`
    of checkpoint `where` (`checkpoint.store.tokenizer_dir`; pretrain-generate, pretrain-eval)."""
    if override:
        return load_tokenizer(override)
    if not tokenizer_dir:
        raise UserError(f"{where}: this run has no recorded tokenizer (synthetic data?); pass --tokenizer SPEC")
    return tokenizer_from_manifest(tokenizer_dir)
