"""torchmhc.memory: the storages operations create, alive and at their peak."""

import torch

from torchmhc.memory import NewStorages


def test_counts_new_storages_alive_and_their_peak_not_views_or_older_ones():
    x = torch.zeros(1000)  # made before the mode: not counted
    with NewStorages() as meter:
        x.view(10, 100).add_(1)  # a view and an in-place change of x create nothing
        a = torch.ones(256)  # 1 KiB
        b = torch.ones(512)  # 2 KiB: 3 KiB alive after this operation
        del b
        c = a * 2  # 1 KiB; b is gone
    assert meter.alive_bytes() == 2 * 1024
    assert meter.peak == 3 * 1024
    del c
    assert meter.alive_bytes() == 1024
