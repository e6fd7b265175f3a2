"""Numerical checks of CAPO's last-layer curvature model (capo_lightning.selection.curvature, .global_shifts).

Every quantity the module computes is compared with something computed a different way, on a tiny
LM head (V <= 64, d <= 16, a few tokens):

* the per-token gradient with autograd of A * log softmax_topk(W h)[a] with respect to the full W;
* the quadratic forms with explicit Kronecker matrices and with autograd Hessians (torch.func);
* k = V with the plain full-vocabulary softmax model;
* the chunked top-k with the unchunked one (also at a real vocabulary size, V = 152_000);
* m_H and the exact Fisher form with finite differences of the true ratio surrogate and the true KL;
* adam_direction with torch.optim.Adam;
* row_gradient_sums with a Python loop.

The library computes in fp32. The references are fp64, so W and h are drawn in fp32 and then
widened to fp64: both sides see exactly the same inputs, and the only differences are fp32 rounding
inside the library (hence the rtol 1e-5 / atol 1e-6 style tolerances).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import hessian

from capo_lightning.selection import curvature as C
from capo_lightning.selection import global_shifts as G

F64 = torch.float64


def _head(
    seed: int, num_vocab: int, dim: int, num_tokens: int, h_scale: float = 1.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """W [V, d] and h [T, d] in fp64 that are exactly representable in fp32.

    W ~ N(0, 1) and h ~ N(0, h_scale^2 / d) keep the logits O(1), so the policies are neither
    uniform nor one-hot (the curvature terms are then all of comparable size).
    """
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(num_vocab, dim, generator=g)
    h = torch.randn(num_tokens, dim, generator=g) * (h_scale / math.sqrt(dim))
    return w.double(), h.double()


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """fp32 library result against an fp64 reference."""
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def _log_pi_topk(w: torch.Tensor, h: torch.Tensor, ids: torch.Tensor, pos: int) -> torch.Tensor:
    """log of the top-k renormalised softmax at slot ``pos``: log softmax(W[ids] h)[pos] (fp64)."""
    return torch.log_softmax(w[ids] @ h, dim=-1)[pos]


def _expected_ids(logits: torch.Tensor, action: int, k: int) -> list[int]:
    """The subspace rows as a set, worked out independently of topk_policy's own code path.

    The k largest logits; if the action is not among them, it takes the place of the k-th largest
    (topk_policy's documented substitution), so the set is the top k-1 plus the action.
    """
    order = torch.argsort(logits, descending=True).tolist()
    top = order[:k]
    if action not in top:
        top = order[: k - 1] + [action]
    return sorted(top)


# ------------------------------------------------------------------------------------------------
# 1. Per-token last-layer gradient
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [5, 24])
def test_token_gradients_match_autograd(k: int) -> None:
    # G_t = A (e_a - pi) h^T on the top-k rows must be d/dW [A log softmax_topk(W h)[a]], with the
    # gradient of every row outside the subspace exactly 0 (those logits are not in the softmax).
    # k = 5 < V: the softmax is over the top 5 logits only; the last token samples the smallest
    # logit, which is outside the top 5 and must be substituted into the subspace. k = V: exact model.
    V, d, T = 24, 6, 5
    w, h = _head(1, V, d, T)
    adv = torch.tensor([1.0, -0.7, 1.3, -1.2, 0.5], dtype=F64)
    logits = h @ w.T
    g = torch.Generator().manual_seed(2)
    actions = torch.stack(
        [torch.argsort(row, descending=True)[torch.randint(0, min(k, V), (), generator=g)] for row in logits]
    )
    actions[-1] = logits[-1].argmin()  # outside the top k when k < V
    top = C.topk_policy(h, w, actions, k)
    grads = C.token_gradients(top, h, adv)  # [T, k, d]
    assert grads.shape == (T, k, d) and grads.dtype == torch.float32
    for t in range(T):
        ids = _expected_ids(logits[t], int(actions[t]), k)
        assert sorted(top.ids[t].tolist()) == ids
        w_var = w.clone().requires_grad_(True)
        ids_t = torch.tensor(ids)
        pos = ids.index(int(actions[t]))
        (adv[t] * _log_pi_topk(w_var, h[t], ids_t, pos)).backward()
        full = torch.zeros(V, d, dtype=F64)
        full[top.ids[t]] = grads[t].double()  # the library's block, placed on its rows
        _close(full, w_var.grad)  # includes the exact zeros outside the subspace
        # and the block really is rank one: A s h^T with s = e_a - pi (sums to 0 over the subspace)
        _close(grads[t].double().sum(0), torch.zeros(d, dtype=F64), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# 2. Quadratic forms against explicit matrices and autograd Hessians
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [6, 20])
def test_quadratic_forms_match_explicit_matrices_and_hessians(k: int) -> None:
    # For an arbitrary direction D on the k subspace rows (vec = row-major flatten, which is the
    # ordering torch.kron(S, hh^T) uses: index i*d + j <-> D[i, j]):
    #   (s.u)^2            = vec(D)^T [(s s^T)        kron (h h^T)] vec(D)          (sampled Fisher)
    #   u^T F u            = vec(D)^T [(diag pi - pi pi^T) kron (h h^T)] vec(D)
    #                      = -D : Hess_W log softmax_topk(W h)[a] : D                 (autograd)
    #   A[(s.u)^2 - uFu]   =  D : Hess_W A pi(a)/pi_old(a) : D   at W = W_old      (ratio surrogate)
    #   <G, D>             =  D : grad_W A log pi(a)
    # and then m_F = 1/2 lr^2 (s.u)^2, m_H = lr <G, D> + 1/2 lr^2 A [(s.u)^2 - uFu].
    V, d, T = 20, 4, 4
    w, h = _head(3, V, d, T)
    adv = torch.tensor([0.8, -1.1, 1.7, -0.4], dtype=F64)
    g = torch.Generator().manual_seed(4)
    pi_full = torch.softmax(h @ w.T, -1)
    actions = torch.multinomial(pi_full, 1, generator=g).squeeze(1)
    top = C.topk_policy(h, w, actions, k)
    grads = C.token_gradients(top, h, adv)
    direction = torch.randn(T, k, d, generator=g)  # arbitrary, not a gradient
    for lr in (0.3, 0.01):
        shifts = C.shifts_from_direction(top, h, adv, grads, direction, lr)
        for t in range(T):
            ids = top.ids[t]
            pos = int(top.onehot[t].argmax())
            assert int(ids[pos]) == int(actions[t])
            pi = torch.softmax(w[ids] @ h[t], -1)  # fp64 top-k policy
            _close(top.probs[t], pi)
            s = torch.nn.functional.one_hot(torch.tensor(pos), k).double() - pi
            hh = torch.outer(h[t], h[t])
            fisher_k = torch.diag(pi) - torch.outer(pi, pi)
            vec_d = direction[t].double().reshape(-1)
            su2 = vec_d @ torch.kron(torch.outer(s, s), hh) @ vec_d
            uFu = vec_d @ torch.kron(fisher_k, hh) @ vec_d

            def log_pi(wk: torch.Tensor, t: int = t, pos: int = pos) -> torch.Tensor:
                return torch.log_softmax(wk @ h[t], -1)[pos]

            w_k = w[ids].clone()
            hess_log = hessian(log_pi)(w_k)  # [k, d, k, d]
            minus_hess_form = -torch.einsum("ij,ijlm,lm->", direction[t].double(), hess_log, direction[t].double())
            _close(uFu, minus_hess_form, rtol=1e-10, atol=1e-10)  # the spec's identity, fp64 only

            def ratio(wk: torch.Tensor, t: int = t, pos: int = pos, ref: torch.Tensor = w_k) -> torch.Tensor:
                return adv[t] * torch.exp(log_pi(wk, t, pos) - log_pi(ref, t, pos))

            hess_ratio = hessian(ratio)(w_k)
            ratio_form = torch.einsum("ij,ijlm,lm->", direction[t].double(), hess_ratio, direction[t].double())
            grad_log = torch.func.grad(log_pi)(w_k)
            first = adv[t] * (grad_log * direction[t].double()).sum()

            _close(shifts.s_dot_u[t] ** 2, su2)
            _close(shifts.fisher_form[t], uFu)
            _close(shifts.fisher_form[t], minus_hess_form)
            _close(adv[t] * (shifts.s_dot_u[t].double() ** 2 - shifts.fisher_form[t].double()), ratio_form)
            _close(shifts.first_order[t], first)
            _close(shifts.fisher[t], 0.5 * lr**2 * su2)
            _close(shifts.hessian[t], lr * first + 0.5 * lr**2 * ratio_form)
    # the Fisher form is a variance (of u under pi), so it is >= 0; with a random D it is > 0
    assert bool((shifts.fisher_form > 0).all())


# ------------------------------------------------------------------------------------------------
# 3. k = V is the exact full-softmax model
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [32, 1000])  # k >= V is clamped to V
def test_full_vocabulary_is_the_exact_model(k: int) -> None:
    # With k >= V the subspace is the whole vocabulary (in top-k order, a permutation): probs are
    # softmax(W h), G = A (e_a - softmax) h^T over all V rows, and the shifts of a direction given as
    # a full [V, d] matrix equal those computed directly in vocabulary order.
    V, d, T = 32, 8, 5
    w, h = _head(5, V, d, T)
    adv = torch.tensor([1.0, -2.0, 0.3, 0.9, -0.6], dtype=F64)
    g = torch.Generator().manual_seed(6)
    p = torch.softmax(h @ w.T, -1)  # [T, V] fp64
    actions = torch.multinomial(p, 1, generator=g).squeeze(1)
    top = C.topk_policy(h, w, actions, k)
    assert top.ids.shape == (T, V)
    for t in range(T):
        assert sorted(top.ids[t].tolist()) == list(range(V))  # a permutation of the vocabulary
    probs_vocab = torch.zeros(T, V, dtype=F64).scatter(1, top.ids, top.probs.double())
    _close(probs_vocab, p)
    onehot_vocab = torch.zeros(T, V, dtype=F64).scatter(1, top.ids, top.onehot.double())
    assert torch.equal(onehot_vocab, torch.nn.functional.one_hot(actions, V).double())

    grads = C.token_gradients(top, h, adv)
    s_full = torch.nn.functional.one_hot(actions, V).double() - p  # [T, V]
    g_full = adv[:, None, None] * s_full[:, :, None] * h[:, None, :]  # [T, V, d]
    _close(torch.gather(g_full, 1, top.ids[:, :, None].expand(T, V, d)), grads)

    lr = 0.05
    d_full = torch.randn(T, V, d, generator=g, dtype=F64)  # per-token directions in vocab order
    direction = torch.gather(d_full, 1, top.ids[:, :, None].expand(T, V, d)).float()
    shifts = C.shifts_from_direction(top, h, adv, grads, direction, lr)
    u = torch.einsum("tvd,td->tv", d_full, h)
    su = (s_full * u).sum(-1)
    uFu = (p * u * u).sum(-1) - (p * u).sum(-1) ** 2
    first = (g_full * d_full).sum((1, 2))
    _close(shifts.s_dot_u, su)
    _close(shifts.fisher_form, uFu)
    _close(shifts.first_order, first)
    _close(shifts.fisher, 0.5 * lr**2 * su**2)
    _close(shifts.hessian, lr * first + 0.5 * lr**2 * adv * (su**2 - uFu))


# ------------------------------------------------------------------------------------------------
# 4. Chunking and the out-of-top-k substitution
# ------------------------------------------------------------------------------------------------
def test_topk_policy_chunking_is_invisible_small() -> None:
    # Chunks only split the [T, V] logits block by tokens; each token's row is independent, so the
    # chosen rows must be identical and the probabilities equal up to BLAS rounding (a [1, d] x
    # [d, V] product need not round bit-identically to a [7, d] x [d, V] one).
    V, d, T, k = 64, 16, 7, 5
    w, h = _head(7, V, d, T)
    actions = torch.randint(0, V, (T,), generator=torch.Generator().manual_seed(8))
    ref = C.topk_policy(h, w, actions, k, chunk=None)
    for chunk in (1, 3, T, 100):
        out = C.topk_policy(h, w, actions, k, chunk=chunk)
        assert torch.equal(out.ids, ref.ids)
        assert torch.equal(out.onehot, ref.onehot)
        torch.testing.assert_close(out.probs, ref.probs, rtol=1e-6, atol=1e-7)


def test_topk_policy_chunking_at_real_vocabulary_size() -> None:
    # Qwen2.5-sized vocabulary (V = 152_000, d = 64, fp32), T = 6, top-50; token 4 samples the
    # smallest logit (outside the top 50). chunk = 2 (3 blocks) must equal chunk = T and the
    # default (budget-sized, one block here), and both must equal an fp64 reference.
    V, d, T, k = 152_000, 64, 6, 50
    g = torch.Generator().manual_seed(9)
    w = torch.randn(V, d, generator=g)
    h = torch.randn(T, d, generator=g) / 4.0  # logits ~ N(0, 4): a realistically peaked policy
    logits = h.double() @ w.double().T
    actions = logits.argmax(-1)  # greedy tokens: always in the top k
    actions[1] = logits[1].topk(k).indices[-1]  # the k-th largest: in, at the edge
    actions[4] = logits[4].argmin()  # never in the top k
    chunked = C.topk_policy(h, w, actions, k, chunk=2)
    whole = C.topk_policy(h, w, actions, k, chunk=T)
    auto = C.topk_policy(h, w, actions, k)
    for other in (whole, auto):
        assert torch.equal(chunked.ids, other.ids)
        assert torch.equal(chunked.onehot, other.onehot)
        torch.testing.assert_close(chunked.probs, other.probs, rtol=1e-5, atol=1e-6)
    for t in range(T):
        ids = _expected_ids(logits[t], int(actions[t]), k)
        assert sorted(chunked.ids[t].tolist()) == ids
        _close(chunked.probs[t], torch.softmax(logits[t, chunked.ids[t]], -1))
    assert int(chunked.ids[4, -1]) == int(actions[4])  # substituted into the last slot
    assert torch.equal(chunked.onehot.sum(1), torch.ones(T))


def test_topk_policy_substitutes_missing_action_into_last_slot() -> None:
    # Documented behaviour: a sampled token outside the top k replaces the k-th (smallest kept)
    # entry; its own logit enters the softmax. So ids = [top k-1 in descending order, a],
    # probs = softmax([top k-1 logits, logit_a]) and e_a sits in the last slot. Tokens whose action
    # is inside the top k are untouched (plain top k).
    V, d, T, k = 40, 8, 3, 4
    w, h = _head(10, V, d, T)
    logits = h @ w.T
    actions = torch.stack([logits[0].argmin(), logits[1].argmax(), torch.argsort(logits[2], descending=True)[k]])
    top = C.topk_policy(h, w, actions, k)
    for t in (0, 2):  # both actions are outside the top k (rank V-1 and rank k)
        order = torch.argsort(logits[t], descending=True)[: k - 1]
        assert top.ids[t, :-1].tolist() == order.tolist()
        assert int(top.ids[t, -1]) == int(actions[t])
        expected = torch.softmax(torch.cat([logits[t, order], logits[t, actions[t]].reshape(1)]), -1)
        _close(top.probs[t], expected)
        assert top.onehot[t].tolist() == [0.0] * (k - 1) + [1.0]
    order = torch.argsort(logits[1], descending=True)[:k]
    assert top.ids[1].tolist() == order.tolist()
    assert top.onehot[1].tolist() == [1.0] + [0.0] * (k - 1)
    _close(top.probs[1], torch.softmax(logits[1, order], -1))


# ------------------------------------------------------------------------------------------------
# 5. Finite differences on the exact (k = V) model
# ------------------------------------------------------------------------------------------------
def _slope(lrs: list[float], errors: list[float]) -> float:
    """Least-squares slope of log(error) against log(lr)."""
    x, y = torch.tensor(lrs, dtype=F64).log(), torch.tensor(errors, dtype=F64).log()
    return float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())


def _fd_setup(direction_kind: str):
    V, d, T = 16, 8, 6
    w, h = _head(0, V, d, T)
    g = torch.Generator().manual_seed(11)
    p_old = torch.softmax(h @ w.T, -1)  # [T, V] fp64
    actions = torch.multinomial(p_old, 1, generator=g).squeeze(1)  # a ~ pi
    adv = torch.randn(T, generator=g, dtype=F64)
    top = C.topk_policy(h, w, actions, V)  # k = V: the model is exact, only Taylor error remains
    grads = C.token_gradients(top, h, adv)
    if direction_kind == "sgd":
        direction = grads
    else:  # a shadow-Adam direction from some state: m_H's expansion holds for ANY direction
        m = 0.05 * torch.randn(V, d, generator=g)
        v = 0.01 * torch.rand(V, d, generator=g) + 1e-4
        direction = C.adam_direction(grads, m[top.ids], v[top.ids], step=3, betas=(0.9, 0.999), eps=1e-8)
    return V, d, T, w, h, p_old, actions, adv, top, grads, direction


@pytest.mark.parametrize("direction_kind", ["sgd", "adam"])
def test_finite_differences_m_h_and_exact_fisher_are_second_order(direction_kind: str) -> None:
    # Token t's candidate update is W_new = W + lr * D_t, with D_t (its own direction block)
    # embedded on its top-k rows of the full [V, d] head and zero elsewhere; only token t's own
    # quantities are measured. With Delta log pi = lr s.u - 1/2 lr^2 u^T F u + O(lr^3):
    #   true surrogate change  A (pi_new(a)/pi_old(a) - 1) = A(exp(Delta log pi(a)) - 1)
    #                          = lr A s.u + 1/2 lr^2 A [(s.u)^2 - uFu] + O(lr^3) = m_H + O(lr^3)
    #   true KL(pi_old || pi_new) = 1/2 lr^2 u^T F u + O(lr^3)
    # so both errors must fall like lr^3 (log-log slope 3). A wrong second-order coefficient leaves an
    # O(lr^2) error (slope 2), a wrong first-order one O(lr) (slope 1); the control variants below
    # show the harness sees that.
    # The lr grid is per token, lr = c / max|u_t| with c = 0.4 ... 0.025 (the largest logit change is
    # c), so every token is in its asymptotic regime while its cubic error stays >= ~100x above the
    # library's own fp32 rounding (~1e-7 of m_H; measured on this seed). A token can still have an
    # accidentally small cubic coefficient, so the quartic term bends its slope (measured here: one
    # token at 3.38, halving ratio 9.0), hence loose per-token bounds and a tight bound on the median.
    V, d, T, w, h, p_old, actions, adv, top, grads, direction = _fd_setup(direction_kind)
    u = torch.einsum("tkd,td->tk", direction.double(), h)
    scales = (0.4, 0.2, 0.1, 0.05, 0.025)
    slopes_h, slopes_kl, slopes_bad2, slopes_bad1 = [], [], [], []
    for t in range(T):
        lrs, err_h, err_kl, err_bad2, err_bad1 = [], [], [], [], []
        a = int(actions[t])
        for c in scales:
            lr = c / float(u[t].abs().max())
            shifts = C.shifts_from_direction(top, h, adv, grads, direction, lr)
            d_full = torch.zeros(V, d, dtype=F64)
            d_full[top.ids[t]] = direction[t].double()
            p_new = torch.softmax((w + lr * d_full) @ h[t], -1)
            surrogate = adv[t] * (p_new[a] / p_old[t, a] - 1)
            kl = (p_old[t] * (p_old[t].log() - p_new.log())).sum()
            m_h = float(shifts.hessian[t])
            lrs.append(lr)
            err_h.append(abs(m_h - float(surrogate)))
            err_kl.append(abs(0.5 * lr**2 * float(shifts.fisher_form[t]) - float(kl)))
            # controls the harness must flag: m_H without its -A uFu term (wrong 2nd order), and
            # m_H with its first-order term scaled by 1.5 (wrong 1st order)
            bad2 = m_h + 0.5 * lr**2 * float(adv[t] * shifts.fisher_form[t])
            bad1 = m_h + 0.5 * lr * float(shifts.first_order[t])
            err_bad2.append(abs(bad2 - float(surrogate)))
            err_bad1.append(abs(bad1 - float(surrogate)))
        slopes_h.append(_slope(lrs, err_h))
        slopes_kl.append(_slope(lrs, err_kl))
        slopes_bad2.append(_slope(lrs, err_bad2))
        slopes_bad1.append(_slope(lrs, err_bad1))
        # halving lr divides a cubic error by ~8 (last pair: the most asymptotic one)
        assert 6.5 < err_h[-2] / err_h[-1] < 10.5, (t, err_h)
        assert 6.5 < err_kl[-2] / err_kl[-1] < 10.5, (t, err_kl)
    med = lambda xs: float(torch.tensor(xs).median())  # noqa: E731
    assert min(slopes_h) > 2.7 and max(slopes_h) < 3.6, slopes_h
    assert min(slopes_kl) > 2.7 and max(slopes_kl) < 3.6, slopes_kl
    assert 2.9 < med(slopes_h) < 3.1, slopes_h
    assert 2.9 < med(slopes_kl) < 3.1, slopes_kl
    assert 1.8 < med(slopes_bad2) < 2.2, slopes_bad2
    assert 0.8 < med(slopes_bad1) < 1.2, slopes_bad1


def test_sampled_fisher_averages_to_exact_fisher() -> None:
    # E_{a ~ pi}[((e_a - pi).u)^2] = sum_a pi_a (u_a - pi.u)^2 = Var_pi(u) = u^T (diag pi - pi pi^T) u.
    # (1) The identity itself in fp64, to 1e-10. (2) The library: the same hidden state with every
    # action a in turn and one fixed direction (given in vocabulary order, so it is the same step for
    # every a), then sum_a pi_a s_dot_u(a)^2 must equal its fisher_form, and the pi-average of m_F
    # must equal 1/2 lr^2 u^T F u (what test 5 shows predicts the true KL).
    V, d = 24, 8
    w, h = _head(12, V, d, 1)
    g = torch.Generator().manual_seed(13)
    p = torch.softmax(h[0] @ w.T, -1)
    u = torch.randn(V, generator=g, dtype=F64)
    exact = u @ (torch.diag(p) - torch.outer(p, p)) @ u
    sampled = sum(p[a] * ((torch.nn.functional.one_hot(torch.tensor(a), V).double() - p) @ u) ** 2 for a in range(V))
    assert abs(float(sampled) - float(exact)) < 1e-10 * max(1.0, float(exact))

    hs = h.expand(V, d).contiguous()
    actions = torch.arange(V)
    adv = torch.ones(V, dtype=F64)
    top = C.topk_policy(hs, w, actions, V)
    d_vocab = torch.randn(V, d, generator=g)
    direction = d_vocab[top.ids]  # [V tokens, k = V, d]
    lr = 0.1
    shifts = C.shifts_from_direction(top, hs, adv, C.token_gradients(top, hs, adv), direction, lr)
    probs_vocab = torch.zeros(V, V, dtype=F64).scatter(1, top.ids, top.probs.double())[0]
    assert torch.allclose(shifts.fisher_form, shifts.fisher_form[0].expand(V))  # same state, same step
    average = (probs_vocab[actions] * shifts.s_dot_u.double() ** 2).sum()
    _close(average, shifts.fisher_form[0].double())
    _close((probs_vocab[actions] * shifts.fisher.double()).sum(), 0.5 * lr**2 * shifts.fisher_form[0].double())
    # and a single sample is NOT the exact form in general (the sampled form is an estimate)
    assert (shifts.s_dot_u.double() ** 2 - shifts.fisher_form.double()).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------
# 6. adam_direction
# ------------------------------------------------------------------------------------------------
def test_adam_direction_step_zero_is_the_gradient() -> None:
    # With an empty shadow state the official code falls back to the raw gradient (an SGD-like
    # direction), not to Adam's first step (which would be ~sign(g)).
    g = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(14))
    out = C.adam_direction(g, torch.zeros(3, 5, 4), torch.zeros(3, 5, 4), step=0, betas=(0.9, 0.999), eps=1e-8)
    assert torch.equal(out, g)
    assert not torch.allclose(out, g.sign())


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_adam_direction_matches_torch_adam(steps: int) -> None:
    # Drive torch.optim.Adam (lr = 1, no weight decay, fp64) with `steps` gradients; its state is
    # then (exp_avg, exp_avg_sq) after `steps` steps. adam_direction with that state, step = steps
    # and a new gradient g must be exactly the per-unit-lr direction torch's step `steps + 1` takes
    # with g: param_new - param_old = -direction. A manual recursion (m_hat / (sqrt(v_hat) + eps))
    # gives the same thing and the same state. m and v must not be changed.
    betas, eps = (0.8, 0.95), 1e-3  # non-default, so a hard-coded 0.9/0.999/1e-8 would show
    gen = torch.Generator().manual_seed(15)
    shape = (4, 3)
    history = [torch.randn(shape, generator=gen, dtype=F64) for _ in range(steps)]
    g_new = torch.randn(shape, generator=gen, dtype=F64)

    param = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=F64))
    opt = torch.optim.Adam([param], lr=1.0, betas=betas, eps=eps, weight_decay=0.0)
    m = torch.zeros(shape, dtype=F64)
    v = torch.zeros(shape, dtype=F64)
    for grad in history:
        param.grad = grad.clone()
        opt.step()
        m = betas[0] * m + (1 - betas[0]) * grad
        v = betas[1] * v + (1 - betas[1]) * grad * grad
    state = opt.state[param]
    torch.testing.assert_close(state["exp_avg"], m, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(state["exp_avg_sq"], v, rtol=1e-12, atol=1e-14)

    m_in, v_in = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    direction = C.adam_direction(g_new, m_in, v_in, step=steps, betas=betas, eps=eps)
    assert torch.equal(m_in, state["exp_avg"]) and torch.equal(v_in, state["exp_avg_sq"])  # read-only

    t = steps + 1
    m_t = betas[0] * m + (1 - betas[0]) * g_new
    v_t = betas[1] * v + (1 - betas[1]) * g_new * g_new
    manual = (m_t / (1 - betas[0] ** t)) / ((v_t / (1 - betas[1] ** t)).sqrt() + eps)
    torch.testing.assert_close(direction, manual, rtol=1e-12, atol=1e-14)

    before = param.detach().clone()
    param.grad = g_new.clone()
    opt.step()
    torch.testing.assert_close(-(param.detach() - before), direction, rtol=1e-10, atol=1e-12)


def test_adam_direction_broadcasts_row_state_over_tokens() -> None:
    # In CAPOSelector the state is gathered per token's rows: m[ids] with ids [T, k] gives [T, k, d].
    # Each (t, i) entry must use the state of row ids[t, i] only: compare with a per-row loop.
    gen = torch.Generator().manual_seed(16)
    V, d, T, k = 10, 3, 4, 5
    m = torch.randn(V, d, generator=gen)
    v = torch.rand(V, d, generator=gen)
    ids = torch.stack([torch.randperm(V, generator=gen)[:k] for _ in range(T)])
    grads = torch.randn(T, k, d, generator=gen)
    out = C.adam_direction(grads, m[ids], v[ids], step=7, betas=(0.9, 0.999), eps=1e-8)
    for t in range(T):
        for i in range(k):
            one = C.adam_direction(grads[t, i], m[ids[t, i]], v[ids[t, i]], 7, (0.9, 0.999), 1e-8)
            torch.testing.assert_close(out[t, i], one, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# 7. row_gradient_sums
# ------------------------------------------------------------------------------------------------
def test_row_gradient_sums_matches_python_loop() -> None:
    # sums[r] = sum over kept tokens t whose subspace contains row r of G_t[slot of r], counts[r] =
    # number of such tokens; rejected tokens contribute nothing. Rows overlap between tokens (small V).
    V, d, T, k = 12, 4, 7, 5
    w, h = _head(17, V, d, T)
    gen = torch.Generator().manual_seed(18)
    actions = torch.randint(0, V, (T,), generator=gen)
    adv = torch.randn(T, generator=gen, dtype=F64)
    top = C.topk_policy(h, w, actions, k)
    grads = C.token_gradients(top, h, adv)
    keep = torch.tensor([True, False, True, True, False, True, False])
    sums, counts = G.row_gradient_sums(top, grads, keep, V)
    exp_sums = torch.zeros(V, d, dtype=F64)
    exp_counts = torch.zeros(V, dtype=F64)
    for t in range(T):
        if not keep[t]:
            continue
        for slot in range(k):
            row = int(top.ids[t, slot])
            exp_sums[row] += grads[t, slot].double()
            exp_counts[row] += 1
    assert sums.shape == (V, d) and counts.shape == (V,)
    _close(sums, exp_sums, rtol=1e-6, atol=1e-6)
    assert torch.equal(counts.double(), exp_counts)
    assert int(counts.sum()) == k * int(keep.sum())
    assert bool((counts > 1).any())  # the test really exercises overlapping rows
    # rejected tokens are ignored: changing their gradients changes nothing
    poisoned = grads.clone()
    poisoned[~keep] = 1e6
    sums2, counts2 = G.row_gradient_sums(top, poisoned, keep, V)
    assert torch.equal(sums2, sums) and torch.equal(counts2, counts)
    # nothing kept: all zeros
    sums0, counts0 = G.row_gradient_sums(top, grads, torch.zeros(T, dtype=torch.bool), V)
    assert not sums0.any() and not counts0.any()


# ------------------------------------------------------------------------------------------------
# Known bug
# ------------------------------------------------------------------------------------------------
def test_topk_policy_handles_no_tokens() -> None:
    # Expected: an empty TopK with the right trailing shape, so everything downstream is empty too.
    V, d, k = 10, 4, 3
    w = torch.randn(V, d, generator=torch.Generator().manual_seed(19))
    top = C.topk_policy(torch.zeros(0, d), w, torch.zeros(0, dtype=torch.long), k)
    assert top.ids.shape == (0, k) and top.probs.shape == (0, k) and top.onehot.shape == (0, k)
    grads = C.token_gradients(top, torch.zeros(0, d), torch.zeros(0))
    sums, counts = G.row_gradient_sums(top, grads, torch.zeros(0, dtype=torch.bool), V)
    assert grads.shape == (0, k, d) and not sums.any() and not counts.any()
