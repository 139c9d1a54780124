"""NCP-DPO: Diffusion-DPO with the errors measured in the frozen U-Net encoder's feature space at step t-1.

Gambashidze et al. 2024, "Aligning Diffusion Models with Noise-Conditioned Perception", eq. 14; with --space latent
it is the Diffusion-DPO baseline of Wallace et al. 2023 (eq. 8). For a pair (winner w, loser l) sharing t, the
noise and the reverse step's z:

    e     = || E(x_{t-1}^pred, t-1, c) - E(x_{t-1}^*, t-1, c) ||^2     eq. 13 (ncp), or || noise - pred ||^2 (latent)
    L_DPO = -log sigmoid( beta * ( (e_w^ref - e_l^ref) - (e_w - e_l) ) )   eq. 14 (ncp), eq. 8 (latent)

A LoRA on the U-Net's attention projections is the policy; the same U-Net with its adapters disabled is both the
reference and the perceptual encoder E, so no second copy of the weights is held (encoder.py).

    python ncp_dpo.py --model tiny --data synthetic                      # a first run: CPU, about 30 s
    torchrun --nproc_per_node=4 ncp_dpo.py --model sdxl --data /data/pickapic_v2
    torchrun --nproc_per_node=4 ncp_dpo.py --model sd15 --data /data/pickapic_v2
    torchrun --nproc_per_node=4 ncp_dpo.py --model sd15 --space latent ...   # the latent Diffusion-DPO baseline
    torchrun --nproc_per_node=4 ncp_dpo.py --model sdxl --resume ...     # continue the run in --output-dir
    torchrun --nproc_per_node=4 ncp_dpo.py --model sdxl --cache-latents /data/latents ...  # VAE once per image

Outputs in --output-dir: pytorch_lora_weights.safetensors (diffusers' format: pipe.load_lora_weights(dir)),
checkpoint.pt (everything needed to resume), metrics.jsonl and log.txt. The scaffolding is run.py's.
"""

import torch

import encoder
import run
import sample


def dpo_loss(e_w, e_l, ref_e_w, ref_e_l, beta):
    """Eq. 8 (latent) and eq. 14 (NCP): L = -log sigmoid(beta * ((ref_e_w - ref_e_l) - (e_w - e_l))), mean over B.

    e_*: (B,) per-sample errors of the policy, ref_e_*: of the frozen reference (winner w, loser l). The
    loss falls as the policy lowers its winner error relative to its loser error, more than the reference
    does. It is ln 2 at initialisation (policy == reference). beta = 2500 is the official Diffusion-DPO
    code's beta_dpo = 5000, which multiplies by 0.5 inside: -logsigmoid(-0.5 * 5000 * (model_diff -
    ref_diff)). Beta is in the thousands because the errors are means over many elements and the two models'
    errors differ by about 1e-3. The batch mean is taken outside logsigmoid.
    """
    margin = (ref_e_w - ref_e_l) - (e_w - e_l)  # (B,) > 0: the policy prefers the winner more than the reference
    loss = -torch.nn.functional.logsigmoid(beta * margin).mean()
    metrics = {"loss": loss, "accuracy": (margin > 0).float().mean() + 0.5 * (margin == 0).float().mean(),
               "margin": margin.mean(), "e_w": e_w.mean(), "e_l": e_l.mean(),
               "ref_e_w": ref_e_w.mean(), "ref_e_l": ref_e_l.mean(),
               "beta_margin": beta * margin}  # (B,): logsigmoid's argument, whose size says the loss's regime
    return loss, {k: v.detach().float() for k, v in metrics.items()}


def errors(unet, scheduler, x0, cond, generator, space="ncp", depth="mid", step_back=1, policy=None):
    """The per-sample errors (e_w, e_l, ref_e_w, ref_e_l), (B,) fp32 each, of a micro-batch of B pairs.

    unet: the U-Net (or SD3 transformer) with its LoRA: the policy; with its adapters off, the reference and E.
    policy: the same model as the policy's forward should call it (through DDP); default unet. x0: (2B, C, h, w),
    the winners then the losers; cond: the model's keyword arguments for those rows. One t, noise and z per pair,
    shared by its two images, so that their comparison carries no noise of its own.
    """
    x_t, t, target, z = encoder.noised(scheduler, x0, len(x0) // 2, generator)  # target: the noise, or SD3's velocity
    pred = sample.denoise(policy or unet, x_t, t, cond)  # the policy
    with torch.no_grad(), encoder.base_weights(unet):
        ref_pred = sample.denoise(unet, x_t, t, cond)  # the reference: the same U-Net, adapters off
    if space == "latent":
        err, ref_err = encoder.latent_error(pred, target), encoder.latent_error(ref_pred, target)
    else:  # eq. 13 for the policy and the reference, one target for both
        err, ref_err = encoder.perceptual_errors(unet, scheduler, x_t=x_t, t=t, pred=pred, ref_pred=ref_pred,
                                                 target=target, z=z, cond=cond, depth=depth, step_back=step_back)
    return (*err.chunk(2), *ref_err.chunk(2))


# -----------------------------------------------------------------------------
# Flags: DPO's own (a --resume may change beta); the rest, with the paper's settings per model, are run.py's.


def own_flags(p):
    p.add_argument("--beta", type=float, default=2500.0,
                   help="DPO beta, 2500 = the official 0.5 x 5000 (default: %(default)s)")


def parse_args(argv=None):
    return run.pair_args(__doc__, "dpo", own_flags, may_change=["beta"], argv=argv)


def main(args):
    # Checks, data, models, the LoRA, DDP, the optimizer and resume: run.py.
    r = run.Run(args, "dpo", may_change=["beta"])
    args, scheduler = r.args, r.models.scheduler
    while r.step < args.max_steps and not r.stopping:
        for batch, generator, forward in r.micro_batches():
            x0, cond = sample.model_inputs(r.models, batch, args.resolution, generator=generator)  # (2B, C, h, w)
            with forward:
                e_w, e_l, ref_e_w, ref_e_l = errors(r.unet, scheduler, x0, cond, generator, args.space,
                                                    args.encoder_depth, args.step_back, policy=r.policy)
                loss, metrics = dpo_loss(e_w, e_l, ref_e_w, ref_e_l, args.beta)
                r.backward(loss, metrics)
        r.optimizer_step()  # clip, step, log, checkpoint, validate
    r.finish()


if __name__ == "__main__":
    run.run_main(main, parse_args())
