"""Property tests of the pure loss functions and the registry."""

import pytest
import torch
import torch.nn.functional as F

from kdship.errors import ConfigError
from kdship.losses import LOSSES, LossInputs, WeightedLoss, attention_kl, get_loss, hidden_cosine, hidden_mse, soft_kl

torch.manual_seed(0)


def test_soft_kl_is_zero_on_identical_logits_and_positive_otherwise():
    logits = torch.randn(8, 5)
    assert soft_kl(logits, logits, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_kl(torch.randn(8, 5), logits, 2.0).item() > 0


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_soft_kl_equals_torch_kl_div_times_t_squared(temperature):
    s, t = torch.randn(6, 3), torch.randn(6, 3)
    expected = F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1),
                        reduction="batchmean") * temperature**2
    assert soft_kl(s, t, temperature).item() == pytest.approx(expected.item(), rel=1e-5)


def test_soft_kl_mask_selects_rows():
    s, t = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, 1] = True
    assert soft_kl(s, t, 1.0, mask).item() == pytest.approx(soft_kl(s[0, 1:2], t[0, 1:2], 1.0).item(), rel=1e-5)


def test_hidden_losses_zero_on_identical_and_ignore_padding():
    h = [torch.randn(2, 5, 16) for _ in range(3)]
    mask = torch.ones(2, 5)
    assert hidden_mse(h, h, mask).item() == pytest.approx(0.0, abs=1e-7)
    assert hidden_cosine(h, h, mask).item() == pytest.approx(0.0, abs=1e-6)
    other = [x.clone() for x in h]
    mask[:, -1] = 0
    for x in other:
        x[:, -1] += 100.0  # only padded positions differ
    assert hidden_mse(other, h, mask).item() == pytest.approx(0.0, abs=1e-7)


def test_hidden_mse_matches_manual_value():
    s, t = torch.zeros(1, 2, 4), torch.ones(1, 2, 4)
    assert hidden_mse([s], [t]).item() == pytest.approx(1.0)


def test_attention_kl_zero_on_identical_and_averages_heads_when_counts_differ():
    a = torch.softmax(torch.randn(2, 4, 5, 5), -1)
    assert attention_kl([a], [a]).item() == pytest.approx(0.0, abs=1e-6)
    two_heads = torch.softmax(torch.randn(2, 2, 5, 5), -1)
    same_mean = two_heads.mean(1, keepdim=True).expand(2, 4, 5, 5)
    assert attention_kl([two_heads], [same_mean]).item() == pytest.approx(0.0, abs=1e-6)
    assert attention_kl([two_heads], [a]).item() > 0


def test_kd_for_mlm_uses_only_masked_positions():
    s, t = torch.randn(2, 4, 11), torch.randn(2, 4, 11)
    labels = torch.full((2, 4), -100)
    labels[1, 2] = 3
    value = get_loss("kd").fn(LossInputs(student_logits=s, teacher_logits=t, labels=labels, temperature=1.0))
    assert value.item() == pytest.approx(soft_kl(s[1, 2:3], t[1, 2:3]).item(), rel=1e-5)


def test_ce_ignores_unlabelled_positions():
    logits = torch.randn(3, 4)
    labels = torch.tensor([1, -100, 2])
    value = get_loss("ce").fn(LossInputs(student_logits=logits, labels=labels))
    assert value.item() == pytest.approx(F.cross_entropy(logits[[0, 2]], labels[[0, 2]]).item(), rel=1e-6)


def test_losses_give_gradients_to_the_student_only():
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    soft_kl(s, t.detach(), 2.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_registry_lists_every_loss_with_a_summary_and_rejects_unknown_names():
    assert {"kd", "ce", "hidden_mse", "hidden_cos", "attention_kl"} <= set(LOSSES)
    assert all(d.summary for d in LOSSES.values())
    with pytest.raises(ConfigError, match="known losses: .*kd"):
        get_loss("nope")


def test_weight_schedule_is_linear_and_clamped():
    term = WeightedLoss(get_loss("kd"), 1.0, 0.0)
    assert [term.weight_at(p) for p in (0.0, 0.25, 1.0, 2.0)] == [1.0, 0.75, 0.0, 0.0]
    assert WeightedLoss(get_loss("kd"), 0.3).weight_at(0.9) == 0.3
