"""Documents inside a packed window: document ids, restarted positions, block-causal attention.

A training sample is a window of seq_len + 1 tokens cut from the concatenated documents, each
ending in an EOD token (Megatron's packing). Three options (data.reset_attention_mask,
data.reset_position_ids, data.eod_mask_loss) keep documents apart inside a window:

* block-causal attention: token t attends to token s only if s <= t and both lie in the same
  document;
* positions restart at 0 at the first token of each document (learned and RoPE positions);
* no loss where the *input* token is EOD (its target is the next document's first token).

An EOD ends its document: it belongs to the document before it, so token t's document id is
the number of EODs strictly before t. Everything here is computed on the device from the
micro-batch's own tokens and never cached across micro-batches (a mask shared by reference
between batches can drift: Megatron-LM#1269).

Attention paths (`Documents.path`, chosen by `choose_path`, logged once by the trainer):
'sdpa' -- `F.scaled_dot_product_attention` with a boolean block-causal mask, any device (on CPU
          per tile of 256 queries, against the keys their documents reach);
'flex' -- FlexAttention with a `BlockMask` (CUDA: compiled; it skips the masked tiles).
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # the loss's ignore index (F.cross_entropy's default)


@dataclasses.dataclass(frozen=True)
class Documents:
    """The document options of a run and the EOD id that separates documents."""

    eod: int
    mask: bool = False  # data.reset_attention_mask
    positions: bool = False  # data.reset_position_ids
    mask_loss: bool = False  # data.eod_mask_loss
    path: str = "sdpa"  # attention path for the mask: 'sdpa' or 'flex'

    @property
    def segmented(self) -> bool:
        """Whether the model needs per-token document information (mask or positions)."""
        return self.mask or self.positions

    def segments(self, idx: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(doc, pos) for the model's forward: document ids (B, T) when the mask is on, restarted
        position ids (B, T) when positions are; None for what is off."""
        if not self.segmented:
            return None, None
        doc = document_ids(idx, self.eod)
        return (doc if self.mask else None), (positions(doc) if self.positions else None)

    def labels(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The targets with IGNORE_INDEX where the input token is EOD (eod_mask_loss); a new
        tensor, the batch itself is never written."""
        return labels.masked_fill(inputs == self.eod, IGNORE_INDEX) if self.mask_loss else labels

    def describe(self) -> str:
        on = [name for name, flag in (("reset_attention_mask", self.mask), ("reset_position_ids", self.positions),
                                      ("eod_mask_loss", self.mask_loss)) if flag]
        how = f"; block-causal attention by {PATH_NAMES[self.path]}" if self.mask else ""
        return f"documents: {', '.join(on)} (EOD id {self.eod}){how}"


PATH_NAMES = {"sdpa": "SDPA with a boolean block-causal mask", "flex": "FlexAttention with a BlockMask"}


def choose_path(setting: str, device: torch.device) -> str:
    """'auto' -> FlexAttention on CUDA, SDPA with a mask elsewhere; otherwise the setting."""
    if setting == "auto":
        return "flex" if device.type == "cuda" and _flex_available() else "sdpa"
    return setting


def _flex_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def document_ids(idx: torch.Tensor, eod: int) -> torch.Tensor:
    """(B, T) int64: the number of EOD tokens strictly before each position (an EOD closes its
    own document)."""
    is_eod = (idx == eod).long()
    return is_eod.cumsum(dim=1) - is_eod


def document_starts(doc: torch.Tensor) -> torch.Tensor:
    """(B, T) int64: the window position where each token's document starts."""
    t = torch.arange(doc.size(1), device=doc.device).expand_as(doc)
    first = torch.ones_like(doc, dtype=torch.bool)
    first[:, 1:] = doc[:, 1:] != doc[:, :-1]
    return torch.where(first, t, torch.zeros_like(t)).cummax(dim=1).values


def positions(doc: torch.Tensor) -> torch.Tensor:
    """(B, T) int64 position ids that restart at 0 at the first token of each document."""
    return torch.arange(doc.size(1), device=doc.device) - document_starts(doc)


def block_causal_mask(doc: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool, True where query t may attend to key s: s <= t, same document."""
    T = doc.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
    return (doc.unsqueeze(2) == doc.unsqueeze(1)).unsqueeze(1) & causal


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc: Optional[torch.Tensor],
           path: str = "sdpa") -> torch.Tensor:
    """Causal attention of q, k, v (B, h, T, hd), block-causal within documents when `doc`
    (B, T) is given. `path` 'causal' ignores `doc` (only for the self-check's failure test)."""
    if doc is None or path == "causal":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if path == "flex":
        return _flex(q, k, v, doc)
    if q.device.type != "cpu" or torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=block_causal_mask(doc))
    # CPU: query tiles, each against the keys from the earliest document start in the tile on
    # (a mask computes every (query, key) pair, twice the causal kernel's work: with short
    # documents the tiles read a band near the diagonal instead, less than causal attention)
    out = [F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, k0:e], v[:, :, k0:e], attn_mask=m)
           for s, e, k0, m in _tiles_of(doc)]
    return out[0] if len(out) == 1 else torch.cat(out, dim=2)


TILE = 256  # query rows per tile of the CPU path (measured: docs/PERFORMANCE.md, "Packed documents")
_made: dict[tuple[int, str], object] = {}


def _once_per_doc(doc: torch.Tensor, what: str, make):
    """`make(doc)`, made once per `doc` tensor: every layer of a forward (and its recomputation
    under activation checkpointing) gets the same ids object. Dropped with the ids (a
    finalizer), so nothing outlives its micro-batch."""
    key = (id(doc), what)
    made = _made.get(key)
    if made is None:
        made = _made[key] = make(doc)
        weakref.finalize(doc, _made.pop, key, None)
    return made


def _tiles_of(doc: torch.Tensor) -> list[tuple[int, int, int, torch.Tensor]]:
    """[(first query, end, first key, mask tile)] of the CPU path, once per `doc` tensor."""
    return _once_per_doc(doc, "tiles", _make_tiles)


def _make_tiles(doc: torch.Tensor) -> list[tuple[int, int, int, torch.Tensor]]:
    T = doc.size(1)
    mask = block_causal_mask(doc)
    starts = list(range(0, T, TILE))
    first = document_starts(doc)[:, starts].amin(dim=0).tolist()
    return [(s, min(T, s + TILE), k0, mask[:, :, s:s + TILE, k0:s + TILE].contiguous())
            for s, k0 in zip(starts, first)]


_compiled_flex = None


def _block_mask(doc: torch.Tensor):
    """FlexAttention's BlockMask of block-causal attention within the documents of `doc` (B, T)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_doc_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc[b, q_idx] == doc[b, kv_idx])

    B, T = doc.shape
    return create_block_mask(same_doc_causal, B, None, T, T, device=doc.device)


def _flex(q, k, v, doc):
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex

    # Once per micro-batch, not per layer, except while a compiled block traces it.
    block_mask = _block_mask(doc) if torch.compiler.is_compiling() else _once_per_doc(doc, "block mask", _block_mask)
    if q.device.type != "cuda":  # the unfused reference (tests on CPU); quiet about it
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return flex_attention(q, k, v, block_mask=block_mask)
    if torch.compiler.is_compiling():  # inside a compiled block: traced with it
        return flex_attention(q, k, v, block_mask=block_mask)
    if _compiled_flex is None:  # eager CUDA: FlexAttention is only fast compiled
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask)
