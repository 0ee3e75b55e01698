"""The every-query evidence's normalisation on SmolLM2 (the real suite's decode protocol, AccKV's defaults
otherwise): rank by mass / n^alpha, n the queries that saw the token (1: the mean, today's; 0: the sum, H2O's).
MODE: "a<alpha>":

    python normalisation.py TEXT[,TEXT] OUT.json a0.5,a0.75"""
import sys

from common import patch_compress, run

from acckv_triton import AccKVConfig

ALPHA = [1.0]
patch_compress("scores = scores / query_weight_sum(", "scores = scores / _alpha_norm(",
               _alpha_norm=lambda n, decay: n ** ALPHA[0])
run(sys.argv[1], sys.argv[2], sys.argv[3], lambda mode: AccKVConfig(),
    before=lambda mode: ALPHA.__setitem__(0, float(mode[1:])))
