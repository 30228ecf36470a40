"""MHA -> GQA by merging KV heads: groups of `group_size` KV heads become one, training-free.

The result is an ordinary transformers model of the same class with `num_key_value_heads` divided
by `group_size` (the KV cache shrinks by that factor); `OffloadedModel` runs it like any other.
Consecutive KV heads form a group, so each query head keeps attending the merged head of the KV
head it attended before. Three ways to merge a group:

- "mean": the group's k_proj and v_proj rows are averaged (GQA's mean-pooled conversion, Ainslie
  et al.); queries and the output projection are unchanged.
- "procrustes": heads are first aligned, then averaged (in the spirit of aligning heads before
  merging them). Values: each head's orthogonal map onto the group's mean value head (orthogonal
  Procrustes on calibration values, a few rounds of generalized Procrustes); the output
  projection absorbs its inverse, so an aligned head computes exactly what it did. Keys: the same,
  restricted to maps that commute with RoPE, so the query projection can absorb them: one 2-D
  rotation per RoPE frequency pair (a unit complex number per pair), fitted on pre-RoPE keys.
- "svd": the best merged head in the least-squares sense on calibration data (low-rank KV
  compression of grouped heads, Yu et al. arXiv 2406.07056), with the query and output projections
  absorbing each head's factor. Values: the group's calibration values [N, g * D] are projected
  on their top D right singular vectors P; the merged head is v P, head i is read back as
  v P_i^T (P_i its D rows), folded into o_proj. Keys: per RoPE frequency pair the g heads' complex
  pre-RoPE keys [N, g] get their best rank-1 fit z_i ~ c_i z (complex c_i commutes with RoPE's
  rotation); query i is multiplied by conj(c_i), which keeps q . k of that fit.

Group size 1 leaves every method's function unchanged (up to float rounding). Supported: Llama-style
attention (q/k/v/o projections, optional biases, RoPE on halves of the full head, no q/k norms).
"""

from __future__ import annotations

import copy

import torch

METHODS = ("mean", "procrustes", "svd")
PROCRUSTES_ROUNDS = 3  # generalized Procrustes: align to the group mean, recompute the mean, again


def merge_kv_heads(model, group_size: int, method: str = "mean", calibration: list[torch.Tensor] | None = None):
    """A new model (the input is untouched) whose KV heads are merged `group_size` at a time.

    calibration: token id tensors [1, T] run through `model` to fit "procrustes" and "svd"."""
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not a head-merging method; expected one of {', '.join(METHODS)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or kv_heads % group_size:
        raise ValueError(f"group_size={group_size!r} must be a positive divisor of the model's {kv_heads} KV heads")
    attentions = _attention_modules(model)
    head_dim = attentions[0].head_dim
    if method != "mean" and not calibration:
        raise ValueError(f"method={method!r} fits the merge on calibration data; pass calibration=[ids, ...]")
    keys, values = _calibration_kv(model, attentions, calibration, kv_heads, head_dim) if method != "mean" else ({}, {})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for layer, attention in enumerate(attentions):
        prefix = _prefix(model, attention)
        q, k, v = (_augmented(state, prefix + name) for name in ("q_proj", "k_proj", "v_proj"))
        o = state[prefix + "o_proj.weight"].double()
        q, k, v, o = _merge_layer(q, k, v, o, heads, kv_heads, head_dim, group_size, method,
                                  keys.get(layer), values.get(layer))
        for name, weight in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
            _store(state, prefix + name, weight)
        state[prefix + "o_proj.weight"] = o.to(state[prefix + "o_proj.weight"].dtype)
    new_config = copy.deepcopy(config)
    new_config.num_key_value_heads = kv_heads // group_size
    new_config.head_dim = head_dim
    dtype = next(model.parameters()).dtype
    merged = type(model)(new_config).to(dtype)
    merged.load_state_dict(state)
    merged.config._attn_implementation = model.config._attn_implementation
    merged.generation_config = copy.deepcopy(model.generation_config)
    return merged.eval()


def _merge_layer(q, k, v, o, heads, kv_heads, head_dim, group_size, method, keys, values):
    """One layer. q [H*D, in+1], k, v [H_kv*D, in+1] (bias as the last column), o [out, H*D], all
    float64; keys, values [N, H_kv, D] pre-RoPE calibration states (or None). Returns the four
    merged matrices (k and v with H_kv / group_size heads)."""
    d, per_kv = head_dim, heads // kv_heads
    q, o = q.clone(), o.clone()
    merged_k, merged_v = [], []
    for group in range(kv_heads // group_size):
        members = list(range(group * group_size, (group + 1) * group_size))
        wk = [k[i * d:(i + 1) * d] for i in members]
        wv = [v[i * d:(i + 1) * d] for i in members]
        if method == "mean":
            merged_k.append(torch.stack(wk).mean(0))
            merged_v.append(torch.stack(wv).mean(0))
            continue
        zk = _complex(keys[:, members].double())  # [N, g, D/2]
        vs = values[:, members].double()  # [N, g, D]
        if method == "procrustes":
            factors = _procrustes_phases(zk)  # [g, D/2] unit complex: head i aligned is factors[i] * z_i
            rotations = _procrustes_rotations(vs)  # [g, D, D]: head i aligned is v_i @ R_i
            merged_k.append(torch.stack([_times(factors[j], wk[j]) for j in range(group_size)]).mean(0))
            merged_v.append(torch.stack([rotations[j].T @ wv[j] for j in range(group_size)]).mean(0))
            query_factor = factors  # q . k unchanged: the query turns with its key
            out_maps = rotations  # o_proj absorbs v -> v R
        else:
            factors = _rank1_factors(zk)  # [g, D/2] complex c_i: z_i ~ c_i z, merged z = sum_i conj(c_i) z_i
            merged_k.append(sum(_times(factors[j].conj(), wk[j]) for j in range(group_size)))
            basis = _value_basis(vs.reshape(vs.shape[0], -1), d)  # [g*D, D]
            merged_v.append(basis.T @ torch.cat(wv))
            query_factor = factors.conj()  # Re(q conj(c_i z)) = Re((q conj(c_i)) conj(z))
            out_maps = basis.reshape(group_size, d, d)  # head i read back as v_merged @ P_i^T
        for j, i in enumerate(members):
            for h in range(i * per_kv, (i + 1) * per_kv):
                q[h * d:(h + 1) * d] = _times(query_factor[j], q[h * d:(h + 1) * d])
                o[:, h * d:(h + 1) * d] = o[:, h * d:(h + 1) * d] @ out_maps[j]
    return q, torch.cat(merged_k), torch.cat(merged_v), o


def _complex(x: torch.Tensor) -> torch.Tensor:
    """[..., D] real (RoPE on halves: pair p is dims p and p + D/2) -> [..., D/2] complex."""
    half = x.shape[-1] // 2
    return torch.complex(x[..., :half], x[..., half:])


def _times(factor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Multiply each RoPE pair of a head's projection rows [D, in] by a complex factor [D/2]: the map
    the head's output undergoes when each of its pairs is multiplied by that complex number."""
    half = rows.shape[0] // 2
    first, second = rows[:half], rows[half:]
    a, b = factor.real[:, None], factor.imag[:, None]
    return torch.cat([a * first - b * second, b * first + a * second])


def _procrustes_phases(z: torch.Tensor) -> torch.Tensor:
    """z [N, g, P] complex -> [g, P] unit factors u_i such that u_i z_i best matches the group's mean
    (per pair, over rotations only: least squares is solved by the phase of sum(target conj(z_i)))."""
    factors = torch.ones(z.shape[1:], dtype=z.dtype)
    for _ in range(PROCRUSTES_ROUNDS):
        target = (factors * z).mean(dim=1)  # [N, P]
        s = (target[:, None] * z.conj()).sum(dim=0)  # [g, P]
        magnitude = s.abs()
        factors = torch.where(magnitude > 0, s / magnitude.clamp_min(1e-300), torch.ones_like(s))
    return factors


def _procrustes_rotations(v: torch.Tensor) -> torch.Tensor:
    """v [N, g, D] -> [g, D, D] orthogonal R_i such that v_i @ R_i best matches the group's mean."""
    g, d = v.shape[1], v.shape[2]
    rotations = torch.eye(d, dtype=v.dtype).expand(g, d, d).clone()
    for _ in range(PROCRUSTES_ROUNDS):
        target = torch.einsum("ngd,gde->ne", v, rotations) / g
        for i in range(g):
            u, _, vh = torch.linalg.svd(v[:, i].T @ target)
            rotations[i] = u @ vh
    return rotations


def _rank1_factors(z: torch.Tensor) -> torch.Tensor:
    """z [N, g, P] complex -> [g, P] complex c: per pair, the best rank-1 fit of the [N, g] matrix is
    z_i ~ c_i m with m = sum_i conj(c_i) z_i (c the top right singular vector). Its overall phase is
    free; fixed so that c_0 is real and >= 0 (group size 1 then gives c = 1)."""
    factors = []
    for p in range(z.shape[2]):
        _, _, vh = torch.linalg.svd(z[:, :, p], full_matrices=False)
        c = vh[0]
        phase = c[0] / c[0].abs() if c[0].abs() > 0 else torch.ones((), dtype=c.dtype)
        factors.append(c / phase)
    return torch.stack(factors, dim=1)


def _value_basis(v: torch.Tensor, d: int) -> torch.Tensor:
    """v [N, g*D] -> [g*D, D]: the top D right singular vectors (the best rank-D subspace)."""
    _, _, vh = torch.linalg.svd(v, full_matrices=False)
    return vh[:d].T


def _attention_modules(model) -> list[torch.nn.Module]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: head merging needs model.model.layers (a Llama-style decoder)")
    attentions = [getattr(layer, "self_attn", None) for layer in layers]
    for i, attention in enumerate(attentions):
        missing = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj")
                   if not isinstance(getattr(attention, n, None), torch.nn.Linear)]
        if missing:
            raise ValueError(f"{type(model).__name__} layer {i}: head merging needs Linear q/k/v/o projections; "
                             f"missing {', '.join(missing)}")
        if getattr(attention, "q_norm", None) is not None or getattr(attention, "k_norm", None) is not None:
            raise ValueError(f"{type(model).__name__} layer {i} normalizes queries or keys per head (q_norm/k_norm); "
                             "a merged head would be normalized differently, so head merging refuses it")
    config = model.config
    partial = getattr(config, "partial_rotary_factor", None) or 1.0
    if partial != 1.0 or attentions[0].head_dim % 2:
        raise ValueError(f"{type(model).__name__}: head merging needs RoPE over the whole head (even head_dim, "
                         f"partial_rotary_factor 1); got head_dim {attentions[0].head_dim}, factor {partial}")
    return attentions


def _prefix(model, attention) -> str:
    for name, module in model.named_modules():
        if module is attention:
            return name + "."
    raise ValueError("attention module not found in the model")


def _augmented(state: dict, name: str) -> torch.Tensor:
    """weight [out, in] with the bias (zeros without one) as one more column, float64."""
    weight = state[name + ".weight"].double()
    bias = state.get(name + ".bias")
    column = bias.double()[:, None] if bias is not None else weight.new_zeros(weight.shape[0], 1)
    return torch.cat([weight, column], dim=1)


def _store(state: dict, name: str, augmented: torch.Tensor) -> None:
    dtype = state[name + ".weight"].dtype
    state[name + ".weight"] = augmented[:, :-1].to(dtype).contiguous()
    if name + ".bias" in state:
        state[name + ".bias"] = augmented[:, -1].to(dtype).contiguous()


@torch.inference_mode()
def _calibration_kv(model, attentions, calibration, kv_heads: int, head_dim: int):
    """Per layer: pre-RoPE keys and values [N, H_kv, D] float64 of every calibration token (the k_proj
    and v_proj outputs, biases included)."""
    keys: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(attentions))}
    values: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(attentions))}
    hooks = []
    for i, attention in enumerate(attentions):
        hooks.append(attention.k_proj.register_forward_hook(
            lambda _m, _a, out, i=i: keys[i].append(out.reshape(-1, kv_heads, head_dim).double())))
        hooks.append(attention.v_proj.register_forward_hook(
            lambda _m, _a, out, i=i: values[i].append(out.reshape(-1, kv_heads, head_dim).double())))
    try:
        for ids in calibration:
            model(ids.reshape(1, -1), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return ({i: torch.cat(x) for i, x in keys.items()}, {i: torch.cat(x) for i, x in values.items()})
