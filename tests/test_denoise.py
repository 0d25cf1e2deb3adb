"""x0 estimates against DDPMScheduler.step's pred_original_sample for each prediction type."""
import pytest
import torch
from diffusers import DDPMScheduler

from utils.method.denoise import diffusion_target, predicted_x0


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_matches_scheduler_step(ptype):
    torch.manual_seed(0)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, prediction_type=ptype, clip_sample=False)
    sample, out = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    for t in (0, 17, 500, 999):
        ref = sched.step(out, t, sample).pred_original_sample
        ours = predicted_x0(sched, out, sample, torch.tensor([t]))
        assert torch.allclose(ours, ref, atol=1e-5), (ptype, t)


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_perfect_prediction_recovers_latents(ptype):
    torch.manual_seed(1)
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=ptype, rescale_betas_zero_snr=False)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([5, 300, 900])
    zt = sched.add_noise(x0, noise, t)
    target = diffusion_target(sched, x0, noise, t)
    assert torch.allclose(predicted_x0(sched, target, zt, t), x0, atol=1e-3)


def test_clamp_and_bad_type():
    sched = DDPMScheduler(num_train_timesteps=1000)
    x = predicted_x0(sched, torch.full((1, 1, 2, 2), 50.0), torch.zeros(1, 1, 2, 2), torch.tensor([999]), clamp=1.0)
    assert x.abs().max().item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        predicted_x0(sched, torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([0]), prediction_type="flow")


def test_epsilon_with_zero_terminal_snr_is_refused():
    from utils.common.errors import InputError
    from utils.method.denoise import check_x0_estimable

    eps = DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon", rescale_betas_zero_snr=True)
    with pytest.raises(InputError, match=r"rescale_betas_zero_snr=True.*timestep 999.*--t_max 998"):
        check_x0_estimable(eps, 0, 999)
    check_x0_estimable(eps, 0, 998)  # the range without the zero-SNR timestep is fine
    check_x0_estimable(DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction",
                                     rescale_betas_zero_snr=True), 0, 999)
    check_x0_estimable(DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon"), 0, 999)


class _LinearUNet(torch.nn.Module):
    """A stand-in UNet: out = w * z + b, recording the timesteps it is called at."""

    def __init__(self):
        super().__init__()
        self.w, self.b = torch.nn.Parameter(torch.tensor(0.5)), torch.nn.Parameter(torch.tensor(0.1))
        self.seen = []

    def forward(self, z, t, cond):
        self.seen.append(t.tolist())
        return type("Out", (), {"sample": self.w * z + self.b})()


def test_unrolled_chain_runs_trailing_steps_from_noise_with_gradients_through_each():
    from diffusers import DDIMScheduler

    from utils.method.denoise import unrolled_x0

    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                          clip_sample=False)
    unet, cond = _LinearUNet(), torch.zeros(2, 3, 8)
    x0 = unrolled_x0(unet, sched, cond, (2, 4, 8, 8), 3, torch.Generator().manual_seed(0))
    assert unet.seen == [[999, 999], [666, 666], [332, 332]]  # trailing spacing: round(1000 - k * 1000 / 3) - 1
    x0.sum().backward()
    assert unet.w.grad.abs() > 0 and unet.b.grad.abs() > 0
    # by hand for one step: x0 = sqrt(abar) z - sqrt(1 - abar) v at t = 999, z the seed's noise (abar = 0 there)
    one = unrolled_x0(_LinearUNet(), sched, cond, (2, 4, 8, 8), 1, torch.Generator().manual_seed(0))
    z = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(one, -(0.5 * z + 0.1), atol=1e-5)
    # two steps equal a DDIM sampling loop with the same noise
    ddim = DDIMScheduler.from_config(sched.config, timestep_spacing="trailing")
    ddim.set_timesteps(2)
    ref_unet = _LinearUNet()
    zz = z.clone()
    with torch.no_grad():
        zz = ddim.step(ref_unet(zz, torch.tensor([999, 999]), cond).sample, ddim.timesteps[0], zz).prev_sample
        last = ref_unet(zz, torch.tensor([499, 499]), cond).sample
        ref = predicted_x0(sched, last, zz, torch.tensor([499, 499]))
        two = unrolled_x0(_LinearUNet(), sched, cond, (2, 4, 8, 8), 2, torch.Generator().manual_seed(0))
    assert torch.allclose(two, ref, atol=1e-5)


def test_guided_output_is_the_pipelines_guidance():
    from utils.method.denoise import guided_output

    cond, uncond = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])
    assert torch.equal(guided_output(cond, uncond, 3.0), torch.tensor([4.0, -5.0]))  # 1 + 3 * (2 - 1), 1 + 3 * -2
    assert torch.equal(guided_output(cond, uncond, 1.0), cond)


class _CondUNet(_LinearUNet):
    """out = w * z + b + mean(cond): the conditioning changes the output."""

    def forward(self, z, t, cond):
        self.seen.append(t.tolist())
        return type("Out", (), {"sample": self.w * z + self.b + cond.mean()})()


def test_unrolled_chain_with_guidance_reads_both_branches():
    from utils.method.denoise import unrolled_x0

    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                          clip_sample=False)
    cond, uncond = torch.ones(2, 3, 8), torch.zeros(2, 3, 8)
    unet = _CondUNet()
    one = unrolled_x0(unet, sched, cond, (2, 4, 8, 8), 1, torch.Generator().manual_seed(0),
                      uncond_hidden_states=uncond, guidance_scale=3.0)
    assert len(unet.seen) == 2  # the conditional and the unconditional forward
    z = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    # abar = 0 at t = 999: x0 = -v, v = (0.5 z + 0.1) + 3 * ((0.5 z + 0.1 + 1) - (0.5 z + 0.1)) = 0.5 z + 3.1
    assert torch.allclose(one, -(0.5 * z + 3.1), atol=1e-5)
    plain = unrolled_x0(_CondUNet(), sched, cond, (2, 4, 8, 8), 1, torch.Generator().manual_seed(0))
    assert torch.allclose(plain, -(0.5 * z + 1.1), atol=1e-5)


def test_frozen_unconditional_branch_carries_no_gradient():
    """guided = (1 - w) uncond + w cond: d/db is (1 - w) + w = 1 with both branches, w with the uncond frozen."""
    from utils.method.denoise import unrolled_x0

    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                          clip_sample=False)
    cond, uncond = torch.ones(2, 3, 8), torch.zeros(2, 3, 8)
    grads = {}
    for frozen in (False, True):
        unet = _CondUNet()
        x0 = unrolled_x0(unet, sched, cond, (2, 4, 8, 8), 1, torch.Generator().manual_seed(0),
                         uncond_hidden_states=uncond, guidance_scale=3.0, frozen_uncond=frozen)
        x0.sum().backward()  # x0 = -v at t = 999
        grads[frozen] = unet.b.grad.item()
    assert grads[False] == pytest.approx(-512.0) and grads[True] == pytest.approx(-3 * 512.0)
