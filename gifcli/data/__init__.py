"""Data sets (in memory, or streamed from disk batch by batch), triggers and poisoning, removal
sets."""

from gifcli.data.datasets import DataSplits, load_dataset, stratified_split
from gifcli.data.removal import (
    class_removal_indices,
    class_removal_mask,
    read_poison_indices,
    read_removal_indices,
    seeded_subset,
    to_split_positions,
)
from gifcli.data.splits import Split, StreamedSplit, TensorSplit
from gifcli.data.triggers import Poisoning, apply_trigger, poison_split

__all__ = [
    "DataSplits",
    "Poisoning",
    "Split",
    "StreamedSplit",
    "TensorSplit",
    "apply_trigger",
    "class_removal_indices",
    "class_removal_mask",
    "load_dataset",
    "poison_split",
    "read_poison_indices",
    "seeded_subset",
    "read_removal_indices",
    "stratified_split",
    "to_split_positions",
]
