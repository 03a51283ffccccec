"""Reference image models: network shapes, likelihoods, and the Pyro model/guide contract."""
import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pyro_lpc.images.models import (
    Bernoulli,
    ConvDecoder,
    ConvEncoder,
    DiscretizedGaussian,
    DiscretizedNormal,
    Gaussian,
    MLPDecoder,
    MLPEncoder,
    conv_model,
    mlp_model,
)
from pyro_lpc.images.models.likelihoods import _UnitIntervalBernoulli

BIN = 2.0 / 255


@pytest.fixture(autouse=True)
def _fresh():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


# ---------------------------------------------------------------- networks


def test_mlp_shapes_and_positive_scale():
    dec = MLPDecoder(latent_dim=7, hidden=(11, 13), out_shape=(1, 28, 28))
    assert dec(torch.randn(5, 7)).shape == (5, 1, 28, 28)
    assert dec(torch.randn(3, 5, 7)).shape == (3, 5, 1, 28, 28)
    enc = MLPEncoder(in_shape=(1, 28, 28), hidden=(11,), latent_dim=7)
    loc, scale = enc(torch.randn(5, 1, 28, 28) * 100)  # saturating inputs: scale still >= floor
    assert loc.shape == scale.shape == (5, 7)
    assert (scale >= enc.min_scale).all()
    linears = [m for m in MLPDecoder().net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(50, 200), (200, 200), (200, 784)]
    assert sum(isinstance(m, nn.Tanh) for m in MLPDecoder().net) == 2


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_conv_shapes(size, channels):
    dec = ConvDecoder(latent_dim=6, image_size=size, channels=channels)
    out = dec(torch.randn(2, 6) * 10)
    assert out.shape == (2, channels, size, size)
    assert out.abs().max() <= 1 and isinstance(dec.deconv[-1], nn.Tanh)  # tanh output
    logits = conv_model(image_size=size, channels=channels, latent_dim=6, likelihood="bernoulli").decoder
    assert isinstance(logits.deconv[-1], nn.ConvTranspose2d)  # Bernoulli decoders output raw logits
    convs = [m for m in dec.deconv if isinstance(m, nn.ConvTranspose2d)]
    assert all(m.kernel_size == (4, 4) and m.stride == (2, 2) for m in convs)
    assert convs[0].in_channels == 256 and len(convs) == int(math.log2(size)) - 1
    enc = ConvEncoder(image_size=size, channels=channels, latent_dim=6)
    loc, scale = enc(out)
    assert loc.shape == scale.shape == (2, 6) and (scale > 0).all()
    convs = [m for m in enc.conv if isinstance(m, nn.Conv2d)]
    assert all(m.kernel_size == (4, 4) and m.stride == (2, 2) for m in convs)
    assert convs[-1].out_channels == 256
    with pytest.raises(ValueError, match=str(size)):
        enc(torch.randn(2, channels, size // 2, size // 2))


@pytest.mark.parametrize("size", [28, 48, 128])
def test_conv_unsupported_size_names_it(size):
    for make in (lambda: ConvDecoder(image_size=size), lambda: ConvEncoder(image_size=size),
                 lambda: conv_model(image_size=size)):
        with pytest.raises(ValueError, match=f"unsupported image size {size}"):
            make()


# ---------------------------------------------------------------- discretised Gaussian

LOCS = [-5.0, -1.0, -0.3, 0.0, 0.5, 0.999, 1.0, 5.0]
SCALES = [1e-4, 1e-3, BIN, 0.05, 1.0, 10.0, 1e3, 1e5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_discretized_normal_sums_to_one_and_is_finite(dtype):
    loc = torch.tensor(LOCS, dtype=dtype)[:, None]
    scale = torch.tensor(SCALES, dtype=dtype)[None, :]
    loc, scale = torch.broadcast_tensors(loc, scale)
    loc, scale = loc.clone().requires_grad_(), scale.clone().requires_grad_()
    d = DiscretizedNormal(loc, scale)
    bins = d.enumerate_support()  # (256, len(LOCS), len(SCALES))
    assert bins.shape == (256,) + loc.shape
    assert torch.allclose(bins[:, 0, 0], torch.linspace(-1, 1, 256, dtype=dtype), atol=1e-6)
    lp = d.log_prob(bins)
    assert torch.isfinite(lp).all()
    assert torch.isfinite(lp[0]).all() and torch.isfinite(lp[-1]).all()
    total = lp.exp().sum(0)
    assert (total - 1).abs().max() < 1e-4, total
    lp.sum().backward()
    assert torch.isfinite(loc.grad).all() and torch.isfinite(scale.grad).all()


def test_discretized_normal_exact_bin_probabilities():
    # float64 CDF differences as reference; sigma from ~bin width to >> bin width (the narrow-bin branch)
    centres = torch.linspace(-1, 1, 256)
    for loc, scale in [(0.2, 0.01), (0.2, 0.3), (-0.7, 20.0), (0.4, 1e3)]:
        u = (centres.double() + BIN / 2 - loc) / scale
        l = (centres.double() - BIN / 2 - loc) / scale
        u[-1], l[0] = math.inf, -math.inf
        flip = centres > loc  # upper tail: P = Phi(-l) - Phi(-u), free of cancellation

        def phi(t):  # Phi via erfc: accurate relative to its value deep in the lower tail
            return 0.5 * torch.special.erfc(-t / math.sqrt(2))

        expected = torch.where(flip, phi(-l) - phi(-u), phi(u) - phi(l)).log()
        keep = expected > -600  # bins whose float64 reference has not underflowed
        got = DiscretizedNormal(torch.tensor(loc), torch.tensor(scale)).log_prob(centres)
        assert keep.sum() > 5
        assert torch.allclose(got.double()[keep], expected[keep], atol=1e-4, rtol=1e-5), (loc, scale)
    # a far tail bin (0.9 -> centre c_242), where the float32 CDF difference underflows to 0;
    # reference from the asymptotic upper-tail series log(1 - Phi(t)), t ~ 190, in float64
    far = DiscretizedNormal(torch.tensor(-1.0), torch.tensor(0.01)).log_prob(torch.tensor(0.9))

    def log_sf(t):
        return -t * t / 2 - math.log(t) - 0.5 * math.log(2 * math.pi) + math.log(1 - t**-2 + 3 * t**-4)

    lo, hi = (242 * BIN - BIN / 2) / 0.01, (242 * BIN + BIN / 2) / 0.01
    reference = log_sf(lo) + math.log1p(-math.exp(log_sf(hi) - log_sf(lo)))
    assert abs(float(far) - reference) < 1e-2


def test_discretized_normal_matches_density_times_width_for_wide_scale():
    loc = torch.tensor(0.1)
    for scale in (0.5, 2.0, 50.0):
        centres = torch.linspace(-1, 1, 256)[1:-1]  # interior bins
        got = DiscretizedNormal(loc, torch.tensor(scale)).log_prob(centres)
        approx = torch.distributions.Normal(loc, scale).log_prob(centres) + math.log(BIN)
        assert (got - approx).abs().max() < 1e-3


def test_discretized_normal_nearest_bin_validation_and_sampling():
    d = DiscretizedNormal(torch.zeros(3), torch.full((3,), 0.2), validate_args=True)
    centre = torch.tensor([10 * BIN - 1] * 3)
    assert torch.allclose(d.log_prob(centre + 0.3 * BIN), d.log_prob(centre))
    with pytest.raises(ValueError):
        d.log_prob(torch.tensor([0.0, 1.5, 0.0]))
    x = DiscretizedNormal(torch.tensor(0.9), torch.tensor(0.5)).sample((5000,))
    assert x.min() >= -1 and x.max() <= 1
    assert torch.allclose((x + 1) / BIN, ((x + 1) / BIN).round(), atol=1e-3)  # on the grid
    assert (x == 1).float().mean() > 0.3  # the upper edge bin absorbs the tail (P ~ 0.42)
    mean = DiscretizedNormal(torch.tensor(0.9), torch.tensor(0.5)).mean
    assert abs(float(x.mean()) - float(mean)) < 0.03 and abs(float(mean) - 0.9) > 0.1
    loc = torch.tensor(0.0, requires_grad=True)
    DiscretizedNormal(loc, torch.tensor(0.1)).rsample().backward()
    assert loc.grad == 1  # straight-through


# ---------------------------------------------------------------- likelihood classes


def test_bernoulli_likelihood_hand_computation():
    logits = torch.randn(4, 1, 5, 5)
    for x in (torch.rand(4, 1, 5, 5).round(), torch.rand(4, 1, 5, 5)):  # binary and grey levels
        d = Bernoulli().distribution(logits)
        assert d.batch_shape == (4,) and d.event_shape == (1, 5, 5)
        p = torch.sigmoid(logits)
        hand = (x * p.log() + (1 - x) * (1 - p).log()).sum((1, 2, 3))
        assert torch.allclose(d.log_prob(x), hand, atol=1e-4)
    assert torch.allclose(Bernoulli().mean(logits), torch.sigmoid(logits))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bernoulli_log_prob_matches_torch_cross_entropy_far_into_the_tails(dtype):
    """The fast ``log(1 + e^-|f|)`` form against ``-binary_cross_entropy_with_logits`` (log1p):
    values within a few ulps of the logits' magnitude, gradients (closed form) equal, and
    second derivatives through the closed-form backward."""
    gen = torch.Generator().manual_seed(0)
    extreme = torch.tensor([0.0, 1e-8, -1e-8, 17.0, -17.0, 40.0, -40.0, 1e3, -1e3], dtype=dtype)
    logits = torch.cat([5 * torch.randn(2000, generator=gen, dtype=dtype), extreme]).requires_grad_(True)
    for x in (torch.rand(logits.shape, generator=gen, dtype=dtype).round(),
              torch.rand(logits.shape, generator=gen, dtype=dtype)):
        ours = Bernoulli(event_dim=1).distribution(logits).log_prob(x)
        elementwise = _UnitIntervalBernoulli(logits=logits).log_prob(x)
        reference = -F.binary_cross_entropy_with_logits(logits, x, reduction="none")
        ulp = torch.finfo(dtype).eps
        assert torch.all((elementwise - reference).abs() <= 4 * ulp * (1 + logits.abs()))
        assert torch.isclose(ours, reference.sum(), rtol=10 * ulp)
        g_ours, = torch.autograd.grad(ours, [logits], create_graph=True)
        g_ref, = torch.autograd.grad(reference.sum(), [logits], create_graph=True)
        assert torch.allclose(g_ours, g_ref, atol=4 * ulp)
        h_ours, = torch.autograd.grad(g_ours.sum(), [logits])
        h_ref, = torch.autograd.grad(g_ref.sum(), [logits])
        assert torch.allclose(h_ours, h_ref, atol=4 * ulp)


def test_gaussian_likelihood_hand_computation_fixed_and_learned():
    mean = torch.randn(3, 2, 4, 4)
    x = torch.randn(3, 2, 4, 4)

    def hand(sigma):
        return (-0.5 * ((x - mean) / sigma) ** 2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)).sum((1, 2, 3))

    fixed = Gaussian(scale=0.3).distribution(mean)
    assert fixed.event_shape == (2, 4, 4)
    assert torch.allclose(fixed.log_prob(x), hand(torch.tensor(0.3)), atol=1e-3)

    lik = Gaussian(scale=0.3, learn_scale=True, name="lik")
    lp0 = lik.distribution(mean).log_prob(x)
    log_scale = pyro.param("lik.log_scale")
    assert log_scale.shape == (2, 1, 1)
    assert torch.allclose(log_scale, torch.full((2, 1, 1), math.log(0.3)))
    assert torch.allclose(lp0, hand(torch.tensor(0.3)), atol=1e-3)
    pyro.get_param_store()["lik.log_scale"] = torch.tensor([[[0.0]], [[-1.0]]])
    sigma = torch.tensor([1.0, math.exp(-1.0)]).reshape(2, 1, 1)
    assert torch.allclose(lik.distribution(mean).log_prob(x), hand(sigma), atol=1e-3)


def test_discretized_likelihood_event_dims_and_learned_scale():
    lik = DiscretizedGaussian(scale=0.2, learn_scale=True, name="d")
    mean = torch.rand(2, 3, 8, 8) * 2 - 1
    d = lik.distribution(mean)
    assert d.batch_shape == (2,) and d.event_shape == (3, 8, 8)
    x = torch.randint(0, 256, (2, 3, 8, 8)) * BIN - 1
    per_pixel = DiscretizedNormal(mean, torch.tensor(0.2)).log_prob(x)
    assert torch.allclose(d.log_prob(x), per_pixel.sum((1, 2, 3)))
    assert pyro.param("d.log_scale").shape == (3, 1, 1)


# ---------------------------------------------------------------- Pyro model / guide


def _param_names(trace):
    return {name for name, site in trace.nodes.items() if site["type"] == "param"}


@pytest.mark.parametrize("make", [
    lambda: mlp_model(image_shape=(1, 12, 12), latent_dim=5, hidden=(16,), name="m"),
    lambda: conv_model(image_size=32, channels=3, latent_dim=5, name="m",
                       likelihood=DiscretizedGaussian(learn_scale=True, name="m.likelihood")),
])
def test_model_and_guide_traces(make):
    vae = make()
    B = 4
    x = (torch.rand(B, *vae.image_shape) * 2 - 1).clamp(-1, 1)
    if isinstance(vae.likelihood, Bernoulli):
        x = x.gt(0).float()
    model_tr = poutine.trace(vae.model).get_trace(x)
    guide_tr = poutine.trace(vae.guide).get_trace(x)
    for tr in (model_tr, guide_tr):
        z = tr.nodes["z"]
        assert z["type"] == "sample" and not z["is_observed"] and z["value"].shape == (B, 5)
        assert z["fn"].event_shape == (5,)
    assert model_tr.nodes["x"]["is_observed"] and model_tr.nodes["x"]["value"] is x
    assert "x" not in guide_tr.nodes
    model_params, guide_params = _param_names(model_tr), _param_names(guide_tr)
    dec = {f"m.decoder$$${n}" for n, _ in vae.decoder.named_parameters()}
    enc = {f"m.encoder$$${n}" for n, _ in vae.encoder.named_parameters()}
    assert dec <= model_params and not (enc & model_params)
    assert enc <= guide_params and not (dec & guide_params)
    if isinstance(vae.likelihood, Gaussian) and vae.likelihood.learn_scale:
        assert "m.likelihood.log_scale" in model_params
        assert "m.likelihood.log_scale" not in guide_params
    model_tr.compute_log_prob()
    assert torch.isfinite(model_tr.log_prob_sum())
    assert model_tr.nodes["x"]["log_prob"].shape == (B,)


def test_sample_reconstruct_and_shape_check():
    vae = conv_model(image_size=32, channels=1, latent_dim=4, likelihood="gaussian")
    assert vae.sample(3).shape == (3, 1, 32, 32)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert vae.reconstruct(x).shape == (2, 1, 32, 32)
    assert vae.reconstruct(x).abs().max() <= 1
    with pytest.raises(ValueError, match="28"):
        vae.model(torch.rand(2, 1, 28, 28))
    mlp = mlp_model(latent_dim=3, hidden=(8,))
    probs = mlp.sample(5)
    assert probs.shape == (5, 1, 28, 28) and probs.min() >= 0 and probs.max() <= 1
    generated = vae.model(batch_size=2)
    assert generated.shape == (2, 1, 32, 32)


@pytest.mark.parametrize("make, data", [
    (lambda: mlp_model(image_shape=(1, 8, 8), latent_dim=3, hidden=(16,)),
     lambda: torch.rand(8, 1, 8, 8).round()),
    (lambda: conv_model(image_size=32, channels=3, latent_dim=4, hidden_channels=(8, 8, 8),
                        likelihood=DiscretizedGaussian(learn_scale=True, name="dlgm.likelihood")),
     lambda: torch.randint(0, 256, (4, 3, 32, 32)) * BIN - 1),
])
def test_svi_steps_are_finite_and_learn(make, data):
    vae, x = make(), data()
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())
    losses = [svi.step(x) for _ in range(10)]
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-3:]) < sum(losses[:3])
    if "dlgm.likelihood.log_scale" in pyro.get_param_store():
        assert not torch.allclose(pyro.param("dlgm.likelihood.log_scale"), torch.tensor(math.log(0.1)))


@pytest.mark.parametrize("make", [
    lambda: mlp_model(image_shape=(1, 8, 8), latent_dim=3, hidden=(16,)),
    lambda: conv_model(image_size=32, channels=3, latent_dim=4, hidden_channels=(8, 8, 8)),
])
def test_mask_conditions_on_the_observed_pixels_only(make):
    vae = make()
    x = torch.rand(3, *vae.image_shape).round()
    x = x if isinstance(vae.likelihood, Bernoulli) else x * 2 - 1
    mask = torch.rand(x.shape) < 0.5
    hidden = torch.where(mask, x, torch.tensor(float("nan")))   # the missing pixels are never read
    guide_tr = poutine.trace(vae.guide).get_trace(hidden, mask=mask)
    z = guide_tr.nodes["z"]["value"].detach().requires_grad_()
    # the guide encodes x filled in with the middle of the data range
    loc, scale = vae.encoder(torch.where(mask, x, torch.tensor(vae.fill)))
    assert torch.equal(guide_tr.nodes["z"]["fn"].base_dist.loc, loc)
    assert vae.fill == (0.5 if isinstance(vae.likelihood, Bernoulli) else 0.0)
    model_tr = poutine.trace(poutine.condition(vae.model, {"z": z})).get_trace(hidden, mask=mask)
    model_tr.compute_log_prob()
    per_pixel = vae.likelihood.distribution(vae.decoder(z)).base_dist.log_prob(x)
    expected = (per_pixel * mask).flatten(1).sum(1)           # log p(x_obs | z) per image
    assert torch.allclose(model_tr.nodes["x"]["log_prob"], expected, atol=1e-4)
    model_tr.nodes["x"]["log_prob"].sum().backward()
    assert torch.isfinite(z.grad).all()
    # impute: observed pixels kept, missing ones the predictive mean; log (1/S) Σ_s p(x_mis | z_s)
    draws = torch.randn(5, 3, vae.latent_dim)
    imputed, log_p = vae.impute(x, mask, draws)
    mean = vae.likelihood.mean(vae.decoder(draws.reshape(15, -1))).reshape(5, *x.shape).mean(0)
    assert torch.allclose(imputed, torch.where(mask, x, mean))
    missing = torch.stack([(vae.likelihood.distribution(vae.decoder(d)).base_dist.log_prob(x) * ~mask).flatten(1)
                           .sum(1) for d in draws])
    assert torch.allclose(log_p, missing.logsumexp(0) - math.log(5), atol=1e-4)


def test_bad_masks_are_named():
    vae = mlp_model(image_shape=(1, 8, 8), latent_dim=3, hidden=(16,))
    x = torch.rand(2, 1, 8, 8).round()
    with pytest.raises(TypeError, match="mask must be a boolean tensor"):
        vae.model(x, mask=torch.ones(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"mask must have the shape of x, \(2, 1, 8, 8\), got \(2, 8, 8\)"):
        vae.guide(x, mask=torch.ones(2, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask needs the data x"):
        vae.model(batch_size=2, mask=torch.ones(2, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"z must have shape \(S, 2, 3\)"):
        vae.impute(x, x > 0, torch.zeros(4, 3))
