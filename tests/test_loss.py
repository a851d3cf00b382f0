"""The fused, chunked cross entropy (pretrain.model.loss) equals the materialised one."""
import pytest
import torch
import torch.nn.functional as F

from pretrain.model.loss import linear_cross_entropy


def _reference(h, w, t):
    return F.cross_entropy(F.linear(h, w).float().reshape(-1, w.shape[0]), t.reshape(-1))


@pytest.mark.parametrize("chunk", [7 * 50, 10**9])  # 7 tokens per chunk (uneven split), or one chunk
def test_loss_and_gradients_equal_the_full_cross_entropy(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 11, 16, generator=g, dtype=torch.float64).float().requires_grad_()
    w = (0.5 * torch.randn(50, 16, generator=g)).requires_grad_()
    t = torch.randint(0, 50, (3, 11), generator=g)
    t[0, :4] = -100  # ignored positions
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = linear_cross_entropy(h, w, t, chunk=chunk)
    ref = _reference(h2, w2, t)
    (2.5 * loss).backward()
    (2.5 * ref).backward()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) <= 1e-6 * max(1.0, abs(ref.item()))
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-6, atol=1e-6)


def test_no_grad_and_the_model_path():
    from pretrain.config.schema import ModelConfig
    from pretrain.model import GPT
    from pretrain.model.gpt import loss_fn

    torch.manual_seed(0)
    m = GPT(ModelConfig(n_layer=1, d_model=32, n_head=2, seq_len=8, vocab_size=64, dropout=0.0), 64)
    idx, tgt = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))
    fused = m(idx, tgt)
    ref = loss_fn(m(idx), tgt)
    assert abs(fused.item() - ref.item()) < 1e-6
    with torch.no_grad():
        assert abs(m(idx, tgt).item() - ref.item()) < 1e-6
