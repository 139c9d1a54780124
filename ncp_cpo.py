"""NCP-CPO: Contrastive Preference Optimization with the errors in the frozen U-Net encoder's space at t-1.

Gambashidze et al. 2024, eq. 15; CPO is Xu et al. 2024 (eqs. 9-11). No reference model: the loss compares the
policy's own winner and loser errors and adds a behaviour-cloning term on the winners. With --space latent the
errors are measured in noise space (the latent CPO baseline, eq. 11):

    e     = || E(x_{t-1}^pred, t-1, c) - E(x_{t-1}^*, t-1, c) ||^2     eq. 13 (ncp), or || noise - pred ||^2 (latent)
    L_CPO = -log sigmoid( -beta * (e_w - e_l) ) + lambda * e_w          eq. 15 (ncp), eq. 11 (latent)

    python ncp_cpo.py --model tiny --data synthetic
    torchrun --nproc_per_node=4 ncp_cpo.py --model sdxl --data /data/pickapic_v2
    torchrun --nproc_per_node=4 ncp_cpo.py --model sd15 --sft-weight 0 ...   # as the authors' released code

Outputs as ncp_dpo.py's; the scaffolding is run.py's.
"""

import torch

import encoder
import run
import sample


def cpo_loss(e_w, e_l, beta, sft_weight):
    """Eq. 11 (latent) and eq. 15 (NCP): L = -log sigmoid(-beta * (e_w - e_l)) + sft_weight * e_w, mean over B.

    e_w, e_l: (B,) per-sample errors of the policy on the winner and the loser. The first term prefers the
    winner (a lower error) without a reference model; the second is CPO's behaviour-cloning (NLL) term on the
    winners. sft_weight = 1 as in the CPO paper; 0 reproduces the NCP authors' released code. beta = 2500 as
    for DPO, in the thousands because the errors are means over many elements.
    """
    margin = e_l - e_w  # (B,) > 0: the policy fits the winner better than the loser
    preference = -torch.nn.functional.logsigmoid(beta * margin).mean()
    loss = preference + sft_weight * e_w.mean()
    metrics = {"loss": loss, "preference_loss": preference, "accuracy": (margin > 0).float().mean() +
               0.5 * (margin == 0).float().mean(), "margin": margin.mean(), "e_w": e_w.mean(), "e_l": e_l.mean(),
               "beta_margin": beta * margin}  # (B,): logsigmoid's argument, whose size says the loss's regime
    return loss, {k: v.detach().float() for k, v in metrics.items()}


def errors(unet, scheduler, x0, cond, generator, space="ncp", depth="mid", step_back=1, policy=None):
    """The policy's per-sample errors (e_w, e_l), (B,) fp32 each, of a micro-batch of B pairs: x0 (2B, C, h, w),
    the winners then the losers, sharing t, noise and z pair by pair. No reference forward: CPO has none. unet,
    policy, cond as in ncp_dpo.errors; E is the unet with its adapters off."""
    x_t, t, target, z = encoder.noised(scheduler, x0, len(x0) // 2, generator)
    pred = sample.denoise(policy or unet, x_t, t, cond)
    err = (encoder.latent_error(pred, target) if space == "latent" else
           encoder.perceptual_errors(unet, scheduler, x_t=x_t, t=t, pred=pred, target=target, z=z, cond=cond,
                                     depth=depth, step_back=step_back))
    return err.chunk(2)


# -----------------------------------------------------------------------------
# Flags: CPO's own (a --resume may change beta); the rest, with the paper's settings per model, are run.py's.


def own_flags(p):
    p.add_argument("--beta", type=float, default=2500.0,
                   help="CPO beta on the winner-loser error gap (default: %(default)s)")
    p.add_argument("--sft-weight", type=float, default=1.0, help="weight of the behaviour-cloning term on winners, "
                   "1.0: the CPO paper, 0: the NCP authors' code (default: %(default)s)")


def parse_args(argv=None):
    return run.pair_args(__doc__, "cpo", own_flags, may_change=["beta"], argv=argv)


def main(args):
    r = run.Run(args, "cpo", may_change=["beta"])  # checks, data, models, LoRA, DDP, optimizer, resume
    args = r.args
    while r.step < args.max_steps and not r.stopping:
        for batch, generator, forward in r.micro_batches():
            x0, cond = sample.model_inputs(r.models, batch, args.resolution, generator=generator)  # (2B, C, h, w)
            with forward:
                e_w, e_l = errors(r.unet, r.models.scheduler, x0, cond, generator, args.space, args.encoder_depth,
                                  args.step_back, policy=r.policy)
                r.backward(*cpo_loss(e_w, e_l, args.beta, args.sft_weight))
        r.optimizer_step()  # clip, step, log, checkpoint, validate
    r.finish()


if __name__ == "__main__":
    run.run_main(main, parse_args())
