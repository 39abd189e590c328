"""Label sets used for evaluation and demos."""

import torch

from vdistill.methods.sampling.generate import balanced_labels, spread_labels


def test_balanced_labels_cycle_through_all_combinations():
    labels = balanced_labels(150)
    assert len(torch.unique(labels[:72], dim=0)) == 72
    assert torch.equal(labels[72:144], labels[:72])


def test_spread_labels_mix_attributes_even_for_few_clips():
    assert len(torch.unique(spread_labels(72), dim=0)) == 72
    few = spread_labels(8)
    assert len(torch.unique(few[:, 0])) == 3 and len(torch.unique(few[:, 2])) == 4
    assert len(torch.unique(few[:, 1])) >= 5
