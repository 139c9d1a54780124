"""docs/copy.md: its example, run as it stands on a tiny SD1.5-like pipeline (the model id pointed at a local folder),
gives ncp_dpo.py's loss for the same batch, and its LoRA, added by peft directly, is switched off for the reference
and the encoder (encoder.base_weights)."""

import copy
import math
import os
import re

import torch

import encoder
import ncp_dpo
import sample
from helpers import ROOT

HUB_ID = '"stable-diffusion-v1-5/stable-diffusion-v1-5"'


def example():
    with open(os.path.join(ROOT, "docs", "copy.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert len(blocks) == 1 and len(blocks[0].splitlines()) <= 60
    return blocks[0]


def test_the_copy_example_gives_the_trainers_loss_with_a_peft_lora(tmp_path):
    tiny = sample.build_tiny("sd15")
    sample.save_pipeline(tiny, str(tmp_path / "pipe"))
    code = example()
    assert HUB_ID in code
    space = {}
    exec(compile(code.replace(HUB_ID, repr(str(tmp_path / "pipe"))), "docs/copy.md", "exec"), space)
    unet, scheduler = space["unet"], space["scheduler"]
    base = copy.deepcopy(tiny.unet)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a policy away from the base: peft's gaussian init leaves B at zero
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    x0_w, x0_l = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    text = sample.encode_prompt(tiny, ["a red circle", "a blue square"])["encoder_hidden_states"]

    # the reference and the encoder are the base model: peft's adapters are off inside base_weights
    x, t = torch.randn(2, 4, 4, 4, generator=g), torch.tensor([10, 500])
    cond = {"encoder_hidden_states": text}
    with torch.no_grad():
        assert not torch.allclose(unet(x, t, **cond).sample, base(x, t, **cond).sample)
        torch.testing.assert_close(encoder.encode(unet, x, t, cond, "mid"), encoder.down_stack(base, x, t, cond, "mid"))
        with encoder.base_weights(unet):
            torch.testing.assert_close(unet(x, t, **cond).sample, base(x, t, **cond).sample)
        assert not torch.allclose(unet(x, t, **cond).sample, base(x, t, **cond).sample)  # on again

    # the trainer's errors and loss for the same batch and draws
    x0, both = torch.cat([x0_w, x0_l]), {"encoder_hidden_states": torch.cat([text, text])}
    trainer, _ = ncp_dpo.dpo_loss(*ncp_dpo.errors(unet, scheduler, x0, both, torch.Generator().manual_seed(7)), 2500.0)
    mine = space["ncp_dpo_loss"](unet, scheduler, x0_w, x0_l, text, generator=torch.Generator().manual_seed(7))
    assert torch.equal(mine.detach(), trainer.detach()) and abs(mine.item() - math.log(2)) > 1e-4  # not ln 2: the reference is not the policy

    before = {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}
    loss = space["training_step"](x0_w, x0_l, text, generator=torch.Generator().manual_seed(7))
    assert torch.equal(loss, mine.detach())
    assert before and all(not torch.equal(p, before[n]) for n, p in unet.named_parameters() if "lora_B" in n)
    frozen = dict(base.named_parameters())
    assert all(torch.equal(p, frozen[n.replace(".base_layer", "")]) for n, p in unet.named_parameters()
               if "lora" not in n)  # only the LoRA trains
