"""The EOD token that separates packed documents (data.reset_attention_mask, reset_position_ids,
eod_mask_loss), found and checked before any step.

The id comes from the data: the eos_id that pretrain-prep appended to every document, recorded
in each manifest. A Megatron prefix has no manifest: then data.eod_token_id names it. The checks
catch the ways a wrong EOD silently splits or merges documents: data prepared without EOD
(--no-eos), sources that disagree, an explicit id that is not the data's, and an id that is also
another special token -- the BOS pretrain-prep puts before every document, or a padding /
unknown token (torchtitan#3130).
"""
from __future__ import annotations

import re
from typing import Iterable, Optional

from pretrain.errors import UserError

# Special-token names that never end a document (matched case-insensitively).
_NOT_EOD = re.compile(r"pad|unk|mask|bos|begin|start|cls|sep", re.IGNORECASE)
_EOD_LIKE = re.compile(r"end|eos|eot|eod", re.IGNORECASE)


def resolve_eod(d, paths: Iterable[str], vocab_size: int) -> int:
    """The EOD id of the data section `d` whose sources are `paths` (train, validation and test),
    or UserError naming the source or field and the fix."""
    from pretrain.data.manifest import is_manifest_dir, read_manifest

    found: dict[int, list[str]] = {}
    bare = []
    manifests = []
    for path in dict.fromkeys(map(str, paths)):
        if not is_manifest_dir(path):
            bare.append(path)
            continue
        m = read_manifest(path)
        manifests.append((path, m))
        if not m.get("eos_appended", True) or m.get("eos_id") is None:
            raise UserError(f"{path}: its documents were prepared without an EOD token (pretrain-prep --no-eos, "
                            "or a tokenizer without one), so the data cannot tell where documents end; re-run "
                            "pretrain-prep without --no-eos, or turn off data.reset_attention_mask, "
                            "reset_position_ids and eod_mask_loss")
        found.setdefault(int(m["eos_id"]), []).append(path)
    if len(found) > 1:
        which = "; ".join(f"{eid} in {', '.join(ps)}" for eid, ps in sorted(found.items()))
        raise UserError(f"data.paths: the sources end their documents with different EOD ids ({which}); "
                        "prepare them with one tokenizer")
    eod: Optional[int] = next(iter(found), None)
    if d.eod_token_id is not None:
        if eod is not None and d.eod_token_id != eod:
            raise UserError(f"data.eod_token_id is {d.eod_token_id} but pretrain-prep ended the documents of "
                            f"{found[eod][0]} with {eod} (its manifest's eos_id); remove data.eod_token_id or set it "
                            f"to {eod}")
        eod = d.eod_token_id
    if eod is None:
        where = bare[0] if bare else "data.paths"
        raise UserError(f"{where}: a Megatron prefix has no manifest that names its EOD token; set "
                        "data.eod_token_id to the id that ends each document")
    if not 0 <= eod < vocab_size:
        raise UserError(f"data.eod_token_id {eod} is outside the vocabulary 0..{vocab_size - 1}")
    for path, m in manifests:
        _check_special(eod, path, m)
    return eod


def _check_special(eod: int, path: str, m: dict) -> None:
    """EOD must not also be the BOS that prep put before every document, nor a padding-like token."""
    if m.get("bos_prepended") and m.get("bos_id") == eod:
        raise UserError(f"{path}: the EOD id {eod} is also the BOS that pretrain-prep put before every document, "
                        "so each document would split in two; re-run pretrain-prep without --bos, or with a "
                        "tokenizer whose BOS differs from its EOD")
    names = [name for name, i in (m.get("tokenizer", {}).get("special_tokens") or {}).items() if int(i) == eod]
    for name in names:
        if _NOT_EOD.search(name) and not _EOD_LIKE.search(name):
            raise UserError(f"{path}: the EOD id {eod} is the tokenizer's special token {name!r}, not an "
                            "end-of-document token; set data.eod_token_id to the token that ends each document "
                            "(or re-prepare the data with a tokenizer whose eos token is right)")
