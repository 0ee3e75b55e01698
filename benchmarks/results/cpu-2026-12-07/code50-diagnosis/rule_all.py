"""rule.py with the library's default decode budget (decode_budget="all": decoded tokens count in the budget and
upkeeps evict during decode), for the plain AccKV rows and the broad-layer rule alike:

    python rule_all.py TEXT[,TEXT] BUDGET[,BUDGET] OUT.json [FRAC=0.7]
"""
import layermix
from acckv_triton import AccKVConfig

layermix.METHODS["acckv"] = AccKVConfig(backend="torch")
import rule  # noqa: E402  (reads layermix's configs at run time)

if __name__ == "__main__":
    rule.main()
