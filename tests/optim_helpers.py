"""Helpers of the optimizer tests (tests/pretrain, tests/papers/<optimizer paper>): a small random Llama, seeded
batches and gradients, a training loop, parameter comparisons. Importable from any test (tests/ is on sys.path
through tests/conftest.py). Importing ``one_thread`` into a test module makes it autouse there."""
import pytest
import torch


def tiny_model(seed: int = 0, vocab: int = 64, hidden: int = 32, inter: int = 64, heads: int = 2, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=heads, num_hidden_layers=layers, max_position_embeddings=64,
                      tie_word_embeddings=False, attn_implementation="eager")
    return LlamaForCausalLM(cfg).float()


def batches(n: int, seed: int = 0, vocab: int = 64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, 16), generator=g) for _ in range(n)]


def synthetic_grads(model, steps: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()} for _ in range(steps)]


def set_grads(model, grads: dict):
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()


def train(model, opt, data):
    for ids in data:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def assert_same_params(a, b, **tol):
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, msg=lambda m, n=na: f"{n}: {m}", **tol)


def max_abs_diff(a, b) -> float:
    return max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes: one intra-op thread (multi-threaded LAPACK SVD on a busy 2-core box is ~100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
