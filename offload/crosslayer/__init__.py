"""Cross-layer KV reductions: sharing one layer's KV with later layers, merging KV heads, merging
adjacent layers' KV, factorising groups of layers' KV. One concept per module:

- `sharing`:    the `kv_sharing` map (consumer layer -> producer layer): parse, validate, format
- `reference`:  a plain transformers forward whose consumer layers attend their producer's K/V
                (the slow, obvious reference of the store's sharing path; KVSharer's search runs it)
- `kvsharer`:   KVSharer-style calibration: rank layer pairs by dissimilarity, pick sharing pairs greedily
- `head_merge`: MHA -> GQA conversion by merging KV heads (mean-pooled, Procrustes-aligned, SVD)
- `slerp_merge`: MiniCache's merge of two layers' KV vectors (SLERP of directions, kept magnitudes,
                retained outliers) and its restoration
- `minicache`:  a transformers `Cache` that stores the deeper layers' KV merged in adjacent pairs
- `xkv`:        a transformers `Cache` that stores the prompt's KV as one low-rank SVD per group of layers
- `evaluation`: quality (perplexity, task accuracy) and KV bytes per token of a reduced model

Nothing is imported here, so `offload.config` can use `sharing` without loading transformers.
"""
