"""Independent float64 references for the losses, written plainly in probability space, one token at a time.

These are the spec the library is checked against; they are never edited to match the library.
"""

import math

import torch


def softmax64(logits: torch.Tensor, temperature: float = 1.0) -> list[float]:
    z = [float(x) / temperature for x in logits]
    top = max(z)
    e = [math.exp(x - top) for x in z]
    total = sum(e)
    return [x / total for x in e]


def kl(a: list[float], b: list[float]) -> float:
    return sum(ai * math.log(ai / bi) for ai, bi in zip(a, b, strict=True) if ai > 0)


def mix(a: list[float], b: list[float], weight_a: float) -> list[float]:
    return [weight_a * x + (1 - weight_a) * y for x, y in zip(a, b, strict=True)]


def divergence(p: list[float], q: list[float], loss: str, beta: float = 0.5, alpha: float = 0.1) -> float:
    """p = teacher, q = student probabilities over the same buckets."""
    if loss == "fkl":
        return kl(p, q)
    if loss == "rkl":
        return kl(q, p)
    if loss == "jsd":
        if beta == 0:
            return kl(p, q)
        if beta == 1:
            return kl(q, p)
        m = mix(p, q, beta)
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if loss == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q, strict=True))
    if loss == "skl":
        return kl(p, mix(p, q, alpha))
    if loss == "srkl":
        return kl(q, mix(p, q, 1 - alpha))
    raise KeyError(loss)


def dense_per_token(student, teacher, loss, temperature=1.0, **kw) -> list[float]:
    """Per-token divergences of `(N, V)` logits."""
    return [
        divergence(softmax64(t, temperature), softmax64(s, temperature), loss, **kw)
        for s, t in zip(student, teacher, strict=True)
    ]


def sparse_per_token(student, ids, logprobs, loss, missing_mass, temperature=1.0, **kw) -> list[float]:
    """Per-token divergences against a sparse teacher `ids, logprobs (N, K)`."""
    out = []
    for s, row_ids, row_lp in zip(student, ids, logprobs, strict=True):
        q_full = softmax64(s, temperature)
        p = [math.exp(float(x)) for x in row_lp]
        q = [q_full[int(i)] for i in row_ids]
        if missing_mass == "renormalize":
            p = [x / sum(p) for x in p]
            q = [x / sum(q) for x in q]
        else:
            p = p + [max(1 - sum(p), 0.0)]
            q = q + [sum(q_full[v] for v in range(len(q_full)) if v not in {int(i) for i in row_ids})]
        out.append(divergence(p, q, loss, **kw))
    return out


def pav_nonincreasing(y: list[float]) -> list[float]:
    """Pool-adjacent-violators for min ‖v − y‖² s.t. v non-increasing."""
    blocks: list[list[float]] = []  # [sum, count]
    for value in y:
        blocks.append([value, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] < blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    out: list[float] = []
    for total, count in blocks:
        out += [total / count] * int(count)
    return out


def soft_rank_pav(values: list[float], strength: float = 1.0) -> list[float]:
    """Blondel et al. 2020 soft rank (L2), ascending, via sorting + PAV."""
    n = len(values)
    z = [v / strength for v in values]
    order = sorted(range(n), key=lambda i: -z[i])
    s = [z[i] for i in order]
    w = list(range(n, 0, -1))
    dual = pav_nonincreasing([a - b for a, b in zip(s, w, strict=True)])
    ranks = [0.0] * n
    for pos, i in enumerate(order):
        ranks[i] = s[pos] - dual[pos]
    return ranks


def pearson(a: list[float], b: list[float]) -> float | None:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    va = sum((x - ma) ** 2 for x in a)
    vb = sum((y - mb) ** 2 for y in b)
    if va < 1e-18 or vb < 1e-18:
        return None
    return cov / math.sqrt(va * vb)


def top_ids(values, k: int) -> list[int]:
    return sorted(range(len(values)), key=lambda i: -float(values[i]))[:k]


def rank_loss_per_token(student_values, teacher_values, k, union="exact", strength=1.0) -> list[float]:
    """1 − Pearson(soft ranks) over the union of both top-k; rows given as value lists (teacher at every id)."""
    out = []
    for s, t in zip(student_values, teacher_values, strict=True):
        t_top, s_top = top_ids(t, k), top_ids(s, k)
        ids = t_top + (s_top if union == "concat" else [i for i in s_top if i not in t_top])
        rho = pearson(soft_rank_pav([float(s[i]) for i in ids], strength),
                      soft_rank_pav([float(t[i]) for i in ids], strength))
        out.append(0.0 if rho is None else 1.0 - rho)
    return out
