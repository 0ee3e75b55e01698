import json, sys
S = json.load(open(sys.argv[1]))
keys = sys.argv[3].split(",") if len(sys.argv) > 3 else None
for t in sys.argv[2].split(","):
    L = S[t]
    keys_ = keys or list(L[0])
    print(t)
    print("L  " + " ".join(f"{k[:9]:>9}" for k in keys_))
    for i, d in enumerate(L):
        print(f"{i:<3}" + " ".join(f"{sum(d[k])/len(d[k]):9.3f}" for k in keys_))
