"""A real third-party tagger with its ``nn.LSTM`` swapped for ``mtlfast.nn.SparseSharingLSTM``.

The model is ``BiRnnCrf`` of jidasheng/bi-lstm-crf (MIT), installed as published from PyPI
(``bi-lstm-crf==0.2.1``, requirements-thirdparty.txt, without its training app's dependencies): a
batched rewrite of the PyTorch tutorial's BiLSTM-CRF. What it does with its LSTM: ``batch_first=True``, padded
batches sorted by length and packed (``pack_padded_sequence`` in, ``pad_packed_sequence`` out,
hx left to default), then a linear-chain CRF: the forward algorithm for the loss and Viterbi
for the tags.

The swap is one name: while the model is built, ``nn.LSTM`` (what ``BiRnnCrf.__init__`` calls)
is ``SparseSharingLSTM``; not a line of the model changes. Both models are built under the same
seed and trained with the package's own optimizer (Adam, as in its ``app/train.py``) on the same
batches of a tiny synthetic tagging set. The published model is the oracle: nothing is compared
with a stored number.

Measured (``python tests/test_third_party_tagger.py``; 40 steps, Adam lr 1e-2, loss 12.9 -> 1.5):
the largest relative difference between the two models' losses over all steps is 3.1e-7 to
5.3e-7 (backends cpu and reference, 1 and 2 layers; Xeon, AVX-512) and 3.5e-7 to 6.3e-7 with
ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2; the Viterbi paths are identical.
LOSS_RTOL = 1e-5 leaves a margin of 15x.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import mtlfast
from mtlfast.nn import SparseSharingLSTM

# `make test` installs it; a machine without it (the offline GPU image) skips this file, saying why
pytest.importorskip("bi_lstm_crf", reason="the third-party tagger is not installed: pip install --no-deps "
                                          "-r requirements-thirdparty.txt")
from bi_lstm_crf import BiRnnCrf  # noqa: E402
from bi_lstm_crf.model import model as birnncrf  # noqa: E402  (the module that reads nn.LSTM)

VOCAB, TAGS, EMBEDDING, HIDDEN = 30, 4, 16, 32
SENTENCES, BATCH, EPOCHS, LR = 64, 16, 10, 1e-2
SEED = 0
LOSS_RTOL = 1e-5        # measured <= 6.3e-7: see the module docstring
PARAM_ATOL = 1e-5

CPU_BACKENDS = [name for name in ("cpu", "reference") if mtlfast.available_backends().get(name) is None]
# (backend, LSTM layers): each CPU backend, and two layers with the automatic choice (what a user gets)
CASES = [(name, 1) for name in CPU_BACKENDS] + [("auto", 2)]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the ops are tiny, and on a loaded machine a second thread makes each
    op wait for a scheduling quantum (~10x slower here under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tagging_set(seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded (SENTENCES, 12) word ids 1..VOCAB-1 (0 = padding, as the package reads it) and their
    tags: a word's tag depends on the word and on the previous word's tag (context matters)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 13, (SENTENCES,), generator=g)
    words = torch.randint(1, VOCAB, (SENTENCES, 12), generator=g)
    tags = torch.zeros_like(words)
    for t in range(12):
        previous = tags[:, t - 1] if t else torch.zeros(SENTENCES, dtype=torch.long)
        tags[:, t] = (words[:, t] % 3 + (previous == 2).long() * (words[:, t] % 2)) % TAGS
    pad = torch.arange(12) >= lengths[:, None]
    return words.masked_fill(pad, 0), tags.masked_fill(pad, 0)


def build(swap: bool, num_layers: int = 1) -> BiRnnCrf:
    """The package's model under SEED; with ``swap``, built while ``nn.LSTM`` is SparseSharingLSTM."""
    torch.manual_seed(SEED)
    with pytest.MonkeyPatch.context() as patch:
        if swap:
            patch.setattr(birnncrf.nn, "LSTM", SparseSharingLSTM)         # the one-name swap
        model = BiRnnCrf(VOCAB, TAGS, EMBEDDING, HIDDEN, num_rnn_layers=num_layers)
    assert torch.nn.LSTM is torch.nn.modules.rnn.LSTM                     # restored
    return model


def train(model: BiRnnCrf, words: torch.Tensor, tags: torch.Tensor):
    """The package's training step (app/train.py): zero_grad, loss, backward, Adam step, over
    fixed batches. Returns every step's loss and the Viterbi (scores, paths) before and after."""
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)

    def decode():
        model.eval()
        with torch.no_grad():
            scores, paths = model(words)
        model.train()
        return scores, paths

    before = decode()
    losses = []
    for _ in range(EPOCHS):
        for i in range(0, SENTENCES, BATCH):
            model.zero_grad()
            loss = model.loss(words[i:i + BATCH], tags[i:i + BATCH])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses, before, decode()


def run_both(backend: str, num_layers: int = 1):
    words, tags = tagging_set()
    runs = []
    for swap in (False, True):
        model = build(swap, num_layers)
        with contextlib.nullcontext() if backend == "auto" else mtlfast.use_backend(backend):
            runs.append((model, *train(model, words, tags)))
    return runs


def accuracy(paths, words, tags) -> float:
    mask = words > 0
    predicted = torch.zeros_like(tags)
    for b, path in enumerate(paths):
        predicted[b, :len(path)] = torch.tensor(path)
    return float((predicted == tags)[mask].double().mean())


@pytest.mark.parametrize(("backend", "num_layers"), CASES)
def test_swapped_tagger_trains_as_published(backend, num_layers):
    (ref, ref_losses, ref_before, ref_after), (ours, losses, before, after) = run_both(backend, num_layers)
    assert type(ref.rnn) is torch.nn.LSTM and type(ours.rnn) is SparseSharingLSTM
    assert len(losses) == len(ref_losses) == EPOCHS * SENTENCES // BATCH
    torch.testing.assert_close(torch.tensor(losses, dtype=torch.float64),
                               torch.tensor(ref_losses, dtype=torch.float64), rtol=LOSS_RTOL, atol=0)
    # Viterbi: the same paths, the same path scores, before and after training
    for (scores, paths), (ref_scores, ref_paths) in ((before, ref_before), (after, ref_after)):
        assert paths == ref_paths
        torch.testing.assert_close(scores, ref_scores, rtol=LOSS_RTOL, atol=1e-4)
    # the same parameters, by name (SparseSharingLSTM's are nn.LSTM's), after training
    theirs = dict(ref.named_parameters())
    mine = dict(ours.named_parameters())
    assert mine.keys() == theirs.keys()
    for name, value in mine.items():
        torch.testing.assert_close(value, theirs[name], rtol=0, atol=PARAM_ATOL, msg=name)
    # training did something: the comparison is not between two untrained models
    words, tags = tagging_set()
    assert ref_losses[-1] < 0.5 * ref_losses[0]
    assert accuracy(ref_after[1], words, tags) > accuracy(ref_before[1], words, tags) + 0.2


def test_swapped_tagger_loads_the_published_weights():
    """A state dict of the published model loads strictly into the swapped one (its masks stay
    all True) and back (strict=False: the masks are the only extra keys); both then give the same
    CRF loss and Viterbi paths."""
    ref, ours = build(False), build(True)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours.load_state_dict(ref.state_dict())
    assert ours.rnn.density(0) == 1.0
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("rnn.") and "mask" in k for k in unexpected), unexpected
    words, tags = tagging_set()
    with torch.no_grad():
        ref_loss, loss = ref.loss(words, tags), ours.loss(words, tags)
        (ref_scores, ref_paths), (scores, paths) = ref(words), ours(words)
    torch.testing.assert_close(loss, ref_loss, rtol=LOSS_RTOL, atol=0)
    assert paths == ref_paths
    torch.testing.assert_close(scores, ref_scores, rtol=LOSS_RTOL, atol=1e-4)


if __name__ == "__main__":  # prints the agreement measured (the docstring's numbers)
    torch.set_num_threads(1)
    for backend, layers in [(b, n) for b in CPU_BACKENDS for n in (1, 2)]:
        (_, a, _, (_, pa)), (_, b, _, (_, pb)) = run_both(backend, layers)
        rel = max(abs(x - y) / abs(x) for x, y in zip(a, b))
        print(f"{backend}, {layers} layer(s): max relative loss difference {rel:.2e}; "
              f"loss {a[0]:.3f} -> {a[-1]:.3f}; paths equal: {pa == pb}")
