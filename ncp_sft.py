"""NCP-SFT: supervised fine-tuning on the preferred images, with the error in the U-Net encoder's space at t-1.

Gambashidze et al. 2024, section 3: the diffusion loss of eq. 3 with the error replaced by eq. 13, on winners
only. The losers are never decoded or passed through the U-Net, and there is no reference model. With --space
latent it is plain SFT in noise space:

    e_w   = || E(x_{t-1}^pred, t-1, c) - E(x_{t-1}^*, t-1, c) ||^2     eq. 13 (ncp), or || noise - pred ||^2 (eq. 3)
    L_SFT = e_w

    python ncp_sft.py --model tiny --data synthetic
    torchrun --nproc_per_node=4 ncp_sft.py --model sdxl --data /data/pickapic_v2

Outputs as ncp_dpo.py's; the scaffolding is run.py's.
"""

import encoder
import run
import sample


def sft_loss(e_w):
    """Eq. 3 on winners (latent) or with e^NCP of eq. 13: L = mean over the batch of e_w, (B,) -> scalar."""
    loss = e_w.mean()
    return loss, {"loss": loss.detach().float(), "e_w": e_w.mean().detach().float()}


def errors(unet, scheduler, x0, cond, generator, space="ncp", depth="mid", step_back=1, policy=None):
    """The policy's per-sample winner errors e_w, (B,) fp32, of B winners x0 (B, C, h, w). unet, policy, cond as in
    ncp_dpo.errors; E is the unet with its adapters off."""
    x_t, t, target, z = encoder.noised(scheduler, x0, len(x0), generator)
    pred = sample.denoise(policy or unet, x_t, t, cond)
    if space == "latent":
        return encoder.latent_error(pred, target)
    return encoder.perceptual_errors(unet, scheduler, x_t=x_t, t=t, pred=pred, target=target, z=z, cond=cond,
                                     depth=depth, step_back=step_back)


# -----------------------------------------------------------------------------
# Flags: SFT has none of its own; the rest, with the paper's settings per model, are run.py's.


def parse_args(argv=None):
    return run.pair_args(__doc__, "sft", lambda p: None, may_change=[], argv=argv)


def main(args):
    r = run.Run(args, "sft", may_change=[], winners_only=True)  # checks, data, models, optimizer, resume
    args = r.args
    while r.step < args.max_steps and not r.stopping:
        for batch, generator, forward in r.micro_batches():
            x0, cond = sample.model_inputs(r.models, batch, args.resolution, generator=generator)  # (B, C, h, w)
            with forward:
                loss, metrics = sft_loss(errors(r.unet, r.models.scheduler, x0, cond, generator, args.space,
                                                args.encoder_depth, args.step_back, policy=r.policy))
                r.backward(loss, metrics)
        r.optimizer_step()  # clip, step, log, checkpoint, validate
    r.finish()


if __name__ == "__main__":
    run.run_main(main, parse_args())
