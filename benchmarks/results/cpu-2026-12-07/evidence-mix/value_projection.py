"""Value weighting through the output projection, the protocol of run.py (prompt budget): rank by evidence x
||v W_o|| (CriticalKV's projected norm) instead of x ||v||. MODE: "vnorm" (today), "proj" (the square root of the
sum over the group's query heads of ||v W_o^g||^2, as v^T M v with M = sum_g W_o^g W_o^g^T):

    python value_projection.py TEXT[,TEXT] OUT.json MODE[,MODE]"""
import sys

import torch
from common import patch_compress, run

from acckv_triton import AccKVConfig

MODE = ["vnorm"]
GRAM = {}  # layer -> [Hkv, D, D]


def value_weight(layer, v):  # v [B, Hkv, N, D]
    if MODE[0] == "vnorm":
        return v.float().norm(dim=-1)
    return torch.einsum("bhnd,hde,bhne->bhn", v.float(), GRAM[layer], v.float()).clamp(min=0).sqrt()


def grams(model):
    c = model.config
    Hq, Hkv = c.num_attention_heads, c.num_key_value_heads
    D = c.hidden_size // Hq
    for i, layer in enumerate(model.model.layers):
        W = layer.self_attn.o_proj.weight.detach().float()  # [hidden, Hq*D]: head g's output adds x_g @ W[:, g].T
        Wg = W.T.reshape(Hq, D, -1)
        GRAM[i] = torch.einsum("gdk,gek->gde", Wg, Wg).reshape(Hkv, Hq // Hkv, D, D).sum(1)


patch_compress("scores = scores * st.v[:, :, :w].float().norm(dim=-1)",
               "scores = scores * _value_weight(self.layer, st.v[:, :, :w])", _value_weight=value_weight)
run(sys.argv[1], sys.argv[2], sys.argv[3], lambda mode: AccKVConfig(decode_budget="prompt"),
    before=lambda mode: MODE.__setitem__(0, mode), setup=grams)
