"""Value weighting through the output projection, the protocol of run.py: rank by evidence x ||v W_o|| (CriticalKV's projected norm) instead
of x ||v||. MODE: vnorm (today), proj (sqrt of the sum over the group's query heads of ||v W_o^g||^2):
    python value_projection.py TEXT[,TEXT] OUT.json MODE[,MODE]"""
import json, sys, inspect, textwrap
import torch
torch.set_num_threads(1)
from acckv_triton import AccKVConfig, cache as cache_mod
from acckv_triton.bench import realmodel
from pydoc_data.topics import topics
TEXTS = {"prose": lambda: realmodel.text_named("prose"), "code": lambda: realmodel.text_named("code"),
         "compound": lambda: topics["compound"], "dataclasses": lambda: realmodel.long_text("dataclasses"),
         "types": lambda: topics["types"], "functools": lambda: realmodel.long_text("functools")}
MODE = ["vnorm"]
GRAM = {}  # layer -> [Hkv, D, D] sum over the group's query heads of W_o^g W_o^g^T
def value_weight(layer, v):  # v [B, Hkv, N, D]
    if MODE[0] == "vnorm":
        return v.float().norm(dim=-1)
    M = GRAM[layer]
    return torch.einsum("bhnd,hde,bhne->bhn", v.float(), M, v.float()).clamp(min=0).sqrt()
cache_mod._value_weight = value_weight
src = textwrap.dedent(inspect.getsource(cache_mod.BudgetedLayerCache.compress))
old = "scores = scores * st.v[:, :, :w].float().norm(dim=-1)"
assert old in src
src = src.replace(old, "scores = scores * _value_weight(self.layer, st.v[:, :, :w])")
ns = {}
exec(src, cache_mod.__dict__, ns)
cache_mod.BudgetedLayerCache.compress = ns["compress"]
model, tok = realmodel.load_smollm2()
cfgm = model.config
Hq, Hkv = cfgm.num_attention_heads, cfgm.num_key_value_heads
D = cfgm.hidden_size // Hq
G = Hq // Hkv
for l, layer in enumerate(model.model.layers):
    W = layer.self_attn.o_proj.weight.detach().float()  # [hidden, Hq*D]; out = x @ W.T, head g's slice x_g @ W[:, g].T
    Wg = W.T.reshape(Hq, D, -1)  # [Hq, D, hidden]
    M = torch.einsum("gdk,gek->gde", Wg, Wg).reshape(Hkv, G, D, D).sum(1)
    GRAM[l] = M
rows = []
for name in sys.argv[1].split(","):
    for mode in sys.argv[3].split(","):
        MODE[0] = mode
        with torch.no_grad():
            got = realmodel.fidelity_rows(model, tok, context=1536, continuation=128, step="decode", methods=(),
                                          text=TEXTS[name](), backend="torch",
                                          configs={mode: AccKVConfig(decode_budget="prompt")})
        got = [r for r in got if r["method"] == mode]
        rows += [{"text": name, **{k: v for k, v in r.items() if k != "seconds"}} for r in got]
        for r in got:
            print(name, r["method"], r["budget"], round(r["top1"], 4), round(r["kl"], 5), flush=True)
        json.dump(rows, open(sys.argv[2], "w"), indent=1)
