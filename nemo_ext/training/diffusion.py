"""Diffusion family: EDM post-training of the Cosmos DiT.

Video is encoded by the frozen continuous tokenizer and captions by the frozen T5 on the fly.
Each sample's noise level and noise come from a generator seeded by the sample's position in the
data stream: every layout (TP/PP/DP, microbatching) and a resumed run see identical draws.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state

from nemo_ext.diffusion.edm import EDM, broadcast_to
from nemo_ext.training.module import WorldModelModule


def noise_seed(train_seed: int, sample_seed: int) -> int:
    """Seed of one sample's diffusion noise: the loader's per-position sample seed mixed with
    ``trainer.seed`` (so the noise can be varied independently of the clip choice)."""
    return (train_seed * 0x9E3779B1 + sample_seed) % (2**63 - 1)


class DiffusionModule(WorldModelModule):
    def __init__(self, cfg, plan):
        super().__init__(cfg, plan)
        self.edm = EDM(cfg.model.edm)

    def build_world_model(self):
        from nemo_ext.conditioning.text import T5TextEncoder
        from nemo_ext.models.dit.model import CosmosDiT, build_transformer_config
        from nemo_ext.models.world_model import WorldModel
        from nemo_ext.tokenizers.continuous import ContinuousVideoTokenizer

        m = self.cfg.model
        dtype = self.plan.dtype
        # Precomputed latent shards need no tokenizer, and no text encoder unless captions are
        # dropped (then it embeds the empty prompt).
        precomputed = self.cfg.data.kind == "latent"
        self.tokenizer = None if precomputed else ContinuousVideoTokenizer(m.tokenizer, m.edm.sigma_data).to(dtype)
        needs_text = self.task.uses_text(self.cfg.task) and (
            not precomputed or self.cfg.task.caption_dropout > 0)
        self.text_encoder = T5TextEncoder(m.text_encoder, m.context_dim).to(dtype) if needs_text else None
        config = build_transformer_config(m, self.cfg.parallel, dtype)
        net = CosmosDiT(
            config,
            m,
            extra_channels=self.plan.extra_channels,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
        )
        return WorldModel(config, net, self.task.build_conditioner(self.cfg.task, m, self.cfg.data))

    def prepare_microbatch(self, raw: dict, index: int, validation: bool = False) -> dict:
        """Move a loader batch to the device, encode video and captions with the frozen encoders,
        and draw each sample's noise level and noise from a generator seeded by the sample's
        position in the data stream: every layout (TP/PP/DP, microbatching) and a resumed run
        see identical draws. A validation batch draws from its sample seeds alone (the same noise
        whatever ``trainer.seed``: the runs of a sweep are validated alike), without caption dropout."""
        device = self.compute_device
        if "latents" in raw:  # precomputed latent shards
            latents = raw["latents"].to(device, non_blocking=True)
        else:
            latents = self.tokenizer.encode(raw["video"].to(device, non_blocking=True))
        gen = torch.Generator(device=device)
        sigmas, noises, dropped, cond_noises = [], [], [], []
        p_drop = 0.0 if validation else self.cfg.task.caption_dropout
        base_seed = 0 if validation else self.cfg.trainer.seed
        for seed in raw["sample_seed"].tolist():
            gen.manual_seed(noise_seed(base_seed, seed))
            sigmas.append(self.edm.sample_sigma(1, gen))
            noises.append(torch.randn(latents.shape[1:], generator=gen, device=device))
            dropped.append(p_drop > 0 and torch.rand(1, generator=gen, device=device).item() < p_drop)
            if self.cfg.model.video2world:
                cond_noises.append(torch.randn(latents.shape[1:], generator=gen, device=device))
        context = context_mask = None  # a task without text fills the context in its conditioner
        if self.task.uses_text(self.cfg.task):
            context, context_mask = self._text_context(raw, dropped, device)
        fps = self.cfg.data.fps
        if fps is None and "fps" in raw:
            fps = float(raw["fps"][0])  # RoPE's time scale: the clips' own frame rate
        batch = self.task_entries(raw, device, ("video", "latents", "context", "context_mask"))
        batch.update(
            latents=latents,
            context=context,
            context_mask=context_mask,
            sigma=torch.cat(sigmas),
            noise=torch.stack(noises),
            fps=fps,
        )
        if cond_noises:
            batch["cond_noise"] = torch.stack(cond_noises)
        return batch

    def forward_step(self, data_iterator, model):
        mb = next(data_iterator)
        x0, sigma = mb["latents"], mb["sigma"]
        x_t = self.edm.noisy_input(x0, sigma, mb["noise"])
        _, _, c_in, c_noise = self.edm.preconditioning(sigma)
        x_in = x_t * broadcast_to(c_in, x_t)
        net_kwargs = {"fps": mb["fps"]}
        given = None
        if self.cfg.model.video2world:
            x_in, given, net_kwargs["condition_mask"] = self._video2world_input(x0, x_in, sigma, mb["cond_noise"])
        out = model(x_in, c_noise, mb, **net_kwargs)
        return out, partial(self._loss, x0, x_t, sigma, given)

    def _video2world_input(self, x0, x_in, sigma, cond_noise):
        """Video2World, as Cosmos-1 trains and samples it: the first latent frames are the clean
        clip plus a little noise (``model.condition_augment_sigma``), scaled for that noise level;
        the condition-mask channel marks them; their prediction is replaced by the truth and they
        carry no loss. Returns (model input, per-sample given-frame indicator, condition mask)."""
        m = self.cfg.model
        b, _, t, h, w = x0.shape
        frames = torch.zeros(1, 1, t, 1, 1, device=x0.device, dtype=x0.dtype)
        frames[:, :, : m.condition_latent_frames] = 1.0
        aug = torch.full_like(sigma, m.condition_augment_sigma)
        _, _, c_in_aug, _ = self.edm.preconditioning(aug)
        cond_in = (x0 + broadcast_to(aug, x0) * cond_noise) * broadcast_to(c_in_aug, x0)
        # A sample whose noise level is below the augmentation level is generated whole.
        given = frames * broadcast_to((sigma > aug).to(x0.dtype), x0)
        x_in = given * cond_in + (1 - given) * x_in
        return x_in, given, frames.expand(b, 1, t, h, w)

    def _loss(self, x0, x_t, sigma, given, output):
        x0_pred = self.edm.denoise(x_t, sigma, output.float())
        if given is not None:
            x0_pred = given * x0 + (1 - given) * x0_pred
        loss = self.edm.loss(x0, x0_pred, sigma, mask=None if given is None else 1 - given).mean()
        # clone: megatron divides the returned loss in place by the number of microbatches
        return loss, {"loss": loss.detach().clone()}
