"""D2O-style merging (Dynamic Discriminative Operations): pages are kept as H2O keeps them (half
recent, half heavy hitters, per KV head); a page that leaves is merged into the most similar
kept page if their keys are similar enough, and otherwise discarded.

D2O (like CaM, which merges evicted values into kept tokens) folds each evicted token into its
nearest retained token when their cosine similarity exceeds a threshold. Page granularity: the
evicted page becomes one merged token per KV head (Gaussian-weighted, as in `kvmerger`), bound
to the kept page whose key centre ((min + max) / 2 of its keys) is most similar to it, when that
similarity is at least `merge_threshold`; it is attended while that page is kept and leaves with
it. Pages no kept page resembles are dropped outright, unlike `kvmerger`, which attends every
merged token."""

from __future__ import annotations

from offload.policies.h2o import H2OPolicy


class D2OPolicy(H2OPolicy):
    name = "d2o"
    merges = True
    binds_merges = True  # a merged token is attended only while the kept page it was merged into is
