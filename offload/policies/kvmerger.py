"""KVMerger-style merging: what the policy leaves out is not lost but merged. Which pages stay
follows H2O (half recent, half heavy hitters, per KV head); each page left out becomes one merged
token per KV head, attended beside the kept pages.

KVMerger merges sets of consecutive tokens whose keys are similar into one state, a Gaussian-
kernel weighted average around a pivot. Page granularity: the merging set is a page (16
consecutive tokens); the pivot is the medoid (the key with the highest mean cosine similarity
to the page's keys; KVMerger's pivot is the most attended token, which pages do not record), the weights are exp(-|k_i - k_pivot|^2 / (2 sigma^2)) with sigma^2 the mean squared distance
to the pivot, and the merged key and value are the weighted means. A merged token stands for the
page's tokens in the softmax with weight page_size (log page_size added to its score, as token
merging with proportional attention does), so a page whose keys are alike keeps nearly its full
share of attention. With effect="drop" the page is freed and its merged token (1/page_size of its
bytes) is all that remains; with "demote" the merged token is attended while the page is out.
"""

from __future__ import annotations

from offload.policies.h2o import H2OPolicy


class KVMergerPolicy(H2OPolicy):
    name = "kvmerger"
    merges = True
