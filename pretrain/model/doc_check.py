"""The start-up self-check of packed-document training: does the configured attention path
really keep documents apart? (A mask the kernel silently ignores is the failure users of other
systems met: Megatron-LM#2357, Megatron-DeepSpeed's flash path.)

One tiny GPT with the run's model options (positions, norm, MLP, grouped-query attention) on
the run's device and attention path reads two documents in one window, A then B:
* with the mask: changing A's tokens must leave B's outputs as they were;
* with the mask and restarted positions: B's outputs must equal those of B alone at the start
  of a window;
* with restarted positions: B's position ids start at 0.
"""
from __future__ import annotations

import dataclasses

import torch

from pretrain.errors import UserError
from pretrain.model.documents import Documents
from pretrain.model.layers import use_document_path

_T, _A = 16, 6  # window length, length of document A (its last token is EOD)


def self_check(model_cfg, docs: Documents, device: torch.device, vocab_size: int) -> dict:
    """Raise UserError (one line) when the attention path or the positions mix documents; return
    the measured differences ({'b_change': ..., 'a_change': ..., 'b_alone': ...}) otherwise."""
    if not docs.segmented:
        return {}
    eod = docs.eod
    window, changed, alone = _windows(eod)
    doc, pos = docs.segments(window)
    got = {}
    if docs.positions:
        b_pos = pos[0, _A:].tolist()
        if b_pos[:3] != [0, 1, 2]:
            raise UserError(f"data.reset_position_ids: the start-up self-check found the second document's "
                            f"positions starting {b_pos[:3]}, not [0, 1, 2]; the EOD id {eod} does not split "
                            "the window (check data.eod_token_id)")
    if not docs.mask:
        return got
    model = _tiny(model_cfg, max(vocab_size, eod + 1), device)
    use_document_path(model, docs.path)
    with torch.no_grad():
        out = _logits(model, docs, window.to(device))
        out_changed = _logits(model, docs, changed.to(device))
        scale = max(1.0, float(out.abs().max()))
        got["a_change"] = float((out[:, :_A] - out_changed[:, :_A]).abs().max())
        got["b_change"] = float((out[:, _A:] - out_changed[:, _A:]).abs().max())
        if docs.positions:
            got["b_alone"] = float((out[:, _A:] - _logits(model, docs, alone.to(device))).abs().max())
    where = f"on the {docs.path!r} attention path ({device.type})"
    if got["b_change"] > 1e-5 * scale:
        raise UserError(f"data.reset_attention_mask: the start-up self-check failed {where}: changing the first "
                        f"document of a window changed the second document's outputs by {got['b_change']:.3g}, so "
                        "the attention ignores the document mask; set data.document_attention to another path "
                        "('sdpa' works on every device)")
    if got.get("b_alone", 0.0) > 1e-4 * scale:
        raise UserError(f"data.reset_attention_mask: the start-up self-check failed {where}: the second document's "
                        f"outputs differ by {got['b_alone']:.3g} from those of the same document alone; set "
                        "data.document_attention to another path ('sdpa' works on every device)")
    return got


def _windows(eod: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A + B, A' + B, B alone) as (1, T) token ids; A and A' end in EOD, no other token is EOD."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (3 * _T,), generator=g)
    ids[ids == eod] = 0 if eod != 0 else 1
    a, a2, b = ids[:_A].clone(), ids[_T:_T + _A].clone(), ids[2 * _T:3 * _T - _A]
    a[-1] = a2[-1] = eod
    return (torch.cat([a, b]).unsqueeze(0), torch.cat([a2, b]).unsqueeze(0), b.unsqueeze(0))


def _tiny(model_cfg, vocab_size: int, device: torch.device):
    from pretrain.model.gpt import GPT

    kv = None if (model_cfg.n_kv_head or model_cfg.n_head) == model_cfg.n_head else 1
    cfg = dataclasses.replace(model_cfg, n_layer=2, n_head=2, n_kv_head=kv, d_model=32, d_ff=None,
                              seq_len=_T, dropout=0.0, activation_checkpointing=False, init_std=0.2)
    return GPT(cfg, vocab_size, device=device, seed=0).eval()


def _logits(model, docs: Documents, idx: torch.Tensor) -> torch.Tensor:
    doc, pos = docs.segments(idx)
    return model(idx, doc=doc, pos=pos).float()
