"""The order-parameter ODEs: closed-form Gaussian averages, right-hand side against SGD steps,
integration against simulation, and the training curve of `--ode 1`."""
import math
import time

import numba
import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from dpp_pruning.base.data import generate_teacher, teacher_weights
from dpp_pruning.pipeline import workflow
from dpp_pruning.theory import order_param_odes as ode
from dpp_pruning.theory.order_params import generalisation_error


def erf_g(z):
    return torch.erf(torch.as_tensor(z) / math.sqrt(2.0)).numpy()


def erf_gp(z):
    return math.sqrt(2.0 / math.pi) * np.exp(-0.5 * z ** 2)


def random_covariance(rng, k, m, overlap=0.6):
    """Q, R, T of a random student w (k, N) partly aligned with a teacher w* (m, N), N = 40."""
    w_star = rng.standard_normal((m, 40))
    w = overlap * w_star[rng.integers(0, m, k)] + rng.standard_normal((k, 40))
    return ode.initial_conditions(w, rng.standard_normal(k), w_star)


_reference_i4 = numba.njit(ode.i4)   # the closed form, compiled for scalars


@numba.njit
def reference_delta_sq_average(c, u, k):
    """sum_cd u_c u_d I4(i, l, c, d) (k, k), as the integrator computed it before: I4 in its
    closed form (`ode.i4`) for every i <= l and c <= d."""
    n_fields = c.shape[0]
    out = np.empty((k, k))
    for i in range(k):
        for l in range(i, k):  # noqa: E741
            total = 0.0
            for a in range(n_fields):
                for b in range(a, n_fields):
                    term = u[a] * u[b] * _reference_i4(c[i, i], c[l, l], c[i, l], c[i, a],
                                                       c[i, b], c[l, a], c[l, b], c[a, a],
                                                       c[b, b], c[a, b])
                    total += term if a == b else 2.0 * term
            out[i, l] = out[l, i] = total
    return out


def reference_derivatives(q, r, t, v, v_star, lr, noise_std=0.0, train_v=True):
    """(dQ, dR, dv) from the vectorised closed forms (`ode.gaussian_averages`) and
    `reference_delta_sq_average`: the right-hand side as it was before `ode.rates`."""
    k = q.shape[0]
    u = np.concatenate([v, -np.asarray(v_star, dtype=np.float64)])        # (L,)
    c = ode.covariance(q, r, t)
    two, three, jj = ode.gaussian_averages(c, k)
    field_delta = three @ u                     # (k, L): <g'(lambda_i) f_b Delta>
    delta_sq = reference_delta_sq_average(c, u, k) + noise_std ** 2 * jj
    drift = -lr * v[:, None] * field_delta[:, :k]
    dq = drift + drift.T + lr ** 2 * np.outer(v, v) * delta_sq
    dr = -lr * v[:, None] * field_delta[:, k:]
    dv = -lr * (two @ u) if train_v else np.zeros_like(v)
    return dq, dr, dv


def reference_integrate(q0, r0, t, v0, v_star, lr, alphas, noise_std=0.0, train_v=True,
                        rtol=1e-8, atol=1e-10):
    """The integration as it was before: RK45 (Dormand-Prince 5(4)) on the full (Q, R, v)
    with `reference_derivatives`; returns an ode.Trajectory."""
    k, m = r0.shape
    sizes = np.cumsum([k * k, k * m])

    def unpack(y):
        return y[:sizes[0]].reshape(k, k), y[sizes[0]:sizes[1]].reshape(k, m), y[sizes[1]:]

    def rhs(_, y):
        q, r, v = unpack(y)
        dq, dr, dv = reference_derivatives(q, r, t, v, v_star, lr, noise_std, train_v)
        return np.concatenate([dq.ravel(), dr.ravel(), dv])

    start = time.perf_counter()
    sol = solve_ivp(rhs, (0.0, alphas[-1]), np.concatenate([q0.ravel(), r0.ravel(), v0]),
                    method="RK45", t_eval=alphas, rtol=rtol, atol=atol)
    assert sol.success, sol.message
    q, r, v = (np.stack(parts) for parts in zip(*(unpack(y) for y in sol.y.T), strict=True))
    return ode.Trajectory(np.asarray(alphas, dtype=np.float64), q, r, v, t,
                          np.asarray(v_star, dtype=np.float64), float(noise_std), sol.nfev,
                          time.perf_counter() - start)


def test_gaussian_averages_match_monte_carlo():
    rng = np.random.default_rng(0)
    q, r, t, _ = random_covariance(rng, 2, 2)
    c = ode.covariance(q, r, t)                                      # (4, 4)
    two, three, jj = ode.gaussian_averages(c, 2)
    four = ode.i4_tensor(c, 2)
    f = rng.standard_normal((200_000, 4)) @ np.linalg.cholesky(c).T  # (S, L) fields
    g, gp = erf_g(f), erf_gp(f[:, :2])                               # (S, L), (S, 2)
    samples = {
        "I2": (two, np.einsum("si,sc->sic", g[:, :2], g)),
        "I3": (three, np.einsum("si,sb,sc->sibc", gp, f, g)),
        "I4": (four, np.einsum("si,sl,sc,sd->silcd", gp, gp, g, g)),
        "J2": (jj, np.einsum("si,sl->sil", gp, gp)),
    }
    for name, (closed, draws) in samples.items():
        mean, se = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
        assert closed.shape == mean.shape, name
        assert np.all(np.abs(closed - mean) < 5 * se + 1e-12), name
    u = rng.standard_normal(4)
    assert np.allclose(ode.delta_sq_average(c, u, 2), np.einsum("ilcd,c,d->il", four, u, u),
                       rtol=1e-12, atol=1e-14)


def test_asin_matches_numpy():
    """The arcsin of the I4 loop on a grid of [-1, 1], at the edges and where its two branches
    meet, within 2 units in the last place of np.arcsin; NaN outside [-1, 1]."""
    x = np.concatenate([np.linspace(-1.0, 1.0, 20_001), np.geomspace(1e-300, 1e-3, 50),
                        [0.5, np.nextafter(0.5, 0.0), np.nextafter(0.5, 1.0), -0.5,
                         np.nextafter(1.0, 0.0), -0.0]])
    ours, exact = np.array([ode.asin(a) for a in x]), np.arcsin(x)
    assert np.all(np.abs(ours - exact) <= 2 * np.spacing(np.abs(exact)))
    assert ode.asin(1.0) == math.pi / 2 and ode.asin(-1.0) == -math.pi / 2
    assert math.isnan(ode.asin(1.0 + 1e-15)) and math.isnan(ode.asin(-1.5))


@pytest.mark.parametrize("k,m,overlap,scale", [
    (1, 1, 0.6, 1.0), (3, 2, 0.6, 1.0), (6, 2, 0.1, 1.0), (5, 4, 0.6, 2.0),
    (4, 2, 8.0, 1.0),          # students almost parallel to teachers: asin arguments near 1
    (20, 2, 0.6, 0.5)])
def test_right_hand_side_matches_the_previous_formulation(k, m, overlap, scale):
    """`ode.derivatives` (the compiled `rates` on the packed state) against the vectorised closed
    forms with the previous I4 loop, to 1e-12 relative, with noise and with a frozen second
    layer; the I4 sum alone against the previous loop likewise."""
    rng = np.random.default_rng(k + m)
    q, r, t, v = random_covariance(rng, k, m, overlap)
    q, r = scale ** 2 * q, scale * r                       # student weights scaled by `scale`
    v_star = 4.0 * rng.standard_normal(m)
    for sigma, train_v in ((0.0, True), (0.3, True), (0.3, False)):
        ours = ode.derivatives(q, r, t, v, v_star, 0.5, sigma, train_v)
        previous = reference_derivatives(q, r, t, v, v_star, 0.5, sigma, train_v)
        for new, old in zip(ours, previous, strict=True):
            assert new.shape == old.shape
            assert np.abs(new - old).max() <= 1e-12 * np.abs(old).max()
        assert np.array_equal(ours[0], ours[0].T)
    c, u = ode.covariance(q, r, t), np.concatenate([v, -v_star])
    previous = reference_delta_sq_average(c, u, k)
    assert np.abs(ode.delta_sq_average(c, u, k) - previous).max() <= 1e-12 * np.abs(previous).max()


def test_state_packing_round_trips():
    rng = np.random.default_rng(5)
    q, r, t, v = random_covariance(rng, 4, 3)
    y = ode.pack(q, r, v)
    assert y.shape == (4 * 5 // 2 + 4 * 3 + 4,)
    for new, old in zip(ode.unpack(y, 4, 3), (q, r, v), strict=True):
        assert np.array_equal(new, old)
    many = ode.unpack(np.stack([y, 2 * y]), 4, 3)
    assert many[0].shape == (2, 4, 4) and np.array_equal(many[1][1], 2 * r)


def sgd_step_changes(w, v, w_star, v_star, x, noise, lr):
    """N times the change of Q (S, K, K), R (S, K, M), v (S, K) made by one SGD step from the
    same weights w (K, N), v (K,) on each sample x (S, N) with output noise noise (S,)."""
    n = w.shape[1]
    lam, nu = x @ w.T / math.sqrt(n), x @ w_star.T / math.sqrt(n)   # (S, K), (S, M)
    delta = erf_g(lam) @ v - (erf_g(nu) @ v_star + noise)            # (S,)
    coef = (lr / math.sqrt(n)) * delta[:, None] * v * erf_gp(lam)     # (S, K)
    w_new = w[None] - coef[:, :, None] * x[:, None, :]                 # (S, K, N)
    v_new = v[None] - (lr / n) * delta[:, None] * erf_g(lam)
    q0, r0 = w @ w.T / n, w @ w_star.T / n
    q1 = np.einsum("skn,sln->skl", w_new, w_new) / n
    r1 = w_new @ w_star.T / n
    # the O(1/N) part: eta^2 v_i v_k <(|x|^2 / N - 1) Delta^2 g'_i g'_k>
    gp = erf_gp(lam)
    finite = (lr ** 2 * ((x ** 2).sum(1) / n - 1) * delta ** 2)[:, None, None] * np.einsum(
        "i,k,si,sk->sik", v, v, gp, gp)
    return n * (q1 - q0), n * (r1 - r0), n * (v_new - v), finite


def test_right_hand_side_matches_averaged_sgd_steps():
    rng = np.random.default_rng(1)
    n, k, m, lr, sigma = 100, 3, 2, 0.5, 0.5
    w_star = rng.standard_normal((m, n))
    w = 0.5 * w_star[[0, 1, 0]] + rng.standard_normal((k, n))
    v, v_star = rng.standard_normal(k), np.array([4.0, 4.0])
    parts = []
    for _ in range(8):
        x = rng.standard_normal((25_000, n))
        parts.append(sgd_step_changes(w, v, w_star, v_star, x,
                                      sigma * rng.standard_normal(25_000), lr))
    dq_s, dr_s, dv_s, finite = (np.concatenate(p) for p in zip(*parts, strict=True))
    q, r, t, _ = ode.initial_conditions(w, v, w_star)
    dq, dr, dv = ode.derivatives(q, r, t, v, v_star, lr, sigma)
    se = lambda a: a.std(0) / math.sqrt(len(a))   # noqa: E731
    assert np.all(np.abs(dr_s.mean(0) - dr) < 5 * se(dr_s))
    assert np.all(np.abs(dv_s.mean(0) - dv) < 5 * se(dv_s))
    o_n = np.abs(finite.mean(0)) + 5 * se(finite)                 # the O(1/N) allowance
    assert np.all(np.abs(dq_s.mean(0) - dq) < 5 * se(dq_s) + o_n)
    assert (o_n < 0.1 * np.abs(dq)).all()                         # and it is small
    for exact, draws in ((dq, dq_s), (dr, dr_s), (dv, dv_s)):    # the comparison is sharp
        assert np.abs(exact).max() > 20 * se(draws).max()
    # frozen second layer: same Q, R, no v
    dq_f, dr_f, dv_f = ode.derivatives(q, r, t, v, v_star, lr, sigma, train_v=False)
    assert np.array_equal(dq_f, dq) and np.array_equal(dr_f, dr) and not dv_f.any()


@pytest.fixture(scope="module")
def small_teacher():
    """N = 200, M = 2, v* = 1, sigma = 0.1: alpha up to 20 (P = 4000)."""
    return generate_teacher(200, 2, 4000, mode="normal", sig_w=0.1, v_star=1, seed=1)


def test_ode_agrees_with_simulation_at_n_200(small_teacher):
    """eps_g of the simulated student's own Q, R, v (no test-set noise) against the ODE started
    from that student's initial order parameters, over 6 seeds: the mean relative gap is within
    4 standard errors of the seed-to-seed spread plus an O(1/N) allowance."""
    n, gaps = small_teacher.input_dim, []
    for seed in range(1, 7):
        _, curve = workflow.train_with_curve(small_teacher, 3, lr=0.5, seed=seed, points=10,
                                             test_rows=10)
        eps_sim = generalisation_error(curve.q, curve.r, curve.ode.t, curve.v,
                                       small_teacher.w2.numpy().ravel())
        gaps.append(eps_sim / curve.ode.eps_g - 1)
        assert curve.ode.eps_g[-1] < 0.1 * curve.ode.eps_g[0]      # it learnt
    gaps = np.array(gaps)                                            # (seeds, points)
    se = gaps.std(0, ddof=1) / math.sqrt(len(gaps))
    assert np.all(np.abs(gaps.mean(0)) < 4 * se + 1.0 / n)
    assert np.abs(gaps).max() < 0.5                                  # no seed strays far


def paper_start(k, seed=1, n=500, m=2):
    """Q0 (k, k), R0 (k, m), T (m, m), v0 (k,) of the student the simulation starts from
    (`workflow.initial_student`: both layers ~ N(0, 1)) against the teacher w* (m, n) ~ N(0, 1)
    that `generate_teacher` draws first for the same seed: the start of notebook 5's runs."""
    student = workflow.initial_student(n, k, "sigmoid", "normal", seed)
    w_star, _ = teacher_weights(n, m, "normal", 4.0, torch.Generator().manual_seed(seed))
    return ode.initial_conditions(student.w1.weight.detach().double().numpy(),
                                  student.w2.weight.detach().double().numpy(),
                                  w_star.double().numpy())


def largest_differences(ours, previous):
    """Largest relative differences {name: float} of two Trajectories: the final Q, R, v
    (relative to their largest entry) and eps_g, and eps_g over the whole curve."""
    out = {name: float(np.abs(getattr(ours, name)[-1] - getattr(previous, name)[-1]).max()
                       / np.abs(getattr(previous, name)[-1]).max()) for name in ("q", "r", "v")}
    out["eps_g"] = abs(float(ours.eps_g[-1] / previous.eps_g[-1]) - 1)
    out["eps_g curve"] = float(np.abs(ours.eps_g / previous.eps_g - 1).max())
    return out


@pytest.mark.parametrize("noise_std,train_v", [(0.0, True), (0.25, False)])
def test_integration_agrees_with_the_previous_integrator(noise_std, train_v):
    """K = 6, M = 2, v* = 4, eta = 0.5 from the simulation's initial student at N = 500 to
    alpha = 1600 (plateau, specialisation, slow convergence): `ode.integrate` at its default
    tolerances against the previous integration (`reference_integrate`) at 100 times tighter
    ones: the final Q, R, v and eps_g to 1e-7 relative, the eps_g curve to 1e-6."""
    q, r, t, v = paper_start(6)
    alphas = np.concatenate([[0.0], np.geomspace(0.01, 1600, 40)])
    args = (q, r, t, v, [4.0, 4.0], 0.5, alphas, noise_std, train_v)
    ours = ode.integrate(*args)
    gaps = largest_differences(ours, reference_integrate(*args, rtol=1e-10, atol=1e-12))
    assert gaps.pop("eps_g curve") < 1e-6
    assert max(gaps.values()) < 1e-7
    assert ours.eps_g[-1] < 0.05 * ours.eps_g[0]                   # it learnt


def test_integration_converged():
    """Tightening the embedded pair's tolerances tenfold moves the curve by < 1e-5 relative."""
    rng = np.random.default_rng(2)
    q, r, t, v = random_covariance(rng, 3, 2, overlap=0.1)
    alphas = np.linspace(0, 100, 21)
    loose = ode.integrate(q, r, t, v, [4.0, 4.0], 0.5, alphas).test_loss
    tight = ode.integrate(q, r, t, v, [4.0, 4.0], 0.5, alphas, rtol=1e-9, atol=1e-11).test_loss
    assert np.abs(loose / tight - 1).max() < 1e-5
    assert loose[-1] < 0.1 * loose[0]


@pytest.mark.parametrize("mode,epochs", [("normal", 2), ("soft_committee", 1)])
def test_segmented_training_is_bit_identical(small_teacher, mode, epochs):
    """Training in ~7 segments (crossing the epoch boundary) gives the weights of one call."""
    plain = workflow.train(small_teacher, 4, mode=mode, lr=0.5, epochs=epochs, seed=3)
    cut, curve = workflow.train_with_curve(small_teacher, 4, mode=mode, lr=0.5, epochs=epochs,
                                           seed=3, points=7, test_rows=50, with_ode=False)
    assert torch.equal(plain.w1.weight, cut.w1.weight)
    assert torch.equal(plain.w2.weight, cut.w2.weight)
    assert curve.alpha[-1] == epochs * len(small_teacher) / small_teacher.input_dim
    assert len(curve.alpha) == 8 and curve.ode is None


def test_cli_writes_the_training_curve(small_teacher, tmp_path):
    from dpp_pruning.base.storage import save_pickle
    from entry_points import call
    save_pickle(small_teacher, tmp_path / "teacher.pkl")
    common = ["--input_dim", 200, "--student_h_size", 3, "--teacher_path",
              tmp_path / "teacher.pkl", "--output_dir", tmp_path]
    code, out, err = call("teacher_student.py", common + ["--ode", 1, "--momentum", 0.5])
    assert code != 0 and "--ode 1 needs --momentum 0" in err and "Traceback" not in err
    assert not (tmp_path / "training_curve_3.csv").exists()
    code, out, err = call("teacher_student.py", common + ["--ode", 1])
    assert code == 0, err
    table = np.genfromtxt(tmp_path / "training_curve_3.csv", delimiter=",", names=True)
    assert table.dtype.names == ("alpha", "test_loss", "ode_loss")
    assert 40 <= len(table) <= 51 and table["alpha"][0] == 0 and table["alpha"][-1] == 20
    assert (np.diff(table["alpha"]) > 0).all()
    assert np.isfinite(table["ode_loss"]).all() and table["test_loss"][-1] < table["test_loss"][0]
    assert f"ODE {table['ode_loss'][-1]:.6g}" in out + err
    with_ode = (tmp_path / "student_3.pth").read_bytes()
    code, _, err = call("teacher_student.py", common)
    assert code == 0, err
    assert (tmp_path / "student_3.pth").read_bytes() == with_ode


def run_ode_notebook(root):
    """Execute notebook 5 in the environment set -> (text outputs of its code cells, one
    string per cell)."""
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(root / "notebooks" / "5_ode_theory.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(root / "notebooks")}}).execute()
    return ["".join(o.get("text", "") for o in c.outputs) for c in nb.cells
            if c.cell_type == "code"]


def test_notebook_runs_at_smoke_scale(root, tmp_path, monkeypatch):
    monkeypatch.setenv("ODE_SCALE", "smoke")
    monkeypatch.setenv("ODE_OUT", str(tmp_path))
    monkeypatch.delenv("TRAINING_CURVE", raising=False)
    text = "".join(run_ode_notebook(root))
    assert "scale smoke: N = 40" in text and "largest gap" in text
    assert text.count("measured (20 masks)") == 2
    assert (tmp_path / "figures" / "ode_test_loss.png").stat().st_size > 0
    assert (tmp_path / "figures" / "ode_order_parameters.png").stat().st_size > 0


def test_notebook_shows_the_users_training_curve(root, tmp_path, monkeypatch):
    """A curve written by teacher_dataset.py + teacher_student.py --ode 1 (N = 20, P = 2000) is
    what notebook 5 draws when TRAINING_CURVE names it, with its figure in ODE_OUT (never
    beside the file, which may be the checkout's root)."""
    from entry_points import call
    code, _, err = call("teacher_dataset.py", ["--input_dim", 20, "--num_data", 2000,
                                               "--teacher_path", tmp_path / "teacher.pkl"])
    assert code == 0, err
    code, _, err = call("teacher_student.py", ["--input_dim", 20, "--student_h_size", 3,
                                               "--teacher_path", tmp_path / "teacher.pkl",
                                               "--output_dir", tmp_path, "--ode", 1])
    assert code == 0, err
    curve = tmp_path / "training_curve_3.csv"
    table = np.genfromtxt(curve, delimiter=",", names=True)
    monkeypatch.setenv("TRAINING_CURVE", str(curve))
    monkeypatch.setenv("ODE_OUT", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("ODE_SCALE", "smoke")                 # were the file ignored
    outputs = run_ode_notebook(root)
    assert outputs[0].startswith(f"reading {curve} (TRAINING_CURVE)")
    assert (f"{len(table)} points, alpha up to 100; final test loss "
            f"{table['test_loss'][-1]:.5f} simulated, {table['ode_loss'][-1]:.5f} ODE"
            ) in outputs[1]
    assert "training_curve_3.csv" in outputs[3] and "largest gap" in outputs[3]
    assert "sigma =" not in "".join(outputs)                  # no run of the notebook's own
    assert (tmp_path / "elsewhere" / "figures" / "ode_test_loss.png").read_bytes()[:4] == \
        b"\x89PNG"
    assert not (tmp_path / "figures").exists()


def test_cli_reports_a_failed_integration(small_teacher, tmp_path, monkeypatch):
    from dpp_pruning.base.storage import save_pickle
    from entry_points import call

    def fail(*args, **kwargs):
        raise ode.IntegrationError("the ODE integration failed: step size too small")
    monkeypatch.setattr(ode, "integrate", fail)
    save_pickle(small_teacher, tmp_path / "teacher.pkl")
    code, _, err = call("teacher_student.py", ["--input_dim", 200, "--student_h_size", 3,
                                               "--teacher_path", tmp_path / "teacher.pkl",
                                               "--output_dir", tmp_path, "--ode", 1])
    assert code != 0 and "use a smaller --lr or --ode 0" in err and "Traceback" not in err
    assert not (tmp_path / "training_curve_3.csv").exists()
    assert not (tmp_path / "student_3.pth").exists()
